"""The digests' statements on the portal: the changed-days scan, a day's digests and
a device-day's rows to re-send, for the measurements table as the source mapping and
the catalogue have it."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
from psycopg import sql

from fleet.models import MEASUREMENT_FIELDS, WHITE_SPACE
from fleet.push.catalogue import ResolvedTable
from fleet.push.mapping import CURSOR_COLUMN
from fleet.push.queries import cursor_key, number_expression
from fleet.reconcile import RowColumns, digest_sql, row_hash_sql

_FIRST_DAY, _LAST_DAY = "0001-01-02", "9999-12-30"  # what a date and RFC 3339 both hold
_PHASES = ("legacy", "xid")

# The days of the rows past the last scan's position, up to the cursor, in the
# cursor's order (its index), a bounded chunk at a time; and the chunk's last key.
_CHANGED = """
WITH chunk AS MATERIALIZED (
    SELECT {xid} AS x, {at} AS t, {device} AS d FROM {table}
    WHERE {where} ORDER BY {order} LIMIT %(limit)s
)
SELECT g.d, g.day, l.x, l.t, l.d, (SELECT count(*) FROM chunk)
FROM (SELECT x::text, t::text, d::text FROM chunk ORDER BY x DESC, t DESC, d DESC LIMIT 1) l
LEFT JOIN (SELECT d::text AS d, (t AT TIME ZONE 'UTC')::date AS day FROM chunk
           WHERE d IS NOT NULL AND t >= '{first}' AND t < '{last}' GROUP BY 1, 2) g ON true
"""


# Devices by a loose scan of an index that leads with the device id: one probe a
# device (PostgreSQL 15 has no skip scan), never the table.
_DEVICES = """
WITH RECURSIVE d(v) AS (
    (SELECT {col} FROM {table} WHERE {col} IS NOT NULL ORDER BY {col} LIMIT 1)
    UNION ALL
    SELECT (SELECT {col} FROM {table} WHERE {col} > d.v ORDER BY {col} LIMIT 1) FROM d WHERE d.v IS NOT NULL
)
SELECT v::text FROM d WHERE v IS NOT NULL
"""
# A `timestamp` column's local times against a UTC day's bounds: the mapping's zone
# can shift a local time from its instant by up to a day at an offset change (Pacific/
# Apia skipped a day), so the bound on the column itself is this much wider; the
# bound on the instant (the expression sent) stays exact.
_LOCAL_PAD = "1 day"


class DigestQueries:
    """The digests' statements for the measurements table as the source mapping and
    the catalogue have it (fleet.push.queries.MeasurementQueries is the push's own):
    the time as timestamptz (a ``timestamp`` read in the mapping's zone), the device
    id as text, each metric as float8 in the contract's unit, scale applied: the very
    expressions the push sends, so the digest is that of what the ingest stores.

    A day's rows are read by indexes only (``table.day_index``, found by the
    catalogue): the rows from before the cursor column (push_xid NULL) by the cursor's
    index, the others by the portal's own index that leads with the time (or with the
    device id and the time: then a device at a time) or by the opt-in day index. On a
    portal's own index the statements also bound the columns as they are (a
    ``timestamp`` in local time, an integer device id), which is what that index
    holds. Without such an index ``days_by`` is None and there are no day statements:
    reconciliation is off (fleet.push.digests says so)."""

    def __init__(self, table: ResolvedTable, conn: psycopg.Connection) -> None:
        def text(part: sql.Composable) -> str:
            # Fragments of statements that take %(name)s parameters: a quoted name
            # holding "%" must not read as one.
            return part.as_string(conn).replace("%", "%%")

        at, device = (text(e) for e in cursor_key(table))
        self._at, self._device = at, device
        self._xid = text(sql.Identifier("src", CURSOR_COLUMN))
        self._metrics = tuple(text(number_expression(table, m)) for m in MEASUREMENT_FIELDS)
        self._source = text(sql.SQL("{} AS src").format(table.ident))
        self.table = table
        self.columns = RowColumns(at, device, self._metrics)
        index = table.day_index
        self.days_by = index.by if index is not None else None
        self._raw = ""
        self.devices = ""
        if index is not None and index.raw:
            self._raw = self._raw_bounds(table, text, index.by == "device")
        if index is not None and index.by == "device":
            column = table.column("device_id")
            assert column is not None  # a required field: the catalogue has it
            self.devices = _DEVICES.format(col=text(sql.Identifier("src", column.name)), table=self._source)
        self.digest = {(phase, some): self._digest(phase, some) for phase in _PHASES for some in (False, True)}
        self.resend = {phase: self._resend(phase) for phase in _PHASES}
        self.changed = {(phase, upto): self._changed(phase, upto) for phase in _PHASES for upto in (False, True)}

    @staticmethod
    def _raw_bounds(table: ResolvedTable, text: Callable[[sql.Composable], str], by_device: bool) -> str:
        """The day's bounds (and the devices) on the mapped columns as they are, for
        the portal's own index."""
        at, device = table.column("time"), table.column("device_id")
        assert at is not None and device is not None  # required fields
        column = text(sql.Identifier("src", at.name))
        if at.base == "timestamptz":
            bounds = ""  # the expression sent is the column itself
        elif table.time_zone == "UTC":
            bounds = f" AND {column} >= %(start)s::timestamptz AT TIME ZONE 'UTC'"
            bounds += f" AND {column} <= %(last)s::timestamptz AT TIME ZONE 'UTC'"
        else:
            zone = text(sql.Literal(table.time_zone))
            pad = f"interval '{_LOCAL_PAD}'"
            bounds = f" AND {column} >= timezone({zone}, %(start)s::timestamptz) - {pad}"
            bounds += f" AND {column} <= timezone({zone}, %(last)s::timestamptz) + {pad}"
        if by_device and device.base != "text":
            own = text(sql.Identifier("src", device.name))
            # Only ids the portal's own rows hold are asked for (the devices statement's).
            bounds += f" AND {own} = ANY(CAST(%(devices)s::text[] AS {text(sql.SQL(device.type))}[]))"
        return bounds

    def _day_rows(self, phase: str, some_devices: bool, columns: str, also: str = "") -> str:
        """The ingestible rows of one day the cursor has passed (of some devices)."""
        at, device, xid = self._at, self._device, self._xid
        # Rows the ingest stores: a device id of 1..64 characters, not only whitespace
        # (fleet.models.CLIENT_ID), finite metrics.
        ingestible = " AND ".join(
            [
                f"{device} IS NOT NULL",
                f"length({device}) BETWEEN 1 AND 64",
                f"{device} ~ '[^{WHITE_SPACE}]'",
                *(f"coalesce(abs({m}) < 'Infinity'::float8, true)" for m in self._metrics),
            ]
        )
        # Rows the measurement cursor has passed (fleet.push.source's order: legacy rows
        # first), in two parts, each read by its own partial index on (time, device
        # id): rows from before the cursor column (push_xid NULL: the legacy index)
        # and the others (the day index).
        behind = {
            "legacy": [f"{xid} IS NULL AND ({at}, {device}) <= (%(ct)s::timestamptz, %(cd)s)"],
            "xid": [
                f"{xid} IS NULL",
                f"{xid} IS NOT NULL AND ({xid}, {at}, {device}) <= (%(cx)s::xid8, %(ct)s::timestamptz, %(cd)s)",
            ],
        }
        devices = f" AND {device} = ANY(%(devices)s::text[])" if some_devices else ""
        if some_devices or self.days_by != "device":
            also += self._raw
        return " UNION ALL ".join(
            f"SELECT {columns} FROM {self._source} WHERE {part} AND {at} >= %(start)s AND {at} <= %(last)s"
            f" AND {ingestible}{devices}{also}"
            for part in behind[phase]
        )

    def _digest(self, phase: str, some_devices: bool) -> str:
        """Each device's digest of one day (of some devices)."""
        row = f"{self._device} AS device_id, {row_hash_sql(self.columns)} AS h"
        rows = self._day_rows(phase, some_devices, row)
        return f"SELECT device_id, {digest_sql('h')} FROM ({rows}) r GROUP BY device_id"

    def _resend(self, phase: str) -> str:
        """One device-day's rows after a time, as a request body: PostgreSQL's JSON of
        the values (times with their offset, float8 in their shortest exact digits)."""
        at = self._at
        item = (
            f"{at} AS t, json_build_object('time', {at}, 'device_id', {self._device}, "
            + ", ".join(f"'{name}', {m}" for name, m in zip(MEASUREMENT_FIELDS, self._metrics, strict=True))
            + ")::text AS item"
        )
        after = f" AND {at} > %(after)s::timestamptz"
        return (
            "SELECT count(*), max(t)::text,"
            " '{\"items\":[' || coalesce(string_agg(item, ',' ORDER BY t), '') || ']}'"
            f" FROM (SELECT t, item FROM ({self._day_rows(phase, True, item, after)}) u"
            " ORDER BY t LIMIT %(limit)s) c"
        )

    def _changed(self, phase: str, upto: bool) -> str:
        """The changed-days scan's chunk after its position (up to the cursor)."""
        at, device, xid = self._at, self._device, self._xid
        where = {
            "legacy": f"{xid} IS NULL AND ({at}, {device}) > (%(pt)s::timestamptz, %(pd)s)",
            "xid": f"{xid} IS NOT NULL AND ({xid}, {at}, {device}) > (%(px)s::xid8, %(pt)s::timestamptz, %(pd)s)",
        }[phase]
        upto_where = {
            "legacy": f" AND ({at}, {device}) <= (%(ct)s::timestamptz, %(cd)s)",
            "xid": f" AND ({xid}, {at}, {device}) <= (%(cx)s::xid8, %(ct)s::timestamptz, %(cd)s)",
        }[phase]
        order = f"{xid}, {at}, {device}"  # the cursor index's (push_xid is NULL in the legacy phase)
        return _CHANGED.format(
            xid=xid,
            at=at,
            device=device,
            table=self._source,
            where=where + (upto_where if upto else ""),
            order=order,
            first=_FIRST_DAY,
            last=_LAST_DAY,
        )
