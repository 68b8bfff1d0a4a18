"""One push tick: sites (full set), devices (full set), then measurements by cursor.

Rules (DESIGN.md, Client side):
- a backlog drains while the tick's time budget lasts (an operator may cap the
  batches); up to IN_FLIGHT batches are in flight, no more than the server
  advertises, their answers taken in the order they were posted;
- a 2xx advances the cursor, and only after the server answered, and only past
  that batch: never past one before it that was not acknowledged;
- 413 halves the batch size and retries at once; the size grows back after
  consecutive successes;
- 429/503 wait for Retry-After (a short 429 within the tick); other failures and timeouts back off per resource,
  1 min doubling to a 30 min cap, with jitter;
- 401/403, and a 400 for a whole batch, back off at the cap and raise the alarm
  metric; the cursor never moves past a refused batch;
- a resource in backoff does not block the others, and one that fails (a query
  error on sites, a table that no longer fits the mapping) records its failure on
  itself while the others go on in the same tick;
- a missing state item resumes from the server's ledger, not from zero.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg

from fleet import db
from fleet.errors import FleetError
from fleet.observability import logger, metrics
from fleet.push.source import START, Cursor, MeasurementPage, PortalSource, UnreadableCursor
from fleet.push.state import RESOURCES, LeaseLost, PushStateStore, ResourceState
from fleet.push.transport import InFlight, IngestClient, Reply, TransportError, gzip_body

if TYPE_CHECKING:
    from fleet.push.digests import DigestPush

BACKOFF_BASE_S = 60.0
BACKOFF_CAP_S = 1800.0
GROW_AFTER_SUCCESSES = 3
_BATCH_NAMESPACE = uuid.UUID("6f1d6c2e-41b5-4e55-9a52-6a1f3e0f2b7c")


# Batches of one read (a snapshot and a statement per phase): a tick with a larger
# backlog reads again from its cursor. Large enough that a read's start is nothing
# against its rows (500,000 at the default batch size).
READ_BATCHES = 100

# A 429 whose Retry-After is at most this is waited out within the tick.
MAX_WAIT_IN_TICK_S = 10.0

# Measurement batches posted and not yet answered, at most: while the ingest stores
# one, the next is on its way (bench/README.md, "e2e", has the figures).
IN_FLIGHT = 2


@dataclass
class _Batch:
    page: MeasurementPage
    body: bytes
    before: Cursor  # the cursor before its first row


def _batch_id(batch_type: str, before: str, after: str, count: int) -> str:
    """The same batch re-sent gets the same id, so the server's audit shows it."""
    return str(uuid.uuid5(_BATCH_NAMESPACE, f"{batch_type}|{before}|{after}|{count}"))


def _note_interruption(rep: ResourceReport, error: psycopg.Error | None) -> None:
    """A read that ended early: the rest goes on next tick, from the cursor."""
    if error is not None:
        rep.detail = f"reading was interrupted; the rest goes on next tick: {type(error).__name__}: {error}"[:500]
        logger.warning("push read interrupted", extra={"resource": "measurements", "error": rep.detail})


def _describe(exc: psycopg.Error | FleetError) -> str:
    """A failure in a line or a few: a driver error without the connection's details."""
    if isinstance(exc, psycopg.Error):
        return db.describe(exc)
    return f"{type(exc).__name__}: {exc}"


def _cursor_or_start(text: str | None) -> str | None:
    """The ledger's cursor when the push can read it; else the start of the legacy
    phase (every row is sent again, harmlessly), said loudly."""
    try:
        Cursor.decode(text)
    except UnreadableCursor as exc:
        metrics.add_metric(name="PushCursorReset", unit="Count", value=1)
        logger.error(
            "the ledger's push cursor is unreadable too; pushing every row again from the start",
            extra={"error": str(exc), "cursor": (text or "")[:200]},
        )
        return START.encode()
    return text


def backoff_delay(failures: int, rng: Callable[[], float] = random.random) -> float:
    """1 min doubling to a 30 min cap, with jitter (between half and all of it)."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(failures - 1, 0))
    return ceiling / 2 + rng() * ceiling / 2


@dataclass
class ResourceReport:
    resource: str
    outcome: str = "idle"  # idle | pushed | skipped | backoff | leased | failed | refused
    batches: int = 0
    rows: int = 0
    bytes: int = 0
    duplicates: int = 0
    rejected: int = 0
    shed: int = 0  # batches the server answered 429
    detail: str | None = None


@dataclass
class TickReport:
    resources: dict[str, ResourceReport] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {name: vars(r) for name, r in self.resources.items()}


class Checkpoints:
    """Named points of a push (reliability tests stop a real process at them)."""

    def reached(self, name: str, resource: str) -> None:  # pragma: no cover - overridden in tests
        pass


class PushService:
    def __init__(
        self,
        connect: Callable[[], psycopg.Connection],
        state: PushStateStore,
        client: IngestClient,
        *,
        batch_size: int = 5000,
        max_batches: int | None = None,
        lease_seconds: int = 120,
        full_resend_seconds: int = 3600,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        checkpoints: Checkpoints | None = None,
        read_ahead: bool = True,
        in_flight: int = IN_FLIGHT,
        time_budget_s: float | None = None,
        source: PortalSource | None = None,
        digests: DigestPush | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._connect = connect
        self.source = source or PortalSource()  # where the portal keeps each resource
        self.state = state
        self.client = client
        self.batch_size = batch_size
        self.max_batches = max_batches  # None: no cap, the time budget ends a tick
        self.lease_seconds = lease_seconds
        self.full_resend_seconds = full_resend_seconds
        self.clock = clock
        self.rng = rng
        self.checkpoints = checkpoints or Checkpoints()
        # Off: each page read once the batch before it is acknowledged, one at a time.
        # On: pages are read while batches are in flight, up to ``in_flight`` of them
        # posted at once (and one more read, ready to go).
        self.read_ahead = read_ahead
        self.in_flight = in_flight if read_ahead else 1
        # A backlog drains as fast as the server takes it, but a tick reads no new
        # batch after this many seconds (None: only the backlog's end or max_batches ends it).
        self.time_budget_s = time_budget_s
        self.digests = digests  # reconciliation, after the measurements (None: off)
        if digests is not None:
            digests.source = self.source  # the digests read the portal as the push does
        self.sleep = sleep

    def tick(self, owner: str | None = None, time_budget_s: float | None = None) -> TickReport:
        """One pass over sites, devices and measurements. ``time_budget_s`` overrides
        the service's own budget for this tick (the handler passes what the Lambda
        invocation has left)."""
        owner = owner or str(uuid.uuid4())
        budget = time_budget_s if time_budget_s is not None else self.time_budget_s
        deadline = math.inf if budget is None else self.clock() + budget
        report = TickReport()
        with contextlib.ExitStack() as connections:
            conn: psycopg.Connection | None = None
            for resource in RESOURCES:
                if conn is None or conn.closed or conn.broken:  # one resource's failure may have ended it
                    conn = connections.enter_context(self._connect())
                report.resources[resource] = self._run_resource(conn, resource, owner, deadline)
            if self.digests is not None:
                if conn is None or conn.closed or conn.broken:
                    conn = connections.enter_context(self._connect())
                report.resources["digests"] = self.digests.run(conn, owner, deadline)
        return report

    # -- one resource ---------------------------------------------------------------
    def _run_resource(self, conn: psycopg.Connection, resource: str, owner: str, deadline: float) -> ResourceReport:
        rep = ResourceReport(resource)
        now = self.clock()
        state = self.state.acquire(resource, owner, now, self.lease_seconds)
        if state is None:
            rep.outcome = "leased"
            rep.detail = "another invocation holds the lease"
            return rep
        try:
            if state.next_attempt_at > now:
                rep.outcome = "backoff"
                rep.detail = f"next attempt in {state.next_attempt_at - now:.0f} s"
                metrics.add_metric(name="PushBackoff", unit="Count", value=1)
                return rep
            if not state.initialized and not self._recover(state, owner, rep):
                return rep
            if resource == "measurements":
                self._push_measurements(conn, state, owner, rep, deadline)
            else:
                self._push_full_set(conn, state, owner, rep)
        except LeaseLost as exc:
            rep.outcome = "leased"
            rep.detail = str(exc)
            logger.warning("lease lost; stopping this resource", extra={"resource": resource})
        except (psycopg.Error, FleetError) as exc:  # a query error, a table that no longer fits: its own
            self._failed(state, owner, rep, f"{resource}: {_describe(exc)}")
        finally:
            self.state.release(resource, owner)
        return rep

    def _recover(self, state: ResourceState, owner: str, rep: ResourceReport) -> bool:
        """No state item: ask the server's ledger where to resume, and its limits."""
        try:
            reply = self.client.state()
        except TransportError as exc:
            self._failed(state, owner, rep, f"ledger: no answer: {exc}")
            return False
        if reply.status in (401, 403):
            self._refused(state, owner, rep, f"ledger: {reply.status}: {reply.body.get('message', '')}")
            return False
        if reply.status != 200:
            wait = reply.retry_after if reply.status in (429, 503) else None
            self._failed(state, owner, rep, f"ledger answered {reply.status}", wait=wait)
            return False
        entry = reply.body.get("ledger", {}).get(state.resource, {})
        limits = reply.body.get("limits", {})
        state.server_max_items = limits.get("max_items")
        state.server_max_bytes = limits.get("max_body_bytes")
        state.server_max_in_flight = limits.get("max_in_flight")
        if state.resource == "measurements":
            state.cursor = _cursor_or_start(entry.get("cursor"))
        self.state.save(state, owner)
        logger.info(
            "push state missing; resuming from the server's ledger",
            extra={"resource": state.resource, "cursor": state.cursor},
        )
        return True

    def _readable_cursor(self, state: ResourceState, owner: str, rep: ResourceReport) -> Cursor | None:
        """The cursor to go on from. One the push cannot read (its state damaged, or in
        a format this version does not know) is replaced by the server's ledger's, and
        when that one cannot be read either, by the start (re-sending is harmless):
        loudly (an error log, a metric), never silently, and never stuck. None when the
        ledger cannot be asked now (the failure is recorded; the next tick asks again)."""
        try:
            return Cursor.decode(state.cursor)
        except UnreadableCursor as exc:
            metrics.add_metric(name="PushCursorUnreadable", unit="Count", value=1)
            logger.error(
                "push cursor unreadable; resuming from the server's ledger",
                extra={"resource": state.resource, "error": str(exc), "cursor": (state.cursor or "")[:200]},
            )
        if not self._recover(state, owner, rep):
            return None
        return Cursor.decode(state.cursor)  # _recover keeps only a cursor it can read

    def _ceiling(self, state: ResourceState) -> int:
        ceiling = self.batch_size
        if state.server_max_items:
            ceiling = min(ceiling, int(state.server_max_items))
        return max(ceiling, 1)

    def _size(self, state: ResourceState) -> int:
        return max(1, min(state.batch_size or self._ceiling(state), self._ceiling(state)))

    # -- measurements ---------------------------------------------------------------
    def _push_measurements(
        self, conn: psycopg.Connection, state: ResourceState, owner: str, rep: ResourceReport, deadline: float
    ) -> None:
        cursor = self._readable_cursor(state, owner, rep)
        if cursor is None:
            return
        # A backlog drains while there is time left in the tick (and batches left under
        # an operator's cap), one read at a time: each read a snapshot of its own of at
        # most READ_BATCHES batches, so no statement is planned for the whole table and
        # no snapshot lasts the whole tick; the next read starts from the cursor the
        # last acknowledged batch left.
        sent = 0
        while True:
            batches = READ_BATCHES if self.max_batches is None else min(READ_BATCHES, self.max_batches - sent)
            cursor, done, ended = self._read_and_send(conn, state, owner, rep, deadline, cursor, batches)
            sent += done
            if rep.outcome in ("failed", "refused"):
                # A batch not acknowledged: the cursor stays before it. A server that
                # sheds load says when to come back; within the tick, the push does.
                if not self._wait_for_retry_after(state, rep, deadline):
                    return
                continue
            if ended or (self.max_batches is not None and sent >= self.max_batches):
                break
            if self.clock() >= deadline:
                rep.detail = "time budget of the tick used; the backlog goes on next tick"
                break
        rep.outcome = "pushed" if rep.batches else "idle"
        if not conn.broken:
            self._report_lag(conn, cursor)

    def _read_and_send(
        self,
        conn: psycopg.Connection,
        state: ResourceState,
        owner: str,
        rep: ResourceReport,
        deadline: float,
        cursor: Cursor,
        batches: int,
    ) -> tuple[Cursor, int, bool]:
        """Up to ``batches`` batches from one read: (the cursor after the last one
        acknowledged, how many were, whether the tick ends here: no backlog left, a
        batch not acknowledged, the read interrupted, or the time budget used)."""
        # The read's rows come from one statement per phase that the server runs ahead
        # of the pages (MeasurementReader). While batches are in flight (their posts
        # wait for the ingest on threads of their own), this thread reads and writes the
        # next: the reading, the HTTP round trips and the ingest's work overlap. Answers
        # are taken in the order the batches were posted, and only a 2xx moves the
        # cursor, past that batch only: a batch not acknowledged stops the read, and
        # the batches after it (whatever the server made of them) are sent again from
        # the cursor later; a 413 hands their rows back, to be sent again smaller.
        max_rows = self._size(state) * batches
        sent = acknowledged = 0
        reading, out_of_time = True, False
        ready: _Batch | None = None  # read, not yet posted
        position = cursor  # the cursor after the last batch read
        # After a failure, one batch at a time until one is acknowledged: a server in
        # trouble is not sent work it will be asked for again.
        # And never more than the server says it takes from one customer.
        depth = 1 if state.failures else min(self.in_flight, state.server_max_in_flight or self.in_flight)
        with (
            self.source.reader(conn, cursor, max_rows) as source,
            InFlight[_Batch](depth) as flights,
        ):
            while True:
                if ready is not None and not flights.full:
                    self._post(flights, ready)
                    ready = None
                    if reading and self.clock() >= deadline:
                        # The batch in hand goes out; no new one is read.
                        reading, out_of_time = False, True
                        rep.detail = "time budget of the tick used; the backlog goes on next tick"
                    continue
                if reading and ready is None and sent + len(flights) < batches and (not flights or self.read_ahead):
                    page = source.page(self._size(state))
                    self.checkpoints.reached("after_read", "measurements")
                    if not page.count:
                        reading = False
                        continue
                    batch = _Batch(page, gzip_body(page.body()), position)
                    if self._too_big(state, owner, batch):
                        source.give_back(page.rows)  # read again, smaller
                        continue
                    ready, position, reading = batch, page.cursor, page.full
                    continue
                if not flights:
                    break
                batch, answer = flights.oldest()
                reply = self._answer(
                    state, owner, rep, "measurements", answer, batch.page.count, len(batch.body), batch.page.cursor
                )
                if reply is None:  # 413: halved; these rows and the later ones again, smaller
                    later = flights.drop() + ([ready] if ready else [])
                    source.give_back([row for b in (batch, *later) for row in b.page.rows])
                    ready, position, reading = None, batch.before, True
                    continue
                if not 200 <= reply.status < 300:
                    flights.drop()
                    return cursor, sent, True
                cursor = batch.page.cursor
                sent += 1
                acknowledged += batch.page.count
        _note_interruption(rep, source.interrupted_by)
        # A read whose every row was acknowledged may have had more behind it.
        more = acknowledged == max_rows and not out_of_time and source.interrupted_by is None
        return cursor, sent, not more

    def _wait_for_retry_after(self, state: ResourceState, rep: ResourceReport, deadline: float) -> bool:
        """After a 429 whose Retry-After ends within the tick (and soon): wait, go on."""
        wait = state.next_attempt_at - self.clock()
        if not (rep.outcome == "failed" and rep.detail and rep.detail.startswith("429")):
            return False
        if wait > MAX_WAIT_IN_TICK_S or self.clock() + wait >= deadline:
            return False
        self.sleep(max(wait, 0.0))
        rep.outcome, rep.detail = "pushed", None
        return True

    def _post(self, flights: InFlight[_Batch], batch: _Batch) -> None:
        page = batch.page
        batch_id = _batch_id("measurements", batch.before.encode(), page.cursor.encode(), page.count)
        cursor_text = page.cursor.encode()
        flights.post(batch, lambda: self.client.post_batch("measurements", batch.body, cursor_text, batch_id))

    def _too_big(self, state: ResourceState, owner: str, batch: _Batch) -> bool:
        """A body over the server's advertised limit is halved before it is sent."""
        if state.server_max_bytes and len(batch.body) > state.server_max_bytes and batch.page.count > 1:
            self._halve(state, owner, batch.page.count, "body over the server's limit")
            return True
        return False

    def _report_lag(self, conn: psycopg.Connection, cursor: Cursor) -> None:
        try:
            known, oldest = self.source.oldest_unpushed(conn, cursor)
        except (psycopg.Error, FleetError) as exc:  # the batches went; only the metric is missing
            logger.warning("push lag not measured", extra={"error": _describe(exc)})
            return
        if not known:  # the mapping names no received_at column
            return
        lag = 0.0 if oldest is None else max(0.0, self.clock() - oldest.timestamp())
        metrics.add_metric(name="PushLagSeconds", unit="Seconds", value=round(lag, 3))

    # -- sites and devices ------------------------------------------------------------
    def _push_full_set(self, conn: psycopg.Connection, state: ResourceState, owner: str, rep: ResourceReport) -> None:
        rows = self.source.read_full_set(conn, state.resource)  # type: ignore[arg-type]
        digest = "sha256:" + hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
        now = self.clock()
        fresh = state.last_full_push_at is not None and now - state.last_full_push_at < self.full_resend_seconds
        if digest == state.content_hash and fresh:
            rep.outcome = "skipped"
            rep.detail = "unchanged since the last acknowledged push"
            return
        offset = 0
        while offset < len(rows) or (offset == 0 and not rows):
            chunk = rows[offset : offset + self._size(state)]
            marker = f"{digest}:{offset + len(chunk)}/{len(rows)}"
            body = gzip_body(json.dumps({"items": chunk}, separators=(",", ":")).encode())
            reply = self._send(state, owner, rep, state.resource, body, len(chunk), None, marker)
            if reply is None:
                continue
            if not 200 <= reply.status < 300:
                return
            offset += len(chunk)
            if not rows:
                break
        state.content_hash = digest
        state.last_full_push_at = now
        self.state.save(state, owner)
        rep.outcome = "pushed"

    # -- one batch ----------------------------------------------------------------------
    def _send(
        self,
        state: ResourceState,
        owner: str,
        rep: ResourceReport,
        batch_type: str,
        body: bytes,
        count: int,
        before: Cursor | None,
        after: Cursor | str,
    ) -> Reply | None:
        """Send one batch (its body compressed) and apply the response rules. None means
        "413: resend smaller"."""
        after_text = after.encode() if isinstance(after, Cursor) else after
        if state.server_max_bytes and len(body) > state.server_max_bytes and count > 1:
            self._halve(state, owner, count, "body over the server's limit")
            return None
        batch_id = _batch_id(batch_type, before.encode() if before else "", after_text, count)
        answer: Reply | TransportError
        try:
            answer = self.client.post_batch(batch_type, body, after_text, batch_id)
        except TransportError as exc:
            answer = exc
        return self._answer(state, owner, rep, batch_type, answer, count, len(body), after)

    def _answer(
        self,
        state: ResourceState,
        owner: str,
        rep: ResourceReport,
        batch_type: str,
        answer: Reply | TransportError,
        count: int,
        size: int,
        after: Cursor | str,
    ) -> Reply | None:
        """Apply the response rules to a batch's answer. None means "413: resend smaller"."""
        if isinstance(answer, TransportError):
            self._failed(state, owner, rep, f"no answer: {answer}")
            return Reply(0, {})
        reply = answer
        self.checkpoints.reached("after_send", batch_type)
        status = reply.status
        if 200 <= status < 300:
            self.checkpoints.reached("after_2xx", batch_type)
            self._succeeded(state, owner, rep, reply, count, size, after, batch_type)
            self.checkpoints.reached("after_cursor_saved", batch_type)
        elif status == 413:
            if count <= 1:
                self._refused(state, owner, rep, "413 for a single item")
                return reply
            self._halve(state, owner, count, "server answered 413")
            return None
        elif status in (429, 503):
            rep.shed += status == 429
            wait = reply.retry_after if reply.retry_after is not None else backoff_delay(state.failures + 1, self.rng)
            self._failed(state, owner, rep, f"{status}: {reply.body.get('message', '')}", wait=wait)
        elif status in (400, 401, 403):
            self._refused(state, owner, rep, f"{status}: {reply.body.get('message', '')}")
        else:
            self._failed(state, owner, rep, f"{status}: {str(reply.body.get('message', ''))[:200]}")
        return reply

    def _succeeded(
        self,
        state: ResourceState,
        owner: str,
        rep: ResourceReport,
        reply: Reply,
        count: int,
        size: int,
        after: Cursor | str,
        batch_type: str,
    ) -> None:
        if isinstance(after, Cursor):
            state.cursor = after.encode()
        state.failures = 0
        state.last_error = None
        state.next_attempt_at = 0.0
        state.last_success_at = self.clock()
        state.successes_in_a_row += 1
        if state.successes_in_a_row >= GROW_AFTER_SUCCESSES and state.batch_size:
            grown = min(state.batch_size * 2, self._ceiling(state))
            state.batch_size = None if grown >= self._ceiling(state) else grown
            state.successes_in_a_row = 0
        if isinstance(after, Cursor):
            self.state.save(state, owner)
        rep.batches += 1
        rep.rows += count
        rep.bytes += size
        rep.duplicates += int(reply.body.get("duplicates", 0))
        rep.rejected += int(reply.body.get("rejected", 0))
        metrics.add_metric(name="RowsPushed", unit="Count", value=count)
        metrics.add_metric(name="BytesPushed", unit="Bytes", value=size)
        logger.info(
            "batch pushed",
            extra={
                "resource": batch_type,
                "rows": count,
                "bytes": size,
                "accepted": reply.body.get("accepted"),
                "duplicates": reply.body.get("duplicates"),
                "rejected": reply.body.get("rejected"),
            },
        )

    def _halve(self, state: ResourceState, owner: str, current: int, why: str) -> None:
        state.batch_size = max(1, current // 2)
        state.successes_in_a_row = 0
        self.state.save(state, owner)
        logger.warning(
            "batch too large; halving", extra={"resource": state.resource, "batch_size": state.batch_size, "why": why}
        )

    def _failed(
        self, state: ResourceState, owner: str, rep: ResourceReport, error: str, wait: float | None = None
    ) -> None:
        delay = backoff_delay(state.failures + 1, self.rng) if wait is None else min(wait, 3600.0)
        self._record_failure(state, owner, rep, "failed", error, delay)
        metrics.add_metric(name="PushConsecutiveFailures", unit="Count", value=state.failures)
        logger.warning(
            "push failed; backing off",
            extra={"resource": state.resource, "error": error, "failures": state.failures, "delay_s": round(delay, 1)},
        )

    def _record_failure(
        self, state: ResourceState, owner: str, rep: ResourceReport, outcome: str, error: str, delay: float
    ) -> None:
        """What every failure and refusal records: the count, the wait, the error."""
        state.failures += 1
        state.successes_in_a_row = 0
        state.next_attempt_at = self.clock() + delay
        state.last_error = error[:500]
        self.state.save(state, owner)
        rep.outcome = outcome
        rep.detail = error
        metrics.add_metric(name="PushFailures", unit="Count", value=1)

    def _refused(self, state: ResourceState, owner: str, rep: ResourceReport, error: str) -> None:
        # 400/401/403: a person has to act; the cursor stays, the alarm fires.
        self._record_failure(state, owner, rep, "refused", error, BACKOFF_CAP_S)
        metrics.add_metric(name="PushRefused", unit="Count", value=1)
        logger.error(
            "push refused by the server; backing off at the cap", extra={"resource": state.resource, "error": error}
        )
