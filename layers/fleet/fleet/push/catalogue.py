"""The source mapping checked against the portal database's catalogue: each resource's
table and columns as they are, or every problem with them named."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

import psycopg
from psycopg import sql

from fleet.push.mapping import (
    CURSOR_COLUMN,
    FIELDS,
    FieldSpec,
    Kind,
    MappingError,
    Resource,
    SourceMapping,
    TableMapping,
    quote,
)

# Base type names (a domain counts as its base type) by what the push can do with them.
_ACCEPTED: dict[Kind, frozenset[str]] = {
    "id": frozenset({"text", "varchar", "bpchar", "name", "citext", "int2", "int4", "int8", "uuid", "numeric"}),
    "text": frozenset({"text", "varchar", "bpchar", "name", "citext"}),
    "time": frozenset({"timestamptz", "timestamp"}),
    "number": frozenset({"float4", "float8", "numeric", "int2", "int4", "int8"}),
}
_RELKINDS = {"r": "table", "p": "partitioned table", "v": "view", "m": "materialized view", "f": "foreign table"}

_TABLE_QUERY = """
SELECT c.oid, c.relkind::text, has_table_privilege(c.oid, 'SELECT'), pg_has_role(c.relowner, 'USAGE')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = %s AND c.relname = %s
"""
_COLUMNS_QUERY = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod),
       (SELECT b.typname FROM pg_type b
         WHERE b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END)::text,
       a.attnotnull
  FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
 WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
"""


# The portal's valid indexes on the measurements table, with what each leads with.
_INDEXES_QUERY = """
SELECT c.relname, am.amname, i.indpred IS NULL,
       i.indkey[0] = t.attnum,
       i.indnkeyatts > 1 AND i.indkey[0] = d.attnum AND i.indkey[1] = t.attnum
  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
  LEFT JOIN pg_attribute t ON t.attrelid = i.indrelid AND t.attname = %(time)s
  LEFT JOIN pg_attribute d ON d.attrelid = i.indrelid AND d.attname = %(device)s
 WHERE i.indrelid = %(oid)s AND i.indisvalid AND i.indisready
 ORDER BY c.relname
"""
DAY_INDEX_SUFFIX = "push_day_idx"  # the opt-in day index (mapping: reconcile_day_index)
LEGACY_INDEX_SUFFIX = "push_legacy_idx"  # an earlier version's; the cursor index serves its reads


def index_name(table: str, suffix: str) -> str:
    """``<table>_<suffix>`` within PostgreSQL's 63 bytes (a long name keeps a hash)."""
    name = f"{table}_{suffix}"
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.sha256(table.encode()).hexdigest()[:8]
    head = table.encode()[: 63 - len(suffix) - 10].decode(errors="ignore")
    return f"{head}_{digest}_{suffix}"


@dataclass(frozen=True)
class DayIndex:
    """An index reconciliation reads one UTC day of the measurements by.

    ``by``: ``time``, one range of time (the index leads with the time); ``device``,
    per device a range of time (it leads with (device id, time)). ``raw``: it is on
    the mapped columns themselves, so the digests' statements add a bound on the
    columns as they are, besides the one on the expressions sent; otherwise it is the
    opt-in day index, built on those very expressions."""

    name: str
    by: Literal["time", "device"]
    raw: bool


@dataclass(frozen=True)
class Column:
    name: str  # as the catalogue spells it
    type: str  # as format_type writes it
    base: str  # the base type's name: text, int4, timestamptz, float8, ...
    not_null: bool

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.name)


@dataclass(frozen=True)
class ResolvedTable:
    """A resource's table as the catalogue has it: what the queries are built from."""

    resource: Resource
    schema: str
    name: str
    relkind: str
    columns: dict[str, Column | None]  # per field; None: not in the portal
    factors: dict[str, Decimal]
    time_zone: str
    cursor: Column | None  # push_xid (measurements)
    owned: bool  # the connected role may ALTER it (add the cursor column, its indexes)
    day_index: DayIndex | None = None  # measurements: what reconciliation reads a day by
    indexes: tuple[str, ...] = ()  # measurements: the names of its valid indexes

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def plain(self) -> str:
        return f"{self.schema}.{self.name}"

    def column(self, field_name: str) -> Column | None:
        return self.columns.get(field_name)


@dataclass(frozen=True)
class Finding:
    resource: Resource
    field: str | None
    message: str
    error: bool = True

    def __str__(self) -> str:
        where = f"{self.resource}.{self.field}" if self.field else self.resource
        return f"{where}: {self.message}"


@dataclass
class CheckReport:
    """What the catalogue says of a mapping: a table per resource, errors, notices."""

    findings: list[Finding] = field(default_factory=list)
    tables: dict[Resource, ResolvedTable | None] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.error]

    @property
    def notices(self) -> list[Finding]:
        return [f for f in self.findings if not f.error]

    def errors_of(self, resource: Resource) -> list[Finding]:
        return [f for f in self.errors if f.resource == resource]

    def raise_for_errors(self) -> None:
        if self.errors:
            raise MappingError(describe(self.errors))


def describe(findings: list[Finding]) -> str:
    lines = [f"- {f}" for f in findings]
    count = f"{len(findings)} problem{'' if len(findings) == 1 else 's'}"
    return f"the source mapping does not fit the portal database ({count}):\n" + "\n".join(lines)


def check(
    conn: psycopg.Connection,
    mapping: SourceMapping,
    resources: tuple[Resource, ...] = ("sites", "devices", "measurements"),
    *,
    absent_ok: bool = False,
    need_cursor: bool = True,
) -> CheckReport:
    """Check the mapping against the catalogue: tables exist, columns exist and have a
    usable type; key columns that allow NULL are said (notices). ``absent_ok``: a
    table that does not exist is not an error (the default tables, before the client
    migrations create them). ``need_cursor``: the measurements table must already
    have its cursor column (the push), rather than be ready to get it (the bootstrap).
    """
    report = CheckReport()
    if not _known_zone(conn, mapping.time_zone):
        report.findings.append(
            Finding(resources[0], None, f"time_zone {mapping.time_zone!r} is not a time zone this server knows")
        )
    for resource in resources:
        report.tables[resource] = _check_table(conn, mapping, resource, report, absent_ok, need_cursor)
    return report


def _known_zone(conn: psycopg.Connection, zone: str) -> bool:
    """Whether the server reads times in this zone (cheaper than pg_timezone_names,
    which reads every zone's file)."""
    try:
        with conn.transaction():
            conn.execute("SELECT timezone(%s::text, now())", (zone,))
    except (psycopg.errors.InvalidParameterValue, psycopg.errors.DataException):
        return False
    return True


def _check_table(
    conn: psycopg.Connection,
    mapping: SourceMapping,
    resource: Resource,
    report: CheckReport,
    absent_ok: bool,
    need_cursor: bool,
) -> ResolvedTable | None:
    table = mapping.table(resource)
    schema, name = table.qualified

    def problem(message: str, field_name: str | None = None, error: bool = True) -> None:
        report.findings.append(Finding(resource, field_name, message, error))

    row = conn.execute(_TABLE_QUERY, (schema, name)).fetchone()
    if row is None:
        if not absent_ok:
            problem(f"table {table.table} does not exist")
        return None
    oid, relkind, readable, owned = row
    kind = _RELKINDS.get(relkind)
    if kind is None:
        problem(f"{table.table} is not a table or view (relkind {relkind})")
        return None
    if resource == "measurements" and relkind != "r":
        problem(
            f"{table.table} is a {kind}: the push needs a plain table, to which it adds its cursor column "
            f"({CURSOR_COLUMN}) and builds its indexes concurrently"
        )
    if not readable:
        problem(f"the connected role may not SELECT from {table.table}")
    catalogue = {r[0]: Column(r[0], r[1], r[2], bool(r[3])) for r in conn.execute(_COLUMNS_QUERY, (oid,))}
    columns = {spec.name: _check_column(table, spec, catalogue, problem) for spec in FIELDS[resource]}
    cursor = catalogue.get(CURSOR_COLUMN) if resource == "measurements" else None
    if resource == "measurements":
        _check_cursor(table, cursor, need_cursor, bool(owned), problem)
    indexes: tuple[str, ...] = ()
    day_index = None
    if resource == "measurements" and relkind == "r":
        indexes, day_index = _day_index(conn, oid, name, columns)
        for notice in _index_notices(mapping, schema, name, columns, indexes, day_index):
            problem(notice, error=False)
    return ResolvedTable(
        resource,
        schema,
        name,
        relkind,
        columns,
        {spec.name: table.factor(spec.name) for spec in FIELDS[resource] if spec.kind == "number"},
        mapping.time_zone,
        cursor,
        bool(owned),
        day_index,
        indexes,
    )


def _check_cursor(
    table: TableMapping, cursor: Column | None, need_cursor: bool, owned: bool, problem: Callable[..., None]
) -> None:
    if cursor is not None and cursor.base != "xid8":
        problem(f"column {CURSOR_COLUMN} exists and is {cursor.type}; the push's cursor column must be xid8")
    elif cursor is None and need_cursor:
        problem(
            f"the cursor column {CURSOR_COLUMN} is missing from {table.table}: "
            "run the client bootstrap (fleet db migrate --role client) with this mapping"
        )
    elif cursor is None and not owned:
        problem(f"the connected role does not own {table.table}, so it cannot add the cursor column")


def _day_index(
    conn: psycopg.Connection, oid: int, table: str, columns: dict[str, Column | None]
) -> tuple[tuple[str, ...], DayIndex | None]:
    """The table's valid indexes, and the one reconciliation reads a UTC day by: the
    opt-in day index when it is there, else one of the portal's own that leads with the
    time column (a B-tree before a BRIN), else one on (device id, time). A partial index
    of the portal's own is not used (its predicate need not hold the day's rows)."""
    at, device = columns.get("time"), columns.get("device_id")
    params = {"oid": oid, "time": at.name if at else None, "device": device.name if device else None}
    rows = conn.execute(_INDEXES_QUERY, params).fetchall()
    names = tuple(str(r[0]) for r in rows)
    own = index_name(table, DAY_INDEX_SUFFIX)
    if own in names:
        return names, DayIndex(own, "time", raw=False)
    for wanted in ("btree", "brin"):
        for name, method, whole, leads_with_time, _ in rows:
            if method == wanted and whole and leads_with_time:
                return names, DayIndex(name, "time", raw=True)
    for name, method, whole, _, device_then_time in rows:
        if method == "btree" and whole and device_then_time:
            return names, DayIndex(name, "device", raw=True)
    return names, None


def day_index_statement(schema: str, table: str, columns: dict[str, Column | None]) -> str:
    """The index an operator may create for reconciliation's days: on the time column
    as it is (useful to the portal's own queries by time, too)."""
    at = columns.get("time")
    return f"CREATE INDEX CONCURRENTLY ON {quote(schema)}.{quote(table)} ({quote(at.name if at else 'time')})"


def _index_notices(
    mapping: SourceMapping,
    schema: str,
    table: str,
    columns: dict[str, Column | None],
    indexes: tuple[str, ...],
    day_index: DayIndex | None,
) -> list[str]:
    """What the operator should act on about the indexes reconciliation reads by (the
    contract: the client bootstrap adds only the cursor column and its index); none
    when a usable index is in place and nothing of an earlier version is left."""
    notices = []
    legacy = index_name(table, LEGACY_INDEX_SUFFIX)
    if not mapping.is_default and legacy in indexes:
        notices.append(
            f"index {schema}.{legacy} was built by an earlier version of the client bootstrap; the cursor's index "
            f"now serves the rows from before the cursor column too, so it is not needed: "
            f"DROP INDEX CONCURRENTLY {quote(schema)}.{quote(legacy)} removes it"
        )
    create = day_index_statement(schema, table, columns)
    if day_index is None:
        notices.append(
            "reconciliation is off: no index of the table reads one UTC day of measurements (none leads with the "
            f"time column, or with the device id and then the time); create one ({create}), or set "
            '"reconcile_day_index": true under measurements in the source mapping and the client bootstrap '
            f"builds {schema}.{index_name(table, DAY_INDEX_SUFFIX)} concurrently"
        )
    elif day_index.name == index_name(table, DAY_INDEX_SUFFIX) and not mapping.measurements.reconcile_day_index:
        notices.append(
            f"index {schema}.{day_index.name} was built by an earlier version of the client bootstrap for "
            "reconciliation; the contract does not require it and the bootstrap no longer builds it unless the "
            'mapping says "reconcile_day_index": true. Reconciliation reads days by it while it exists; '
            f"DROP INDEX CONCURRENTLY {quote(schema)}.{quote(day_index.name)} removes it (reconciliation then "
            f"needs an index of the portal's own that leads with the time, e.g. {create}, or it is off)"
        )
    return notices


def _check_column(
    table: TableMapping, spec: FieldSpec, catalogue: dict[str, Column], problem: Callable[..., None]
) -> Column | None:
    wanted = table.column(spec.name)
    if wanted is None:
        return None
    col = catalogue.get(wanted)
    if col is None:
        hint = next((c for c in catalogue if c.lower() == wanted.lower()), None)
        extra = f"; did you mean {quote(hint)} (write it quoted: {json.dumps(quote(hint))})" if hint else ""
        optional = "" if spec.required else " (map it to null if the portal has no such column)"
        problem(f"column {quote(wanted)} does not exist in {table.table}{extra}{optional}", spec.name)
        return None
    if col.base not in _ACCEPTED[spec.kind]:
        accepted = ", ".join(sorted(_ACCEPTED[spec.kind]))
        problem(f"column {quote(col.name)} is {col.type}, not a type usable for it ({accepted})", spec.name)
    elif spec.required and not col.not_null:
        problem(_null_consequence(table.resource, spec.name, col), spec.name, error=False)
    return col


def _null_consequence(resource: Resource, field_name: str, col: Column) -> str:
    if resource == "measurements":
        return (
            f"column {quote(col.name)} allows NULL: a row with NULL there is sent and refused by the Admin "
            "(rejected with a reason), and a later row of the same transaction without a key may stay behind"
        )
    return f"column {quote(col.name)} allows NULL: a row with NULL there is sent and refused by the Admin"


def resolve(conn: psycopg.Connection, mapping: SourceMapping, resource: Resource) -> ResolvedTable:
    """One resource's table, checked; MappingError names every problem of it."""
    report = check(conn, mapping, (resource,))
    table = report.tables.get(resource)
    if report.errors or table is None:
        raise MappingError(describe(report.errors))
    return table
