"""Load shedding of the ingest, per customer, before the database suffers.

Each batch's write holds a ticket from ``fleet.ingest_admit`` (sql/admin/030_*): at
most ``per_customer`` batches of one customer at once, and ``total`` over all of
them, with a quarter of the total kept for customers that were admitted nothing for
``fresh_ms`` (live data comes a batch or two a minute; a backfill batch after batch),
so a thousand back-filling customers never starve another's live rows. Past it the
batch is answered 429 with Retry-After (nothing was written; the client sends it
again). The server advertises ``per_customer`` in its ledger answer, and the push
keeps no more batches in flight than that.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import psycopg

from fleet.db import ConnectionHolder
from fleet.errors import DatabaseBusy, DatabaseUnavailable, Overloaded
from fleet.observability import logger, metrics


class Admission:
    def __init__(
        self,
        connections: ConnectionHolder,
        per_customer: int,
        total: int,
        lease_ms: int,
        retry_after_s: int,
        fresh_ms: int = 10_000,
    ) -> None:
        self.connections = connections
        self.per_customer = per_customer
        self.total = total
        self.lease_ms = lease_ms  # a ticket never handed back (a crashed invocation) ends by itself
        self.retry_after_s = retry_after_s
        self.fresh_ms = fresh_ms

    @contextmanager
    def slot(self, customer_id: str) -> Iterator[None]:
        """Hold a ticket for the block, or refuse with 429."""
        ticket = self.connections.run(lambda conn: self._admit(conn, customer_id))
        if ticket is None:
            metrics.add_metric(name="LoadShed", unit="Count", value=1)
            logger.info("batch shed", extra={"customer_id": customer_id})
            raise Overloaded(
                f"too many batches in flight (at most {self.per_customer} per customer); retry later",
                retry_after=self.retry_after_s,
            )
        try:
            yield
        finally:
            try:
                self.connections.run(lambda conn: self._release(conn, customer_id, ticket))
            except (DatabaseBusy, DatabaseUnavailable, psycopg.Error) as exc:
                logger.warning("ticket not handed back; its lease ends it", extra={"error": str(exc)})

    def _admit(self, conn: psycopg.Connection, customer_id: str) -> datetime | None:
        row = conn.execute(
            "SELECT fleet.ingest_admit(%s, %s, %s, %s, %s)",
            (customer_id, self.per_customer, self.total, self.lease_ms, self.fresh_ms),
        ).fetchone()
        return None if row is None else row[0]

    def _release(self, conn: psycopg.Connection, customer_id: str, ticket: datetime) -> None:
        conn.execute("SELECT fleet.ingest_release(%s, %s)", (customer_id, ticket))
