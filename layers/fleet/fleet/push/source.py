"""Data access for the push: reads the portal's sites, devices and measurements,
from the tables and columns the source mapping names (fleet.push.mapping; by default
the project's own ``monitoring.*``).

The measurement cursor and why it never skips a row
----------------------------------------------------
Rows are read in a total order, keyset-paginated, and only from behind a horizon
that no transaction can still commit in front of:

* order: ``(push_xid, time, device_id)``. ``push_xid`` is the id of the
  transaction that wrote the row (``xid8 DEFAULT pg_current_xact_id()``).
* horizon: ``push_xid < pg_snapshot_xmin(pg_current_snapshot())``. Every
  transaction with an id below the snapshot's xmin has finished (committed or
  aborted), so every row that will ever carry such an id is already visible to
  this snapshot. Rows of transactions still open have ids >= xmin and wait.
* keyset: the next read starts strictly after the last key sent.

A tick reads its pages from one snapshot (``MeasurementReader``): consecutive runs
of the same ordered statement, each page's cursor the key of its last row.

So once the cursor has passed a key, no committed row can appear behind it later:
not a replay of 50,000 rows sharing one ``received_at`` (they share one xid and are
ordered by time and device inside it), not a transaction that stayed open for an
hour (its rows carry its xid, which is above the horizon until it commits), not a
transaction that began long ago and writes only now (same), wherever a batch
boundary falls. ``received_at`` cannot serve: it is the writing transaction's
*start* time, so a late commit carries an older value than rows already pushed.

Rows written before the ``push_xid`` column existed have NULL there; they are all
committed (the migration's ALTER waited for their writers) and are pushed first,
in ``(time, device_id)`` order (the ``legacy`` phase).

Two rows with the same ``(time, device_id)`` in one transaction are one row on
the Admin side (its unique key), so the keyset stepping over the second loses
nothing the Admin database could hold.

On a mapped table, ``time`` and ``device_id`` are the mapped columns in the form
they are sent (a ``timestamp`` read in the mapping's zone as timestamptz, an id of
any type as text): the keyset compares exactly what the cursor holds, and the
cursor's indexes are built on those expressions.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from itertools import islice
from typing import Any, ClassVar, Literal

import psycopg
from psycopg import sql
from psycopg.types.string import TextLoader

from fleet.models import MEASUREMENT_FIELDS
from fleet.push.mapping import DEFAULT_MAPPING, FIELDS, Column, ResolvedTable, Resource, SourceMapping, resolve

_MIN_TIME = "-infinity"
Phase = Literal["legacy", "xid"]


class UnreadableCursor(ValueError):
    """A cursor text in no format the push ever wrote (or damaged)."""


@dataclass(frozen=True)
class Cursor:
    """Where the push stands: the phase, then the keyset position in it.

    The text carries its format version ("v"). ``encode`` writes the current one;
    ``decode`` reads every version ever written (one reader each in ``_READERS``), so
    a push that is updated keeps the cursors the last one saved and the server's
    ledger holds. A new format gets a new version and a reader here; none is dropped."""

    phase: Phase
    xid: int = 0
    time: str = _MIN_TIME  # PostgreSQL's text of a timestamptz (read back as one), or -infinity
    device: str = ""

    FORMAT: ClassVar[int] = 1

    def encode(self) -> str:
        return json.dumps(
            {"v": self.FORMAT, "p": self.phase, "x": str(self.xid), "t": self.time, "d": self.device},
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, text: str | None) -> Cursor:
        """The cursor from its text; None or "" is the start. A text in no format the
        push ever wrote raises UnreadableCursor (never taken as the start silently)."""
        if not text:
            return START
        try:
            doc = json.loads(text)
            reader = _READERS.get(doc["v"]) if isinstance(doc, dict) and isinstance(doc.get("v"), int) else None
            if reader is None:
                raise ValueError(f"no cursor format {doc.get('v') if isinstance(doc, dict) else None!r}")
            return reader(doc)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UnreadableCursor(f"unreadable push cursor: {exc}") from None


def _read_v1(doc: dict[str, Any]) -> Cursor:
    """Format 1 (the first): {"v":1,"p":phase,"x":"<xid8>","t":"<timestamptz>","d":"<device>"}."""
    phase = doc["p"]
    if phase not in ("legacy", "xid"):
        raise ValueError(f"unknown phase {phase!r}")
    xid = int(doc["x"])
    if xid < 0:
        raise ValueError("negative transaction id")
    time, device = doc["t"], doc["d"]
    if not isinstance(time, str) or not _TIMESTAMPTZ_TEXT.match(time):
        raise ValueError("the time is not the text of a timestamptz")
    if not isinstance(device, str) or _UNSTORABLE.search(device):
        raise ValueError("the device id is not text PostgreSQL can hold")
    return Cursor(phase, xid, time, device)


# PostgreSQL's ISO output of a timestamptz (what the push reads back), or -infinity.
_TIMESTAMPTZ_TEXT = re.compile(
    r"-infinity\Z|\d{4,}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d{1,6})?([+-]\d\d(:\d\d){0,2}|Z)?( BC)?\Z"
)
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


_READERS: dict[int, Callable[[dict[str, Any]], Cursor]] = {1: _read_v1}


START = Cursor("legacy")
XID_START = Cursor("xid")

# A page's JSON, written from the values as PostgreSQL's own text (what COPY would
# write: no JSON functions on the server, no conversion to Python numbers or
# datetimes), one of two ways, the same JSON either way:
#
# * fast: an f-string per row (MeasurementPage.body). Exact by construction once
#   ``_vouch`` has looked at the page: timestamps in ISO form in UTC (set for the
#   transaction), metrics as the digits of their float8 (NULL, NaN and Infinity
#   written as PostgreSQL's JSON writes them), no NULL time or device id, and no
#   device id that JSON would escape.
# * exact: value by value, for a page the fast path will not vouch for; written
#   as PostgreSQL's ``json_build_object`` writes the same values
#   (tests/test_push_pages.py holds both to it).
#
# Output columns are aliased x, t, d, m0..m5, and the table's columns are referred to
# through the alias ``src``: ORDER BY a bare name would take an output column of that
# name before the table's. The queries are built from the mapping's table as the
# catalogue has it (``MeasurementQueries``); on the default tables they are
# ``SELECT push_xid, time::timestamptz, device_id::text, power_w::float8, ...
# FROM monitoring.power_measurements ... ORDER BY push_xid, time, device_id``.
_AS_TEXT = ("xid8", "timestamptz", "float8")
_CONTROL = re.compile("[\x00-\x1f]")  # what JSON escapes, besides '"' and '\\'

_XID_ORDER = "push_xid, time, device_id"  # the order on the default tables

# The snapshot, and the fast path's formats for this transaction only, and only
# where the session's own differ: a changed TimeZone or DateStyle is reported to the
# client, and a proxy may pin the connection for it. (ISO output is the same
# whatever the MDY/DMY part; any extra_float_digits above 0 gives the shortest exact
# digits.)
_SETTINGS = (
    "SELECT CASE WHEN current_setting('TimeZone') NOT IN ('UTC', 'Etc/UTC')"
    " THEN set_config('TimeZone', 'UTC', true) END,"
    " CASE WHEN left(current_setting('DateStyle'), 4) <> 'ISO,'"
    " THEN set_config('DateStyle', 'ISO, YMD', true) END,"
    " CASE WHEN current_setting('extra_float_digits')::int < 1"
    " THEN set_config('extra_float_digits', '1', true) END"
)
_BEGIN = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; " + _SETTINGS

Row = tuple[Any, ...]  # (x, t, d, m0..m5) as PostgreSQL's text; None for NULL


@dataclass
class MeasurementPage:
    rows: list[Row]
    cursor: Cursor  # the key of the last row (the reader's position when none)
    limit: int  # the most rows it could hold
    vouched: bool  # whether the fast path writes its JSON

    @property
    def count(self) -> int:
        return len(self.rows)

    @property
    def full(self) -> bool:
        """Whether more rows may follow it."""
        return len(self.rows) == self.limit

    def body(self) -> bytes:
        """The request body: ``{"items": [...]}``."""
        if not self.vouched:
            items = [_exact_item(r) for r in self.rows]
        else:
            items = [
                f'{{"time":"{r[1].replace(" ", "T")}:00","device_id":"{r[2]}","power_w":{r[3]},"voltage_v":{r[4]},'
                f'"current_a":{r[5]},"energy_wh":{r[6]},"power_factor":{r[7]},"frequency_hz":{r[8]}}}'
                for r in self.rows
            ]
        if not items:
            return b'{"items":[]}'
        # The body's ends go into its first and last items: one join makes the whole
        # text (adding them around a page's ~900 KB would copy it twice more: 0.7 ms).
        items[0] = '{"items":[' + items[0]
        items[-1] += "]}"
        text = ",".join(items)
        # Numbers are digits, ".", "-", "+" and "e": a capital N or I is a NULL (None),
        # NaN or Infinity (written as PostgreSQL's JSON writes them), or is in a device
        # id, which _vouch made sure holds none of those words.
        if self.vouched and ("N" in text or "I" in text):
            text = text.replace(":None", ":null").replace(":NaN", ':"NaN"')
            text = text.replace(":Infinity", ':"Infinity"').replace(":-Infinity", ':"-Infinity"')
        return text.encode()


class MeasurementReader:
    """The rows after a cursor, at most ``max_rows`` of them, handed out in pages,
    all from one REPEATABLE READ snapshot (the horizon of the module's docstring is
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
            self._conn.execute(_BEGIN)
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
            self._position = _key(rows[-1])
        return MeasurementPage(rows, self._position, limit, _vouch(rows))

    def give_back(self, rows: list[Row]) -> None:
        """Rows handed out and not sent (a 413 splits them): handed out again first."""
        self._back[:0] = rows
        self._handed -= len(rows)

    def _stream(self, after: Cursor) -> None:
        self._phase = after.phase
        params = {"xid": str(after.xid), "time": after.time, "device": after.device, "limit": self._left}
        cur = self._conn.cursor()
        for name in _AS_TEXT:
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


def _key(row: Row) -> Cursor:
    """The cursor of a row. A row with a NULL time or device id (a portal table older
    than the migration may allow them) has no key to step past; such rows sort last
    in their transaction (a NULL device id last among its time's), and "infinity" or
    "" stands in: the next read skips no row that has a key, and may send again the
    keyed rows of that transaction and time (the Admin counts them as duplicates).
    Another row without a key left in the same transaction stays behind; the Admin
    would refuse it anyway."""
    xid, at, device = row[:3]
    if xid is None:
        return Cursor("legacy", 0, at or "infinity", device or "")
    return Cursor("xid", int(xid), at or "infinity", device or "")


def _vouch(rows: list[Row]) -> bool:
    """Whether the fast path writes exactly what PostgreSQL's JSON would for these rows."""
    try:
        times = "".join([r[1] for r in rows])
        devices = "".join([r[2] for r in rows])
    except TypeError:  # a NULL
        return False
    if "n" in times or "B" in times:  # infinity, BC
        return False
    if '"' in devices or "\\" in devices or _CONTROL.search(devices):  # JSON escapes
        return False
    return not any(word in devices for word in ("None", "NaN", "Infinity"))


# PostgreSQL's text of a timestamptz in UTC and ISO DateStyle, and what its JSON
# writes for it: "2026-01-01 00:00:00.5+00" -> "2026-01-01T00:00:00.5+00:00".
_TIMESTAMPTZ = re.compile(r"(\S+) (\S+?)([+-]\d\d)(:\d\d)?(:\d\d)?( BC)?")
_NOT_FINITE = {"NaN": '"NaN"', "Infinity": '"Infinity"', "-Infinity": '"-Infinity"'}


def _exact_item(row: Row) -> str:
    metrics = ",".join(
        f'"{name}":{"null" if value is None else _NOT_FINITE.get(value, value)}'
        for name, value in zip(MEASUREMENT_FIELDS, row[3:], strict=True)
    )
    return f'{{"time":{_exact_time(row[1])},"device_id":{json.dumps(row[2], ensure_ascii=False)},{metrics}}}'


def _exact_time(text: str | None) -> str:
    if text is None:
        return "null"
    match = _TIMESTAMPTZ.fullmatch(text)
    if match is None:  # infinity, -infinity
        return json.dumps(text)
    day, clock, hours, minutes, seconds, era = match.groups()
    return f'"{day}T{clock}{hours}{minutes or ":00"}{seconds or ""}{era or ""}"'


# -- the portal's tables as the mapping names them ----------------------------------------
#
# Every expression comes from psycopg.sql (identifiers and literals quoted by it), built
# from the table as the catalogue has it. The cursor's key is (push_xid, time, device
# id) in the form it is sent: time as timestamptz (a ``timestamp`` column read in the
# mapping's zone), the device id as text. The cursor index is built on those very
# expressions (fleet.migrations), so the keyset and ORDER BY use it, and a key read
# back from the cursor compares exactly as it was sent, whatever the column's type.

_SRC = "src"
_FLOATS = ("float4", "float8")


def _ref(col: Column, qualified: bool) -> sql.Identifier:
    return sql.Identifier(_SRC, col.name) if qualified else col.ident


def time_expression(table: ResolvedTable, field_name: str, qualified: bool = True) -> sql.Composable:
    """A time field as timestamptz; NULL where the portal has no such column."""
    col = table.column(field_name)
    if col is None:
        return sql.SQL("NULL::timestamptz")
    if col.base == "timestamptz":
        return _ref(col, qualified)
    return sql.SQL("timezone({}, {})").format(sql.Literal(table.time_zone), _ref(col, qualified))


def text_expression(table: ResolvedTable, field_name: str, qualified: bool = True) -> sql.Composable:
    """A field as text (ids of any type are sent as text)."""
    col = table.column(field_name)
    if col is None:
        return sql.SQL("NULL::text")
    if col.base == "text":
        return _ref(col, qualified)
    return sql.SQL("{}::text").format(_ref(col, qualified))


def number_expression(table: ResolvedTable, field_name: str) -> sql.Composable:
    """A metric as float8, in the contract's unit. A ``real`` goes through its text
    (the shortest digits that read back as it: what the portal shows), not widened
    to the float8 nearest its binary value; a scaled value is multiplied exactly, as
    numeric, and rounded to float8 once."""
    col = table.column(field_name)
    if col is None:
        return sql.SQL("NULL::float8")
    ref = _ref(col, True)
    value = sql.SQL("{}::text").format(ref) if col.base == "float4" else ref
    factor = table.factors.get(field_name, Decimal(1))
    if factor == 1:
        return sql.SQL("{}::float8").format(value)
    if col.base in _FLOATS:
        value = sql.SQL("{}::text").format(ref)
    return sql.SQL("({}::numeric * {}::numeric)::float8").format(value, sql.Literal(factor))


def cursor_key(table: ResolvedTable, qualified: bool = True) -> tuple[sql.Composable, sql.Composable]:
    """The (time, device id) of the cursor's order, as sent."""
    return time_expression(table, "time", qualified), text_expression(table, "device_id", qualified)


class MeasurementQueries:
    """The reader's statements for one measurements table."""

    def __init__(self, table: ResolvedTable) -> None:
        self.table = table
        at, device = cursor_key(table)
        xid = sql.Identifier(_SRC, "push_xid")
        columns = sql.SQL(", ").join(
            [
                sql.SQL("{} AS x").format(xid),
                sql.SQL("{}::timestamptz AS t").format(at),
                sql.SQL("{}::text AS d").format(device),
                *(
                    sql.SQL("{} AS {}").format(number_expression(table, name), sql.Identifier(f"m{i}"))
                    for i, name in enumerate(MEASUREMENT_FIELDS)
                ),
            ]
        )
        source = sql.SQL("{} AS {}").format(table.ident, sql.Identifier(_SRC))
        legacy_where = sql.SQL("{xid} IS NULL AND ({at}, {device}) > (%(time)s::timestamptz, %(device)s)").format(
            xid=xid, at=at, device=device
        )
        xid_where = sql.SQL(
            "{xid} IS NOT NULL AND ({xid}, {at}, {device}) > (%(xid)s::xid8, %(time)s::timestamptz, %(device)s)"
            " AND {xid} < pg_snapshot_xmin(pg_current_snapshot())"
        ).format(xid=xid, at=at, device=device)
        legacy_order = sql.SQL("{}, {}").format(at, device)
        xid_order = sql.SQL("{}, {}, {}").format(xid, at, device)
        select = "SELECT {columns} FROM {source} WHERE {where} ORDER BY {order} LIMIT %(limit)s"
        self.select: dict[Phase, sql.Composed] = {
            "legacy": sql.SQL(select).format(columns=columns, source=source, where=legacy_where, order=legacy_order),
            "xid": sql.SQL(select).format(columns=columns, source=source, where=xid_where, order=xid_order),
        }
        received = time_expression(table, "received_at")
        oldest = "SELECT {received} FROM {source} WHERE {where} ORDER BY {order} LIMIT 1"
        without_horizon = sql.SQL(
            "{xid} IS NOT NULL AND ({xid}, {at}, {device}) > (%(xid)s::xid8, %(time)s::timestamptz, %(device)s)"
        ).format(xid=xid, at=at, device=device)
        self.oldest: dict[Phase, sql.Composed] = {
            "legacy": sql.SQL(oldest).format(received=received, source=source, where=legacy_where, order=legacy_order),
            "xid": sql.SQL(oldest).format(received=received, source=source, where=without_horizon, order=xid_order),
        }
        self.reports_lag = table.column("received_at") is not None


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


def oldest_unpushed(conn: psycopg.Connection, cursor: Cursor) -> datetime | None:
    """``received_at`` of the next row the push will send (for the lag metric), on the
    default tables."""
    return _oldest_unpushed(conn, MeasurementQueries(resolve(conn, DEFAULT_MAPPING, "measurements")), cursor)


def _full_set_query(table: ResolvedTable) -> tuple[sql.Composed, tuple[str, ...]]:
    items = []
    names = tuple(spec.name for spec in FIELDS[table.resource])
    for spec in FIELDS[table.resource]:
        if spec.kind == "time":
            value = time_expression(table, spec.name)
        elif spec.kind == "number":
            value = number_expression(table, spec.name)
        else:
            value = text_expression(table, spec.name)
        items.append(sql.SQL("{} AS {}").format(value, sql.Identifier(spec.name)))
    query = sql.SQL("SELECT {} FROM {} AS {} ORDER BY 1").format(
        sql.SQL(", ").join(items), table.ident, sql.Identifier(_SRC)
    )
    return query, names


def _read_full_set(conn: psycopg.Connection, table: ResolvedTable) -> list[dict[str, Any]]:
    """Every row of a portal table, by id, as items (``updated_at`` in ISO form)."""
    query, names = _full_set_query(table)
    with conn.transaction():
        rows = conn.execute(query).fetchall()
    items = [dict(zip(names, r, strict=True)) for r in rows]
    for item in items:
        item["updated_at"] = _iso(item["updated_at"])
    return items


def read_sites(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return _read_full_set(conn, resolve(conn, DEFAULT_MAPPING, "sites"))


def read_devices(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return _read_full_set(conn, resolve(conn, DEFAULT_MAPPING, "devices"))


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
