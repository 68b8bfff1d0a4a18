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
from typing import TYPE_CHECKING

import psycopg

from fleet import db
from fleet.errors import FleetError
from fleet.observability import logger, metrics
from fleet.push.codec import gzip_body, items_body
from fleet.push.cursor import START, Cursor, UnreadableCursor, furthest
from fleet.push.readahead import OUT_OF_TIME, OneRead
from fleet.push.report import Checkpoints, ResourceReport, TickReport
from fleet.push.responses import ResponseRules
from fleet.push.source import PortalSource
from fleet.push.state import RESOURCES, LeaseLost, PushStateStore, ResourceState
from fleet.push.transport import IngestClient, TransportError

if TYPE_CHECKING:
    from fleet.push.digests import DigestPush

# Batches of one read (a snapshot and a statement per phase): a tick with a larger
# backlog reads again from its cursor. Large enough that a read's start is nothing
# against its rows (500,000 at the default batch size).
READ_BATCHES = 100

# A 429 whose Retry-After is at most this is waited out within the tick.
MAX_WAIT_IN_TICK_S = 10.0

# Measurement batches posted and not yet answered, at most: while the ingest stores
# one, the next is on its way (bench/README.md, "e2e", has the figures).
IN_FLIGHT = 2


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


class PushService(ResponseRules):
    """One push tick over sites, devices and measurements (and the digests, when on),
    by the rules of the module's docstring (the response rules: ResponseRules)."""

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
            # The furthest of the last acknowledged (batches in flight are acknowledged
            # in any order); a server that lists none gives its last.
            state.cursor = _cursor_or_start(furthest(entry.get("recent") or [entry.get("cursor")]))
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
            read = OneRead(
                self,
                self.source,
                state,
                owner,
                rep,
                cursor=cursor,
                batches=batches,
                depth=self.in_flight,
                read_ahead=self.read_ahead,
                deadline=deadline,
            )
            cursor, done, ended = read.run(conn)
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
                rep.detail = OUT_OF_TIME
                break
        rep.outcome = "pushed" if rep.batches else "idle"
        if not conn.broken:
            self._report_lag(conn, cursor)

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
            chunk = rows[offset : offset + self.size(state)]
            marker = f"{digest}:{offset + len(chunk)}/{len(rows)}"
            body = gzip_body(items_body(chunk))
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
