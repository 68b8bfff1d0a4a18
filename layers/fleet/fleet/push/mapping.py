"""The push's source mapping: where the portal keeps sites, devices and measurements,
and the check of it against the portal database's catalogue.

A portal names things its own way (EF Core's default is quoted PascalCase:
``monitoring."PowerMeasurements"`` with ``"Time"`` and ``"DeviceId"``). The operator
writes once per Client stack a JSON file naming, for each resource, its table and for
each field its column::

    {
      "time_zone": "UTC",
      "measurements": {
        "table": "monitoring.\\"PowerMeasurements\\"",
        "columns": {"time": "\\"Time\\"", "device_id": "\\"DeviceId\\"",
                    "energy_wh": "\\"EnergyKwh\\"", "frequency_hz": null},
        "scale": {"energy_wh": "kWh"}
      }
    }

Names are SQL identifiers: unquoted ones fold to lower case, quoted ones are kept as
written; tables are schema-qualified. A field left out of ``columns`` is read from the
column of its own name; ``null`` says the portal has no such column (optional fields
only: the item carries null). ``scale`` gives a metric's unit (``kWh``, ``kW``...) or
a factor; the value sent is the column's times the factor. ``time_zone`` is the zone
in which ``timestamp`` (without time zone) columns are read. A resource left out is
read from the project's own table (``monitoring.sites``, ...): the empty mapping is
the default, today's tables.

Ids of any usual type (text, integers, uuid) are sent as text; times may be
``timestamptz`` or ``timestamp``; metrics ``real``, ``double precision``, ``numeric``
or integers.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import ClassVar, Literal

import psycopg
from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fleet.errors import ConfigurationError, FleetError

Resource = Literal["sites", "devices", "measurements"]
Kind = Literal["id", "text", "time", "number"]
CURSOR_COLUMN = "push_xid"
_ENV = "PUSH_SOURCE_MAPPING"


class MappingError(FleetError):
    """The source mapping does not fit the portal database; the message names each problem."""


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: Kind
    required: bool


FIELDS: dict[Resource, tuple[FieldSpec, ...]] = {
    "sites": (
        FieldSpec("id", "id", True),
        FieldSpec("name", "text", True),
        FieldSpec("timezone", "text", False),
        FieldSpec("latitude", "number", False),
        FieldSpec("longitude", "number", False),
        FieldSpec("updated_at", "time", False),
    ),
    "devices": (
        FieldSpec("id", "id", True),
        FieldSpec("site_id", "id", True),
        FieldSpec("name", "text", True),
        FieldSpec("model", "text", False),
        FieldSpec("firmware_version", "text", False),
        FieldSpec("updated_at", "time", False),
    ),
    "measurements": (
        FieldSpec("time", "time", True),
        FieldSpec("device_id", "id", True),
        FieldSpec("power_w", "number", False),
        FieldSpec("voltage_v", "number", False),
        FieldSpec("current_a", "number", False),
        FieldSpec("energy_wh", "number", False),
        FieldSpec("power_factor", "number", False),
        FieldSpec("frequency_hz", "number", False),
        FieldSpec("received_at", "time", False),  # for the lag metric only
    ),
}
DEFAULT_TABLES: dict[Resource, str] = {
    "sites": "monitoring.sites",
    "devices": "monitoring.devices",
    "measurements": "monitoring.power_measurements",
}
# A metric's unit names and the factor to the unit the contract sends.
UNITS: dict[str, dict[str, str]] = {
    "power_w": {"W": "1", "kW": "1000", "MW": "1000000"},
    "voltage_v": {"V": "1", "kV": "1000"},
    "current_a": {"A": "1", "mA": "0.001", "kA": "1000"},
    "energy_wh": {"Wh": "1", "kWh": "1000", "MWh": "1000000"},
    "frequency_hz": {"Hz": "1"},
    "power_factor": {},
}

# -- identifiers ------------------------------------------------------------------------

_UNQUOTED = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_QUOTED = re.compile(r'"((?:[^"]|"")+)"')


def parse_identifiers(text: str) -> tuple[str, ...]:
    """``schema."Table"`` -> ("schema", "Table"), as PostgreSQL reads it (unquoted
    names fold to lower case, quoted ones are kept; ``""`` is a quote)."""
    parts: list[str] = []
    pos = 0
    text = text.strip()
    while True:
        quoted = _QUOTED.match(text, pos)
        plain = _UNQUOTED.match(text, pos)
        if quoted:
            parts.append(quoted.group(1).replace('""', '"'))
            pos = quoted.end()
        elif plain:
            parts.append(plain.group(0).lower())
            pos = plain.end()
        else:
            raise ValueError(f"not an SQL name: {text!r}")
        if pos == len(text):
            break
        if text[pos] != ".":
            raise ValueError(f"not an SQL name: {text!r}")
        pos += 1
    if any(len(p.encode()) > 63 for p in parts):
        raise ValueError(f"a name longer than PostgreSQL's 63 bytes: {text!r}")
    return tuple(parts)


def quote(name: str) -> str:
    """An identifier as SQL writes it (for messages)."""
    return '"' + name.replace('"', '""') + '"'


# -- the mapping --------------------------------------------------------------------------


class TableMapping(BaseModel):
    """One resource: its table and, per field, its column (None: the portal has none)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    resource: ClassVar[Resource]
    table: str
    columns: dict[str, str | None] = Field(default_factory=dict)
    scale: dict[str, Decimal | str] = Field(default_factory=dict)

    @field_validator("table")
    @classmethod
    def _qualified(cls, value: str) -> str:
        if len(parse_identifiers(value)) != 2:
            raise ValueError(f"name the table with its schema, e.g. monitoring.sites (got {value!r})")
        return value

    @model_validator(mode="after")
    def _fields(self) -> TableMapping:
        specs = {f.name: f for f in FIELDS[self.resource]}
        problems: list[str] = []
        for name, column in self.columns.items():
            if name not in specs:
                problems.append(f"unknown field {name!r} (known: {', '.join(specs)})")
            elif column is None and specs[name].required:
                problems.append(f"{name} is required: it cannot be null")
            elif column is not None:
                try:
                    if len(parse_identifiers(column)) != 1:
                        problems.append(f"{name}: a column name, not a qualified name: {column!r}")
                except ValueError as exc:
                    problems.append(f"{name}: {exc}")
        for name, value in self.scale.items():
            if name not in specs or specs[name].kind != "number" or self.resource != "measurements":
                problems.append(f"scale: {name!r} is not a metric of measurements")
                continue
            try:
                _factor(name, value)
            except ValueError as exc:
                problems.append(f"scale: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def qualified(self) -> tuple[str, str]:
        schema, name = parse_identifiers(self.table)
        return schema, name

    def column(self, field_name: str) -> str | None:
        """The portal's column for a field (as the catalogue spells it), None if absent."""
        text = self.columns.get(field_name, quote(field_name))
        return None if text is None else parse_identifiers(text)[0]

    def factor(self, field_name: str) -> Decimal:
        value = self.scale.get(field_name)
        return Decimal(1) if value is None else _factor(field_name, value)


def _factor(name: str, value: Decimal | str) -> Decimal:
    units = UNITS.get(name, {})
    if isinstance(value, str) and value in units:
        return Decimal(units[value])
    try:
        factor = Decimal(value)
    except (InvalidOperation, ValueError):
        known = ", ".join(units) or "none"
        raise ValueError(f"{name}: {value!r} is neither a unit ({known}) nor a number") from None
    if not factor.is_finite() or factor <= 0:
        raise ValueError(f"{name}: the factor must be a positive number (got {value})")
    return factor


class SitesMapping(TableMapping):
    resource: ClassVar[Resource] = "sites"
    table: str = DEFAULT_TABLES["sites"]


class DevicesMapping(TableMapping):
    resource: ClassVar[Resource] = "devices"
    table: str = DEFAULT_TABLES["devices"]


class MeasurementsMapping(TableMapping):
    resource: ClassVar[Resource] = "measurements"
    table: str = DEFAULT_TABLES["measurements"]


class SourceMapping(BaseModel):
    """Where the push reads each resource. The empty mapping is the default tables."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    time_zone: str = Field("UTC", min_length=1, max_length=64)
    sites: SitesMapping = Field(default_factory=SitesMapping)
    devices: DevicesMapping = Field(default_factory=DevicesMapping)
    measurements: MeasurementsMapping = Field(default_factory=MeasurementsMapping)

    def table(self, resource: Resource) -> TableMapping:
        mapping: TableMapping = getattr(self, resource)
        return mapping

    @property
    def is_default(self) -> bool:
        return self == DEFAULT_MAPPING


DEFAULT_MAPPING = SourceMapping()


def parse_mapping(text: str, origin: str = "the source mapping") -> SourceMapping:
    """A mapping from its JSON; every problem named, with where it is."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{origin} is not JSON: {exc}") from None
    try:
        return SourceMapping.model_validate(doc)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(p) for p in err["loc"]) or "mapping"
            problems.append(f"{where}: {str(err['msg']).removeprefix('Value error, ')}")
        raise ConfigurationError(f"{origin} is invalid: " + "; ".join(problems)) from None


def layer_root() -> Path:
    """Where the ``fleet`` package lives: the Lambda layer's ``python/`` folder."""
    return Path(__file__).resolve().parent.parent


def load_mapping(path: str | os.PathLike[str] | None) -> SourceMapping:
    """The mapping in a file (None or "": the default). A relative path is looked up in
    the current folder, then beside the ``fleet`` package (in Lambda: the layer)."""
    if path is None or str(path) == "":
        return DEFAULT_MAPPING
    candidates = [Path(path)] if Path(path).is_absolute() else [Path.cwd() / path, layer_root() / path]
    for candidate in candidates:
        if candidate.is_file():
            return parse_mapping(candidate.read_text(encoding="utf-8"), f"source mapping {path}")
    tried = " or ".join(str(c) for c in candidates)
    raise ConfigurationError(f"source mapping {path} not found (looked for {tried})")


def configured_mapping() -> SourceMapping:
    """The mapping named by the ``PUSH_SOURCE_MAPPING`` setting (unset: the default)."""
    return load_mapping(os.environ.get(_ENV) or None)


# -- the catalogue ------------------------------------------------------------------------

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
        if cursor is not None and cursor.base != "xid8":
            problem(f"column {CURSOR_COLUMN} exists and is {cursor.type}; the push's cursor column must be xid8")
        elif cursor is None and need_cursor:
            problem(
                f"the cursor column {CURSOR_COLUMN} is missing from {table.table}: "
                "run the client bootstrap (fleet db migrate --role client) with this mapping"
            )
        elif cursor is None and not owned:
            problem(f"the connected role does not own {table.table}, so it cannot add the cursor column")
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
    )


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
