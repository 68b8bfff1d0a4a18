"""One read's batches, sent while the next are read: the machinery behind the push's
measurements (fleet.push.service holds the rules it follows).

The read's rows come from one statement per phase that the server runs ahead of the
pages (fleet.push.source.MeasurementReader). While batches are in flight (their posts
wait for the ingest on threads of their own, fleet.push.transport.InFlight), this
thread reads and writes the next: the reading, the HTTP round trips and the ingest's
work overlap. Answers are taken in the order the batches were posted, and only a 2xx
moves the cursor, past that batch only: a batch not acknowledged stops the read, and
the batches after it (whatever the server made of them) are sent again from the
cursor later; a 413 hands their rows back, to be sent again smaller.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from fleet.observability import logger
from fleet.push.codec import MeasurementPage, gzip_body
from fleet.push.cursor import Cursor
from fleet.push.report import ResourceReport
from fleet.push.responses import ResponseRules, batch_id_of
from fleet.push.source import MeasurementReader, PortalSource
from fleet.push.state import ResourceState
from fleet.push.transport import InFlight

OUT_OF_TIME = "time budget of the tick used; the backlog goes on next tick"


@dataclass
class _Batch:
    page: MeasurementPage
    body: bytes
    before: Cursor  # the cursor before its first row


class OneRead:
    """Up to ``batches`` batches from one read of the portal, sent with up to ``depth``
    in flight (one at a time when ``read_ahead`` is off: each page read once the batch
    before it is acknowledged)."""

    def __init__(
        self,
        rules: ResponseRules,
        source: PortalSource,
        state: ResourceState,
        owner: str,
        rep: ResourceReport,
        *,
        cursor: Cursor,
        batches: int,
        depth: int,
        read_ahead: bool,
        deadline: float,
    ) -> None:
        self.rules, self.source = rules, source
        self.state, self.owner, self.rep = state, owner, rep
        self.batches, self.read_ahead, self.deadline = batches, read_ahead, deadline
        # After a failure, one batch at a time until one is acknowledged: a server in
        # trouble is not sent work it will be asked for again. And never more than the
        # server says it takes from one customer.
        self.depth = 1 if state.failures else min(depth, state.server_max_in_flight or depth)
        self.start = cursor
        self.cursor = cursor  # after the last batch acknowledged
        self.position = cursor  # after the last batch read
        self.sent = self.acknowledged = 0
        self.reading, self.out_of_time = True, False
        self.ready: _Batch | None = None  # read, not yet posted

    def run(self, conn: psycopg.Connection) -> tuple[Cursor, int, bool]:
        """(the cursor after the last batch acknowledged, how many were, whether the
        tick ends here: no backlog left, a batch not acknowledged, the read interrupted,
        or the time budget used)."""
        max_rows = self.rules.size(self.state) * self.batches
        with (
            self.source.reader(conn, self.start, max_rows) as reader,
            InFlight[_Batch](self.depth) as flights,
        ):
            while True:
                if self.ready is not None and not flights.full:
                    self._post(flights)
                elif (
                    self.reading
                    and self.ready is None
                    and self.sent + len(flights) < self.batches
                    and (not flights or self.read_ahead)
                ):
                    self._read(reader)
                elif not flights:
                    break
                elif not self._take_oldest(reader, flights):
                    return self.cursor, self.sent, True
        if reader.interrupted_by is not None:  # the rest goes on next tick, from the cursor
            self.rep.detail = (
                "reading was interrupted; the rest goes on next tick: "
                f"{type(reader.interrupted_by).__name__}: {reader.interrupted_by}"
            )[:500]
            logger.warning("push read interrupted", extra={"resource": "measurements", "error": self.rep.detail})
        # A read whose every row was acknowledged may have had more behind it.
        more = self.acknowledged == max_rows and not self.out_of_time and reader.interrupted_by is None
        return self.cursor, self.sent, not more

    def _post(self, flights: InFlight[_Batch]) -> None:
        batch, self.ready = self.ready, None
        assert batch is not None
        page = batch.page
        cursor_text = page.cursor.encode()
        batch_id = batch_id_of("measurements", batch.before.encode(), cursor_text, page.count)
        client = self.rules.client
        flights.post(batch, lambda: client.post_batch("measurements", batch.body, cursor_text, batch_id))
        if self.reading and self.rules.clock() >= self.deadline:
            # The batch in hand goes out; no new one is read.
            self.reading, self.out_of_time = False, True
            self.rep.detail = OUT_OF_TIME

    def _read(self, reader: MeasurementReader) -> None:
        state = self.state
        page = reader.page(self.rules.size(state))
        self.rules.checkpoints.reached("after_read", "measurements")
        if not page.count:
            self.reading = False
            return
        batch = _Batch(page, gzip_body(page.body()), self.position)
        if self.rules.too_big(state, self.owner, page.count, len(batch.body)):
            reader.give_back(page.rows)  # read again, smaller
            return
        self.ready, self.position, self.reading = batch, page.cursor, page.full

    def _take_oldest(self, reader: MeasurementReader, flights: InFlight[_Batch]) -> bool:
        """The oldest batch's answer, by the rules; False when it was not acknowledged."""
        batch, answer = flights.oldest()
        page = batch.page
        reply = self.rules.take_answer(
            self.state, self.owner, self.rep, "measurements", answer, page.count, len(batch.body), page.cursor
        )
        if reply is None:  # 413: halved; these rows and the later ones again, smaller
            later = flights.drop() + ([self.ready] if self.ready else [])
            reader.give_back([row for b in (batch, *later) for row in b.page.rows])
            self.ready, self.position, self.reading = None, batch.before, True
            return True
        if not 200 <= reply.status < 300:
            flights.drop()
            return False
        self.cursor = page.cursor
        self.sent += 1
        self.acknowledged += page.count
        return True
