"""The push's source mapping: where the portal keeps sites, devices and measurements
(fleet.push.catalogue checks it against the portal database).

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

``"reconcile_day_index": true`` under ``measurements`` is the operator's consent to one
more index on the portal's table, for reconciliation's days, when the portal has no
index of its own that reads a day (fleet.push.catalogue finds one).

Ids of any usual type (text, integers, uuid) are sent as text; times may be
``timestamptz`` or ``timestamp``; metrics ``real``, ``double precision``, ``numeric``
or integers.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import ClassVar, Literal

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
    # The operator's consent to one more index on the portal's table, for
    # reconciliation's UTC days, when the portal has none that leads with the time.
    reconcile_day_index: bool = False


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
        """The project's own tables (consent to the day index or not)."""
        plain = self.measurements.model_copy(update={"reconcile_day_index": False})
        return self.model_copy(update={"measurements": plain}) == DEFAULT_MAPPING


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
    return Path(__file__).resolve().parents[2]


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
