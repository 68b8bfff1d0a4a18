"""The push's statements on the portal's tables, built from each table as the
catalogue has it (fleet.push.catalogue) and the source mapping names it.

Every expression comes from psycopg.sql (identifiers and literals quoted by it), built
from the table as the catalogue has it. The cursor's key is (push_xid, time, device
id) in the form it is sent: time as timestamptz (a ``timestamp`` column read in the
mapping's zone), the device id as text. The cursor index is built on those very
expressions (fleet.schema.portal), so the keyset and ORDER BY of both phases use it
(the legacy rows, push_xid NULL, too), and a key read
back from the cursor compares exactly as it was sent, whatever the column's type.

Output columns are aliased x, t, d, m0..m5, and the table's columns are referred to
through the alias ``src``: ORDER BY a bare name would take an output column of that
name before the table's. On the default tables the measurement statements are
``SELECT push_xid, time::timestamptz, device_id::text, power_w::float8, ...
FROM monitoring.power_measurements ... ORDER BY push_xid, time, device_id``.
"""

from __future__ import annotations

from decimal import Decimal

from psycopg import sql

from fleet.models import MEASUREMENT_FIELDS
from fleet.push.catalogue import Column, ResolvedTable
from fleet.push.cursor import Phase
from fleet.push.mapping import FIELDS

XID_ORDER = "push_xid, time, device_id"  # the order on the default tables
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
        # The legacy rows all have push_xid NULL, so ordering them by it too changes
        # nothing but lets the one cursor index (push_xid, time, device id) give their
        # (time, device id) order: IS NULL is an equality to a B-tree.
        xid_order = sql.SQL("{}, {}, {}").format(xid, at, device)
        legacy_order = xid_order
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


def full_set_query(table: ResolvedTable) -> tuple[sql.Composed, tuple[str, ...]]:
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
