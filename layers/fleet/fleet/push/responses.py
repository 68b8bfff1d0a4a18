"""The response rules: what the server's answer to a batch does to the resource's
state (DESIGN.md, Client side). A 2xx moves the cursor past that batch and grows the
batch size back after consecutive successes; 413 halves it; 429/503 wait for
Retry-After; other failures and timeouts back off, 1 min doubling to a 30 min cap,
with jitter; 400/401/403 back off at the cap and raise the alarm metric."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable

from fleet.observability import logger, metrics
from fleet.push.cursor import Cursor
from fleet.push.report import Checkpoints, ResourceReport
from fleet.push.state import PushStateStore, ResourceState
from fleet.push.transport import IngestClient, Reply, TransportError

BACKOFF_BASE_S = 60.0
BACKOFF_CAP_S = 1800.0
GROW_AFTER_SUCCESSES = 3
_BATCH_NAMESPACE = uuid.UUID("6f1d6c2e-41b5-4e55-9a52-6a1f3e0f2b7c")


def batch_id_of(batch_type: str, before: str, after: str, count: int) -> str:
    """The same batch re-sent gets the same id, so the server's audit shows it."""
    return str(uuid.uuid5(_BATCH_NAMESPACE, f"{batch_type}|{before}|{after}|{count}"))


def backoff_delay(failures: int, rng: Callable[[], float] = random.random) -> float:
    """1 min doubling to a 30 min cap, with jitter (between half and all of it)."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(failures - 1, 0))
    return ceiling / 2 + rng() * ceiling / 2


class ResponseRules:
    """The rules applied to one resource's state, batch by batch. The push service is
    one (it sets these attributes); the read-ahead applies them to its batches."""

    state: PushStateStore
    client: IngestClient
    batch_size: int
    clock: Callable[[], float]
    rng: Callable[[], float]
    checkpoints: Checkpoints

    def ceiling(self, state: ResourceState) -> int:
        """The largest batch: the configured size, or less when the server says so."""
        ceiling = self.batch_size
        if state.server_max_items:
            ceiling = min(ceiling, int(state.server_max_items))
        return max(ceiling, 1)

    def size(self, state: ResourceState) -> int:
        """The next batch's size: the ceiling, or what a 413 halved it to."""
        return max(1, min(state.batch_size or self.ceiling(state), self.ceiling(state)))

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
        if self.too_big(state, owner, count, len(body)):
            return None
        batch_id = batch_id_of(batch_type, before.encode() if before else "", after_text, count)
        answer: Reply | TransportError
        try:
            answer = self.client.post_batch(batch_type, body, after_text, batch_id)
        except TransportError as exc:
            answer = exc
        return self.take_answer(state, owner, rep, batch_type, answer, count, len(body), after)

    def take_answer(
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
            self.halve(state, owner, count, "server answered 413")
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
            grown = min(state.batch_size * 2, self.ceiling(state))
            state.batch_size = None if grown >= self.ceiling(state) else grown
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

    def too_big(self, state: ResourceState, owner: str, count: int, size: int) -> bool:
        """A body over the server's advertised limit is halved before it is sent."""
        if state.server_max_bytes and size > state.server_max_bytes and count > 1:
            self.halve(state, owner, count, "body over the server's limit")
            return True
        return False

    def halve(self, state: ResourceState, owner: str, current: int, why: str) -> None:
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
