"""Data access for the push: reads the portal's sites, devices and measurements.

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
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg.types.string import TextLoader

from fleet.models import MEASUREMENT_FIELDS

_MIN_TIME = "-infinity"
Phase = Literal["legacy", "xid"]


@dataclass(frozen=True)
class Cursor:
    phase: Phase
    xid: int = 0
    time: str = _MIN_TIME  # PostgreSQL's text of a timestamptz (read back as one), or -infinity
    device: str = ""

    def encode(self) -> str:
        return json.dumps(
            {"v": 1, "p": self.phase, "x": str(self.xid), "t": self.time, "d": self.device},
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, text: str | None) -> Cursor:
        """The cursor from its text; None or an unreadable text is the start."""
        if not text:
            return START
        try:
            doc = json.loads(text)
            phase = doc["p"]
            if doc.get("v") != 1 or phase not in ("legacy", "xid"):
                raise ValueError("unknown cursor version")
            return cls(phase, int(doc["x"]), str(doc["t"]), str(doc["d"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"unreadable push cursor: {exc}") from None


START = Cursor("legacy")
XID_START = Cursor("xid")

# Two ways to a page's JSON, the same JSON either way:
#
# * fast: the page's values as PostgreSQL's own text (what COPY would write: no
#   JSON functions on the server, no conversion to Python numbers or datetimes),
#   put into each row's JSON by string formatting (FastRows). Exact by construction
#   once ``_vouch`` has looked at the page: timestamps in ISO form in UTC (set for
#   the transaction), metrics as the digits of their float8 (NULL, NaN and Infinity
#   written as PostgreSQL writes them), a NULL time or device id made into a value
#   that sends the page the slow way, and no device id that JSON would escape. By
#   the benchmark, several times faster.
# * slow: PostgreSQL writes each row's JSON itself (``json_build_object``), which
#   escapes anything. Taken for a page the fast path will not vouch for.
#
# Aliased: an output column named like a table column would be what ORDER BY sorts.
# The casts cost nothing on the columns 001_monitoring.sql creates.
_FAST_COLUMNS = (
    "push_xid AS x, coalesce(time, 'infinity')::timestamptz AS t, coalesce(device_id, E'\\x01')::text AS d, "
    + ", ".join(f"{name}::float8 AS m{i}" for i, name in enumerate(MEASUREMENT_FIELDS))
)
_AS_TEXT = ("xid8", "timestamptz", "float8")
_CONTROL = re.compile("[\x00-\x1f]")  # what JSON escapes, besides '"' and '\\'
_ROW_JSON = (
    "json_build_object('time', time, 'device_id', device_id, "
    + ", ".join(f"'{name}', {name}" for name in MEASUREMENT_FIELDS)
    + ")::text"
)

_LEGACY_WHERE = "push_xid IS NULL AND (time, device_id) > (%(time)s::timestamptz, %(device)s)"
_LEGACY_ORDER = "time, device_id"
_XID_WHERE = (
    "push_xid IS NOT NULL AND (push_xid, time, device_id) > (%(xid)s::xid8, %(time)s::timestamptz, %(device)s)"
    " AND push_xid < pg_snapshot_xmin(pg_current_snapshot())"
)
_XID_ORDER = "push_xid, time, device_id"
# The fast path's formats, for this transaction only, and only where the session's
# own differ: a changed TimeZone or DateStyle is reported to the client, and a proxy
# may pin the connection for it. (ISO output is the same whatever the MDY/DMY part;
# any extra_float_digits above 0 gives the shortest exact digits.)
_SETTINGS = (
    "SELECT CASE WHEN current_setting('TimeZone') NOT IN ('UTC', 'Etc/UTC')"
    " THEN set_config('TimeZone', 'UTC', true) END,"
    " CASE WHEN left(current_setting('DateStyle'), 4) <> 'ISO,'"
    " THEN set_config('DateStyle', 'ISO, YMD', true) END,"
    " CASE WHEN current_setting('extra_float_digits')::int < 1"
    " THEN set_config('extra_float_digits', '1', true) END"
)

_FAST_PAGE = "SELECT {columns} FROM monitoring.power_measurements WHERE {where} ORDER BY {order} LIMIT %(limit)s"

_JSON_PAGE = """
WITH page AS (
    SELECT push_xid, time, device_id, {row_json} AS j
    FROM monitoring.power_measurements
    WHERE {where}
    ORDER BY {order}
    LIMIT %(limit)s
)
SELECT (SELECT string_agg(j, ',') FROM page), (SELECT count(*) FROM page), last.push_xid::text, last.time::text,
       last.device_id
FROM (SELECT push_xid, time, device_id FROM page ORDER BY {order_desc} LIMIT 1) AS last
"""

_QUERIES = {
    "legacy": (
        _FAST_PAGE.format(columns=_FAST_COLUMNS, where=_LEGACY_WHERE, order=_LEGACY_ORDER),
        _JSON_PAGE.format(
            row_json=_ROW_JSON, where=_LEGACY_WHERE, order=_LEGACY_ORDER, order_desc="time DESC, device_id DESC"
        ),
    ),
    "xid": (
        _FAST_PAGE.format(columns=_FAST_COLUMNS, where=_XID_WHERE, order=_XID_ORDER),
        _JSON_PAGE.format(
            row_json=_ROW_JSON,
            where=_XID_WHERE,
            order=_XID_ORDER,
            order_desc="push_xid DESC, time DESC, device_id DESC",
        ),
    ),
}


class FastRows:
    """Rows of a page as PostgreSQL's text, vouched for by ``_vouch``: their JSON is
    written by ``json()``, after the transaction (the push formats one page while
    the next is read)."""

    __slots__ = ("rows",)

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows

    def json(self) -> str:
        text = ",".join(
            [
                f'{{"time":"{r[1].replace(" ", "T")}:00","device_id":"{r[2]}","power_w":{r[3]},"voltage_v":{r[4]},'
                f'"current_a":{r[5]},"energy_wh":{r[6]},"power_factor":{r[7]},"frequency_hz":{r[8]}}}'
                for r in self.rows
            ]
        )
        # Numbers are digits, ".", "-", "+" and "e": a capital N or I is a NULL (None),
        # NaN or Infinity (written as PostgreSQL's JSON writes them), or is in a device
        # id, which _vouch made sure holds none of those words.
        if "N" in text or "I" in text:
            text = text.replace(":None", ":null").replace(":NaN", ':"NaN"')
            text = text.replace(":Infinity", ':"Infinity"').replace(":-Infinity", ':"-Infinity"')
        return text


@dataclass
class MeasurementPage:
    # In order: rows to be written as JSON, or JSON that PostgreSQL wrote.
    parts: list[FastRows | str]
    count: int
    cursor: Cursor  # the key of the last row read (unchanged when none)
    limit: int  # the most rows it could hold

    @property
    def full(self) -> bool:
        """Whether more rows may follow it."""
        return self.count == self.limit

    def body(self) -> bytes:
        """The request body: ``{"items": [...]}``."""
        items = ",".join(part if isinstance(part, str) else part.json() for part in self.parts)
        return b'{"items":[' + items.encode() + b"]}"


def read_measurements(conn: psycopg.Connection, cursor: Cursor, limit: int) -> MeasurementPage:
    """Up to ``limit`` rows after ``cursor``, in one REPEATABLE READ snapshot.

    Pipelined: BEGIN, the settings and the page's query go to the server at once,
    and the server is at work on the page after one round trip, not four."""
    parts: list[FastRows | str] = []
    count = 0
    with conn.pipeline(), conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.execute(_SETTINGS)
        params: dict[str, Any] = {"xid": "0", "time": cursor.time, "device": cursor.device, "limit": limit}
        if cursor.phase == "legacy":
            part, got, last = _read_part(conn, "legacy", params)
            if got:
                parts.append(part)
                count = got
                cursor = last
            if count == limit:
                return MeasurementPage(parts, count, cursor, limit)
            cursor = XID_START  # legacy rows done: continue with the transaction-id order
        params = {
            "xid": str(cursor.xid),
            "time": cursor.time,
            "device": cursor.device,
            "limit": limit - count,
        }
        part, got, last = _read_part(conn, "xid", params)
        if got:
            parts.append(part)
            count += got
            cursor = last
    return MeasurementPage(parts, count, cursor, limit)


def _read_part(conn: psycopg.Connection, phase: Phase, params: dict[str, Any]) -> tuple[FastRows | str, int, Cursor]:
    """(the rows, their count, the key of the last one) of one phase of a page."""
    fast_query, json_query = _QUERIES[phase]
    with conn.cursor() as cur:
        for name in _AS_TEXT:
            cur.adapters.register_loader(name, TextLoader)
        rows = cur.execute(fast_query, params).fetchall()
    if not rows:
        return "", 0, START
    if _vouch(rows):
        xid, at, device = rows[-1][:3]
        last = Cursor(phase, int(xid) if phase == "xid" else 0, at, device)
        return FastRows(rows), len(rows), last
    row = conn.execute(json_query, params).fetchone()
    assert row is not None and row[0] is not None  # same snapshot, same rows
    last = Cursor(phase, int(row[2]) if phase == "xid" else 0, row[3], row[4])
    return row[0], int(row[1]), last


def _vouch(rows: list[tuple[Any, ...]]) -> bool:
    """Whether FastRows.json() writes exactly what PostgreSQL's JSON would for these rows."""
    times = "".join([r[1] for r in rows])
    if "n" in times or "B" in times:  # infinity (or a NULL time), BC
        return False
    devices = "".join([r[2] for r in rows])
    if '"' in devices or "\\" in devices or _CONTROL.search(devices):  # JSON escapes, or a NULL
        return False
    return not any(word in devices for word in ("None", "NaN", "Infinity"))


def oldest_unpushed(conn: psycopg.Connection, cursor: Cursor) -> datetime | None:
    """``received_at`` of the next row the push will send (for the lag metric)."""
    with conn.transaction():
        if cursor.phase == "legacy":
            row = conn.execute(
                "SELECT received_at FROM monitoring.power_measurements WHERE push_xid IS NULL"
                " AND (time, device_id) > (%s::timestamptz, %s) ORDER BY time, device_id LIMIT 1",
                (cursor.time, cursor.device),
            ).fetchone()
            if row:
                return row[0]
            cursor = XID_START
        row = conn.execute(
            "SELECT received_at FROM monitoring.power_measurements WHERE push_xid IS NOT NULL"
            " AND (push_xid, time, device_id) > (%s::xid8, %s::timestamptz, %s)"
            " ORDER BY push_xid, time, device_id LIMIT 1",
            (str(cursor.xid), cursor.time, cursor.device),
        ).fetchone()
    return row[0] if row else None


_SITE_COLUMNS = ("id", "name", "timezone", "latitude", "longitude", "updated_at")
_DEVICE_COLUMNS = ("id", "site_id", "name", "model", "firmware_version", "updated_at")


def read_sites(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return _read_full_set(conn, "monitoring.sites", _SITE_COLUMNS)


def read_devices(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return _read_full_set(conn, "monitoring.devices", _DEVICE_COLUMNS)


def _read_full_set(conn: psycopg.Connection, table: str, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every row of a portal table, by id, as items (``updated_at`` in ISO form)."""
    with conn.transaction():
        rows = conn.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY id").fetchall()
    items = [dict(zip(columns, r, strict=True)) for r in rows]
    for item in items:
        item["updated_at"] = _iso(item["updated_at"])
    return items


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
