"""One push tick: sites (full set), devices (full set), then measurements by cursor.

Rules (DESIGN.md, Client side):
- a 2xx advances the cursor, and only after the server answered;
- 413 halves the batch size and retries at once; the size grows back after
  consecutive successes;
- 429/503 wait for Retry-After; other failures and timeouts back off per resource,
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
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg

from fleet import db, push_source
from fleet.errors import FleetError
from fleet.observability import logger, metrics
from fleet.push_source import START, Cursor, MeasurementPage, PortalSource, UnreadableCursor
from fleet.push_state import RESOURCES, LeaseLost, PushStateStore, ResourceState
from fleet.push_transport import IngestClient, Reply, TransportError, gzip_body

if TYPE_CHECKING:
    from fleet.push_digests import DigestPush

BACKOFF_BASE_S = 60.0
BACKOFF_CAP_S = 1800.0
GROW_AFTER_SUCCESSES = 3
_BATCH_NAMESPACE = uuid.UUID("6f1d6c2e-41b5-4e55-9a52-6a1f3e0f2b7c")


# The read-ahead thread takes each page's rows as they arrive and writes its body;
# it waits for the socket several times a page and needs the GIL back after each
# wait, while this thread sends and keeps the books. At Python's default switch
# interval (5 ms) each of those waits can last as long as this thread runs; with a
# short one the reader takes each chunk as it arrives. By the benchmark it matters
# where this thread is busy too: reading ahead of sends that answered at once, 0.58
# x COPY against 0.55 at the default; with sends waiting 2 ms, 913k against 870k
# rows/s (medians of five); with 5 or 20 ms, the same. Process-wide, so it is
# shortened while some push reads ahead and restored after the last one.
READ_AHEAD_SWITCH_INTERVAL_S = 0.0002

# Read-ahead fills the time a batch's send waits (the ingest's answer, the state's
# save): tens of ms against a real ingest, where it gives 1.26-1.37x the rows per
# second. Where sending takes less than this (a sink that answers at once, an ingest
# on the same machine), the two threads cost more in trading the GIL than they
# overlap (by the benchmark, 5-12 % of the rows per second), and the push reads the
# next page in this thread once it has sent.
READ_AHEAD_MIN_WAIT_S = 0.001
_switching = threading.Lock()
_switching_users = 0
_switching_saved = 0.0


@contextlib.contextmanager
def _prompt_thread_switches() -> Iterator[None]:
    global _switching_users, _switching_saved
    with _switching:
        if _switching_users == 0:
            _switching_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_switching_saved, READ_AHEAD_SWITCH_INTERVAL_S))
        _switching_users += 1
    try:
        yield
    finally:
        with _switching:
            _switching_users -= 1
            if _switching_users == 0:
                sys.setswitchinterval(_switching_saved)


Batch = tuple[MeasurementPage, bytes]  # a page and its compressed body


def _batch(source: push_source.MeasurementReader, size: int) -> Batch:
    page = source.page(size)
    return page, gzip_body(page.body()) if page.count else b""


def _note_interruption(rep: ResourceReport, error: psycopg.Error | None) -> None:
    """A read that ended early: the rest goes on next tick, from the cursor."""
    if error is not None:
        rep.detail = f"reading was interrupted; the rest goes on next tick: {type(error).__name__}: {error}"[:500]
        logger.warning("push read interrupted", extra={"resource": "measurements", "error": rep.detail})


def _done(read: Callable[..., Batch], *args: Any) -> Future[Batch]:
    """A batch read here and now (read-ahead off), as the Future a read-ahead gives."""
    done: Future[Batch] = Future()
    try:
        done.set_result(read(*args))
    except Exception as exc:  # noqa: BLE001 - raised again by result(), as a read-ahead's
        done.set_exception(exc)
    return done


def _rows_of(ahead: Future[Batch] | None) -> list[push_source.Row]:
    return [] if ahead is None else ahead.result()[0].rows


def _drop(ahead: Future[Any] | None) -> None:
    """Let a read-ahead finish (the connection is free again after it) and drop it."""
    if ahead is not None:
        with contextlib.suppress(Exception):
            ahead.result()


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
        max_batches: int = 3,
        lease_seconds: int = 120,
        full_resend_seconds: int = 3600,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        checkpoints: Checkpoints | None = None,
        read_ahead: bool = True,
        time_budget_s: float | None = None,
        source: PortalSource | None = None,
        digests: DigestPush | None = None,
    ) -> None:
        self._connect = connect
        self.source = source or PortalSource()  # where the portal keeps each resource
        self.state = state
        self.client = client
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.lease_seconds = lease_seconds
        self.full_resend_seconds = full_resend_seconds
        self.clock = clock
        self.rng = rng
        self.checkpoints = checkpoints or Checkpoints()
        self.read_ahead = read_ahead  # off: read each page after the previous one is acknowledged
        # A backlog drains as fast as the server takes it, but a tick reads no new
        # batch after this many seconds (None: only max_batches ends it).
        self.time_budget_s = time_budget_s
        self.digests = digests  # reconciliation, after the measurements (None: off)
        if digests is not None:
            digests.source = self.source  # the digests read the portal as the push does

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
        # The tick's rows come from one statement per phase that the server runs ahead
        # of the pages (MeasurementReader). Read-ahead: while one batch is sent, a
        # second thread takes the next page from the reader and writes its body (JSON,
        # gzip), so the client's work overlaps the HTTP round trip; this thread only
        # sends and keeps the books. It reads ahead while sending a batch takes long
        # enough to be worth it (READ_AHEAD_MIN_WAIT_S). Only a 2xx moves the cursor,
        # as ever; rows taken for a batch that did not succeed are never sent past it
        # (a 413 hands them back, to be sent again in smaller batches).
        switches = _prompt_thread_switches() if self.read_ahead else contextlib.nullcontext()
        max_rows = self._size(state) * self.max_batches
        with (
            switches,
            self.source.reader(conn, cursor, max_rows) as source,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="push-read-ahead") as reader,
        ):

            def read(in_background: bool) -> Future[Batch]:
                if in_background:
                    return reader.submit(_batch, source, self._size(state))
                return _done(_batch, source, self._size(state))

            ahead: Future[Batch] | None = read(False)
            overlap = self.read_ahead  # until a batch's answer shows nothing to fill
            try:
                sent = 0
                while ahead is not None and sent < self.max_batches:
                    (page, body), ahead = ahead.result(), None
                    self.checkpoints.reached("after_read", "measurements")
                    if not page.count:
                        break
                    more = page.full and sent + 1 < self.max_batches
                    if more and self.clock() >= deadline:
                        more = False
                        rep.detail = "time budget of the tick used; the backlog goes on next tick"
                    if more and overlap:
                        ahead = read(True)
                    started = time.perf_counter()
                    reply = self._send(state, owner, rep, "measurements", body, page.count, cursor, page.cursor)
                    overlap = self.read_ahead and time.perf_counter() - started >= READ_AHEAD_MIN_WAIT_S
                    if reply is None:  # 413: halved; the same rows again at the smaller size
                        source.give_back(page.rows + _rows_of(ahead))
                        ahead = read(False)
                        continue
                    if not 200 <= reply.status < 300:
                        return
                    cursor = Cursor.decode(state.cursor)
                    sent += 1
                    if more and ahead is None:
                        ahead = read(False)
            finally:
                _drop(ahead)
        rep.outcome = "pushed" if rep.batches else "idle"
        _note_interruption(rep, source.interrupted_by)
        if not conn.broken:
            self._report_lag(conn, cursor)

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
        # The same batch re-sent gets the same id, so the server's audit shows it.
        before_text = before.encode() if before else ""
        batch_id = str(uuid.uuid5(_BATCH_NAMESPACE, f"{batch_type}|{before_text}|{after_text}|{count}"))
        try:
            reply = self.client.post_batch(batch_type, body, after_text, batch_id)
        except TransportError as exc:
            self._failed(state, owner, rep, f"no answer: {exc}")
            return Reply(0, {})
        self.checkpoints.reached("after_send", batch_type)
        status = reply.status
        if 200 <= status < 300:
            self.checkpoints.reached("after_2xx", batch_type)
            self._succeeded(state, owner, rep, reply, count, len(body), after, batch_type)
            self.checkpoints.reached("after_cursor_saved", batch_type)
        elif status == 413:
            if count <= 1:
                self._refused(state, owner, rep, "413 for a single item")
                return reply
            self._halve(state, owner, count, "server answered 413")
            return None
        elif status in (429, 503):
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
