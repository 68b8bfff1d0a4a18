"""Data access for the push: reads the portal's sites, devices and measurements,
from the tables and columns the source mapping names (fleet.push.mapping; by default
the project's own ``monitoring.*``), in the order the cursor keeps
(fleet.push.cursor says why it never skips a row).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Generator, Iterator
from datetime import datetime
from itertools import islice
from typing import Any

import psycopg
from psycopg.types.string import TextLoader

from fleet.push.catalogue import ResolvedTable, resolve
from fleet.push.codec import AS_TEXT, TEXT_SETTINGS, MeasurementPage, Row, vouch
from fleet.push.cursor import XID_START, Cursor, Phase, key_of
from fleet.push.mapping import DEFAULT_MAPPING, Resource, SourceMapping
from fleet.push.queries import MeasurementQueries, full_set_query

# A read's snapshot, in the formats the page's JSON is written from (fleet.push.codec);
# the digests read in the same (their scan's position is read back from its text in
# another session, and a ``real`` is read through its text: the digest's value is
# the one sent).
BEGIN_SNAPSHOT = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; " + TEXT_SETTINGS


class MeasurementReader:
    """The rows after a cursor, at most ``max_rows`` of them, handed out in pages,
    all from one REPEATABLE READ snapshot (the horizon fleet.push.cursor speaks of is
    this snapshot's), which lasts while the pages are sent: a tick's read.

    Streamed: each phase is one statement, its rows sent by the server in chunks
    (libpq's chunked rows mode) while the client writes and sends the pages before
    them, instead of a statement per page that the server starts only once the page
    before it has been read (bench/README.md has the figures).

    A read that fails once some rows were handed out ends there (``interrupted_by``:
    a statement timeout, or an idle-in-transaction timeout or a lost connection while
    a batch was being sent): the push sends what it has and the next tick reads on
    from its cursor. One that fails before raises.
    """

    def __init__(
        self, conn: psycopg.Connection, cursor: Cursor, max_rows: int, queries: MeasurementQueries | None = None
    ) -> None:
        self._conn = conn
        self._queries = queries  # None: the default tables'
        self._position = cursor
        self._phase: Phase = cursor.phase
        self._left = max_rows  # rows the statements may still return
        self._back: list[Row] = []  # rows handed back: handed out again first
        self._rows: Iterator[Row] | None = None
        self._handed = 0  # rows handed out and not handed back
        self._transaction: contextlib.AbstractContextManager[psycopg.Transaction] | None = None
        self.interrupted_by: psycopg.Error | None = None

    def __enter__(self) -> MeasurementReader:
        if self._queries is None:
            self._queries = MeasurementQueries(resolve(self._conn, DEFAULT_MAPPING, "measurements"))
        self._transaction = transaction = self._conn.transaction()
        transaction.__enter__()
        try:
            self._conn.execute(BEGIN_SNAPSHOT)
        except BaseException:
            transaction.__exit__(*sys.exc_info())
            raise
        self._stream(self._position)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close_stream()
        assert self._transaction is not None
        try:
            self._transaction.__exit__(*exc)
        except psycopg.OperationalError as error:
            if exc[0] is not None or not self._handed:
                raise
            # The snapshot is read-only: not closing it loses nothing.
            self.interrupted_by = self.interrupted_by or error

    def page(self, limit: int) -> MeasurementPage:
        """Up to ``limit`` rows after the last handed out."""
        rows = self._back[:limit]
        del self._back[:limit]
        while len(rows) < limit and self._rows is not None:
            want = limit - len(rows)
            try:
                got = list(islice(self._rows, want))
            except psycopg.Error as error:
                self._rows = None
                if not rows and not self._handed:
                    raise
                self.interrupted_by = error
                break
            rows += got
            self._left -= len(got)
            if len(got) < want:  # this phase's statement has returned every row
                self._close_stream()
                if self._phase == "legacy" and self._left > 0:
                    self._stream(XID_START)
        self._handed += len(rows)
        if rows:
            self._position = key_of(rows[-1])
        return MeasurementPage(rows, self._position, limit, vouch(rows))

    def give_back(self, rows: list[Row]) -> None:
        """Rows handed out and not sent (a 413 splits them): handed out again first."""
        self._back[:0] = rows
        self._handed -= len(rows)

    def _stream(self, after: Cursor) -> None:
        self._phase = after.phase
        params = {"xid": str(after.xid), "time": after.time, "device": after.device, "limit": self._left}
        cur = self._conn.cursor()
        for name in AS_TEXT:
            cur.adapters.register_loader(name, TextLoader)
        assert self._queries is not None
        self._rows = cur.stream(self._queries.select[after.phase], params, size=_CHUNK_ROWS)

    def _close_stream(self) -> None:
        """End the running statement. One whose every row was taken has only its end
        left to read; any other is cancelled (a request on a connection of its own)."""
        rows, self._rows = self._rows, None
        if not isinstance(rows, Generator):
            return
        if self._left == 0:
            with contextlib.suppress(psycopg.Error):
                for _ in rows:
                    break
        rows.close()


_CHUNK_ROWS = 1000  # rows per libpq result while streaming


def read_measurements(
    conn: psycopg.Connection, cursor: Cursor, limit: int, queries: MeasurementQueries | None = None
) -> MeasurementPage:
    """One page of up to ``limit`` rows after ``cursor``, in a snapshot of its own."""
    with MeasurementReader(conn, cursor, limit, queries) as reader:
        return reader.page(limit)


def _oldest_unpushed(conn: psycopg.Connection, queries: MeasurementQueries, cursor: Cursor) -> datetime | None:
    with conn.transaction():
        if cursor.phase == "legacy":
            row = conn.execute(queries.oldest["legacy"], _params(cursor)).fetchone()
            if row:
                return row[0]
            cursor = XID_START
        row = conn.execute(queries.oldest["xid"], _params(cursor)).fetchone()
    return row[0] if row else None


def _params(cursor: Cursor) -> dict[str, str]:
    return {"xid": str(cursor.xid), "time": cursor.time, "device": cursor.device}


def _read_full_set(conn: psycopg.Connection, table: ResolvedTable) -> list[dict[str, Any]]:
    """Every row of a portal table, by id, as items (``updated_at`` in ISO form)."""
    query, names = full_set_query(table)
    with conn.transaction():
        rows = conn.execute(query).fetchall()
    items = [dict(zip(names, r, strict=True)) for r in rows]
    for item in items:
        item["updated_at"] = _iso(item["updated_at"])
    return items


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


class PortalSource:
    """The portal's sites, devices and measurements where the mapping says they are.

    Each read looks its table up in the catalogue first (one small query), so a
    table that changed since is read as it is now, and one that no longer fits the
    mapping fails that resource alone, with a message that names what is wrong.
    """

    def __init__(self, mapping: SourceMapping = DEFAULT_MAPPING) -> None:
        self.mapping = mapping

    def table(self, conn: psycopg.Connection, resource: Resource) -> ResolvedTable:
        return resolve(conn, self.mapping, resource)

    def measurements(self, conn: psycopg.Connection) -> MeasurementQueries:
        return MeasurementQueries(self.table(conn, "measurements"))

    def reader(self, conn: psycopg.Connection, cursor: Cursor, max_rows: int) -> MeasurementReader:
        return MeasurementReader(conn, cursor, max_rows, self.measurements(conn))

    def read_full_set(self, conn: psycopg.Connection, resource: Resource) -> list[dict[str, Any]]:
        return _read_full_set(conn, self.table(conn, resource))

    def oldest_unpushed(self, conn: psycopg.Connection, cursor: Cursor) -> tuple[bool, datetime | None]:
        """Whether the portal has a ``received_at`` to tell the lag by, and that of the
        next row the push will send."""
        queries = self.measurements(conn)
        if not queries.reports_lag:
            return False, None
        return True, _oldest_unpushed(conn, queries, cursor)
