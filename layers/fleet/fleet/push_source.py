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
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg

from fleet.models import MEASUREMENT_FIELDS

_MIN_TIME = "-infinity"


@dataclass(frozen=True)
class Cursor:
    phase: Literal["legacy", "xid"]
    xid: int = 0
    time: str = _MIN_TIME  # ISO text, or -infinity
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

# PostgreSQL writes each row's JSON itself (C, no Python object per row): by the
# benchmark the push path is several times faster this way. Timestamps come out as
# ISO 8601 with an offset, floats in their shortest exact form.
_ROW_JSON = (
    "json_build_object('time', time, 'device_id', device_id, "
    + ", ".join(f"'{name}', {name}" for name in MEASUREMENT_FIELDS)
    + ")::text"
)

_PAGE = """
WITH page AS (
    SELECT push_xid, time, device_id, {row_json} AS j
    FROM monitoring.power_measurements
    WHERE {where}
    ORDER BY {order}
    LIMIT %(limit)s
)
SELECT (SELECT string_agg(j, ',') FROM page), (SELECT count(*) FROM page), last.push_xid::text, last.time,
       last.device_id
FROM (SELECT push_xid, time, device_id FROM page ORDER BY {order_desc} LIMIT 1) AS last
"""

_LEGACY = _PAGE.format(
    row_json=_ROW_JSON,
    where="push_xid IS NULL AND (time, device_id) > (%(time)s::timestamptz, %(device)s)",
    order="time, device_id",
    order_desc="time DESC, device_id DESC",
)
_BY_XID = _PAGE.format(
    row_json=_ROW_JSON,
    where=(
        "push_xid IS NOT NULL AND (push_xid, time, device_id) > (%(xid)s::xid8, %(time)s::timestamptz, %(device)s)"
        " AND push_xid < %(horizon)s::xid8"
    ),
    order="push_xid, time, device_id",
    order_desc="push_xid DESC, time DESC, device_id DESC",
)


@dataclass
class MeasurementPage:
    items_json: list[str]  # JSON text of the rows, in parts to be joined with ","
    count: int
    cursor: Cursor  # the key of the last row read (unchanged when none)

    def body(self) -> bytes:
        """The request body: ``{"items": [...]}``."""
        return b'{"items":[' + ",".join(self.items_json).encode() + b"]}"


def read_measurements(conn: psycopg.Connection, cursor: Cursor, limit: int) -> MeasurementPage:
    """Up to ``limit`` rows after ``cursor``, in one REPEATABLE READ snapshot."""
    parts: list[str] = []
    count = 0
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        if cursor.phase == "legacy":
            row = conn.execute(_LEGACY, {"time": cursor.time, "device": cursor.device, "limit": limit}).fetchone()
            if row is not None:
                parts.append(row[0])
                count = int(row[1])
                cursor = Cursor("legacy", 0, row[3].isoformat(), row[4])
            if count == limit:
                return MeasurementPage(parts, count, cursor)
            cursor = XID_START  # legacy rows done: continue with the transaction-id order
        horizon_row = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()
        assert horizon_row is not None
        row = conn.execute(
            _BY_XID,
            {
                "xid": str(cursor.xid),
                "time": cursor.time,
                "device": cursor.device,
                "horizon": horizon_row[0],
                "limit": limit - count,
            },
        ).fetchone()
        if row is not None:
            parts.append(row[0])
            count += int(row[1])
            cursor = Cursor("xid", int(row[2]), row[3].isoformat(), row[4])
    return MeasurementPage(parts, count, cursor)


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


def read_sites(conn: psycopg.Connection) -> list[dict[str, Any]]:
    with conn.transaction():
        rows = conn.execute(
            "SELECT id, name, timezone, latitude, longitude, updated_at FROM monitoring.sites ORDER BY id"
        ).fetchall()
    return [
        {"id": r[0], "name": r[1], "timezone": r[2], "latitude": r[3], "longitude": r[4], "updated_at": _iso(r[5])}
        for r in rows
    ]


def read_devices(conn: psycopg.Connection) -> list[dict[str, Any]]:
    with conn.transaction():
        rows = conn.execute(
            "SELECT id, site_id, name, model, firmware_version, updated_at FROM monitoring.devices ORDER BY id"
        ).fetchall()
    return [
        {
            "id": r[0],
            "site_id": r[1],
            "name": r[2],
            "model": r[3],
            "firmware_version": r[4],
            "updated_at": _iso(r[5]),
        }
        for r in rows
    ]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
