"""The push reads the customer's portal as it is, through the source mapping.

Three portals, each end to end through the client bootstrap, the push and the real
ingest, every value checked on the Admin side: the project's own schema; EF Core's
default naming (quoted PascalCase, integer ids, ``timestamp`` without zone, energy in
kWh as ``numeric``, extra columns); a portal with extra columns, a view as its sites
and a trigger on its measurements table, times as ``timestamp`` in Europe/Berlin.
Then: the check names every problem before anything is changed, and one resource's
failure stays its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from fleet import config
from fleet.errors import ConfigurationError
from fleet.observability import metrics
from fleet.push.mapping import DEFAULT_MAPPING, MappingError, SourceMapping, load_mapping, parse_mapping
from fleet.push.queries import MeasurementQueries
from fleet.push.source import PortalSource
from fleet.push.state import PushStateStore
from fleet.schema.migrate import migrate
from fleet_local import cli
from support import Clock, drain, ingest_serving, make_push_service

METRICS = ("power_w", "voltage_v", "current_a", "energy_wh", "power_factor", "frequency_hz")


@dataclass
class Admin:
    url: str
    server_url: str
    token: str

    def rows(self, query: str) -> set[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            return set(conn.execute(query))

    def sites(self) -> set[tuple[Any, ...]]:
        return self.rows(
            "SELECT id, name, timezone, latitude, longitude, updated_at FROM fleet.sites WHERE customer_id = 'DEV0001'"
        )

    def devices(self) -> set[tuple[Any, ...]]:
        return self.rows(
            "SELECT id, site_id, name, model, firmware_version, updated_at FROM fleet.devices"
            " WHERE customer_id = 'DEV0001'"
        )

    def measurements(self) -> set[tuple[Any, ...]]:
        return self.rows(
            f"SELECT time, device_id, {', '.join(METRICS)} FROM fleet.power_measurements WHERE customer_id = 'DEV0001'"
        )


@pytest.fixture
def admin(admin_db_postgres: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Admin]:
    with ingest_serving(admin_db_postgres, monkeypatch) as (server_url, token):
        yield Admin(admin_db_postgres, server_url, token)


def _push_everything(portal: str, mapping: SourceMapping, aws: Any, admin: Admin) -> None:
    clock = Clock()
    service = make_push_service(
        portal, aws, admin.server_url, admin.token, clock, batch_size=7, source=PortalSource(mapping)
    )
    drain(service, clock, 100, no_failures=True)


def _write(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- 1. the project's own schema -----------------------------------------------------------


def test_our_own_schema_arrives_value_for_value(aws, admin: Admin, client_db: str) -> None:
    _write(
        client_db,
        "INSERT INTO monitoring.sites VALUES ('s1', 'Plant', 'Europe/Berlin', 52.52, 13.405, '2026-11-01T00:00:00Z'),"
        " ('s2', 'Depot', NULL, NULL, NULL, '2026-11-02T00:00:00Z')",
        "INSERT INTO monitoring.devices VALUES ('m1', 's1', 'Main', 'PM5560', '2.1', '2026-11-01T01:00:00Z'),"
        " ('m2', 's2', 'Aux', NULL, NULL, '2026-11-01T02:00:00Z')",
        "INSERT INTO monitoring.power_measurements (time, device_id, power_w, voltage_v, current_a, energy_wh,"
        " power_factor, frequency_hz) SELECT '2026-11-01T00:00:00Z'::timestamptz + make_interval(mins => g),"
        " 'm' || (1 + g % 2), 100 + g * 0.25, 230.5, 1.5 + g, 1000000 + g * 12.5, 0.91, 50.01"
        " FROM generate_series(0, 39) g",
        "INSERT INTO monitoring.power_measurements (time, device_id) VALUES ('2026-11-02T00:00:00Z', 'm1')",
    )
    _push_everything(client_db, DEFAULT_MAPPING, aws, admin)
    assert admin.sites() == {
        ("s1", "Plant", "Europe/Berlin", 52.52, 13.405, _utc("2026-11-01T00:00:00")),
        ("s2", "Depot", None, None, None, _utc("2026-11-02T00:00:00")),
    }
    assert admin.devices() == {
        ("m1", "s1", "Main", "PM5560", "2.1", _utc("2026-11-01T01:00:00")),
        ("m2", "s2", "Aux", None, None, _utc("2026-11-01T02:00:00")),
    }
    expected = {
        (
            datetime(2026, 11, 1, 0, g, tzinfo=UTC),
            f"m{1 + g % 2}",
            100 + g * 0.25,
            230.5,
            1.5 + g,
            1000000 + g * 12.5,
            0.91,
            50.01,
        )
        for g in range(40)
    }
    expected.add((_utc("2026-11-02T00:00:00"), "m1", None, None, None, None, None, None))
    assert admin.measurements() == expected


# --- 2. EF Core's default naming ---------------------------------------------------------------

EF_CORE_SCHEMA = """
CREATE SCHEMA monitoring;
CREATE TABLE monitoring."__EFMigrationsHistory" ("MigrationId" varchar(150) PRIMARY KEY, "ProductVersion" varchar(32));
CREATE TABLE monitoring."Sites" (
    "Id" integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    "Name" text NOT NULL,
    "TimeZone" text,
    "Latitude" double precision,
    "Longitude" double precision,
    "CreatedAt" timestamp NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),
    "UpdatedAt" timestamp NOT NULL,
    "Notes" text
);
CREATE TABLE monitoring."Devices" (
    "Id" integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    "SiteId" integer NOT NULL REFERENCES monitoring."Sites" ("Id"),
    "Name" varchar(200) NOT NULL,
    "Model" text,
    "SerialNumber" text,
    "UpdatedAt" timestamp NOT NULL
);
CREATE TABLE monitoring."PowerMeasurements" (
    "Id" bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    "Time" timestamp NOT NULL,
    "DeviceId" integer NOT NULL REFERENCES monitoring."Devices" ("Id"),
    "PowerW" real,
    "VoltageV" real,
    "CurrentA" real,
    "EnergyKwh" numeric(18, 6),
    "PowerFactor" real,
    "FrequencyHz" double precision,
    "Quality" integer NOT NULL DEFAULT 0,
    "ReceivedAt" timestamp with time zone NOT NULL DEFAULT now()
);
CREATE INDEX "IX_PowerMeasurements_DeviceId_Time" ON monitoring."PowerMeasurements" ("DeviceId", "Time");
"""

EF_CORE_MAPPING = {
    "sites": {
        "table": 'monitoring."Sites"',
        "columns": {
            "id": '"Id"',
            "name": '"Name"',
            "timezone": '"TimeZone"',
            "latitude": '"Latitude"',
            "longitude": '"Longitude"',
            "updated_at": '"UpdatedAt"',
        },
    },
    "devices": {
        "table": 'monitoring."Devices"',
        "columns": {
            "id": '"Id"',
            "site_id": '"SiteId"',
            "name": '"Name"',
            "model": '"Model"',
            "firmware_version": None,
            "updated_at": '"UpdatedAt"',
        },
    },
    "measurements": {
        "table": 'monitoring."PowerMeasurements"',
        "columns": {
            "time": '"Time"',
            "device_id": '"DeviceId"',
            "power_w": '"PowerW"',
            "voltage_v": '"VoltageV"',
            "current_a": '"CurrentA"',
            "energy_wh": '"EnergyKwh"',
            "power_factor": '"PowerFactor"',
            "frequency_hz": '"FrequencyHz"',
            "received_at": '"ReceivedAt"',
        },
        "scale": {"energy_wh": "kWh"},
    },
}

# (time, device, power, voltage, current, energy kWh, power factor, frequency), as the
# portal application writes them.
EF_READINGS = [
    ("2026-11-01 00:00:00", 1, 1234.5, 230.1, 5.37, "1523.456789", 0.91, 50.01),
    ("2026-11-01 00:15:00", 1, 1180.25, 229.8, 5.13, "1523.752001", 0.9, 49.99),
    ("2026-11-01 00:00:00", 2, 0.0, 231.4, 0.0, "0.000001", None, 50.0),
    ("2026-11-01 00:15:00.5", 2, None, None, None, None, None, None),
]


def _ef_core_portal(url: str, readings: list[tuple[Any, ...]]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(EF_CORE_SCHEMA)
        conn.execute(
            """INSERT INTO monitoring."Sites" ("Name", "TimeZone", "Latitude", "Longitude", "UpdatedAt", "Notes")"""
            " VALUES ('Plant', 'Europe/Berlin', 52.52, 13.405, '2026-10-01 08:00:00', 'roof'),"
            " ('Depot', NULL, NULL, NULL, '2026-10-02 09:30:00.25', NULL)"
        )
        conn.execute(
            """INSERT INTO monitoring."Devices" ("SiteId", "Name", "Model", "SerialNumber", "UpdatedAt")"""
            " VALUES (1, 'Main', 'PM5560', 'SN-1', '2026-10-03 00:00:00'), (2, 'Aux', NULL, NULL, '2026-10-04 00:00:00')"
        )
        _ef_readings(conn, readings)


def _ef_readings(conn: psycopg.Connection, readings: list[tuple[Any, ...]]) -> None:
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO monitoring."PowerMeasurements" ("Time", "DeviceId", "PowerW", "VoltageV", "CurrentA","""
            """ "EnergyKwh", "PowerFactor", "FrequencyHz", "Quality") VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 3)""",
            readings,
        )


def _ef_expected(readings: list[tuple[Any, ...]]) -> set[tuple[Any, ...]]:
    """What the Admin holds for them: the time read as UTC, ids as text, reals as the
    portal shows them, kWh as Wh (exact: numeric times 1000)."""
    return {
        (
            _utc(t),
            str(device),
            power,
            voltage,
            current,
            None if kwh is None else float(Decimal(kwh) * 1000),
            pf,
            hz,
        )
        for t, device, power, voltage, current, kwh, pf, hz in readings
    }


def _mapping_file(tmp_path: Path, doc: dict[str, Any]) -> SourceMapping:
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(doc, indent=2))
    return load_mapping(str(path))


def test_an_ef_core_portal_arrives_value_for_value(aws, admin: Admin, empty_db: str, tmp_path: Path) -> None:
    mapping = _mapping_file(tmp_path, EF_CORE_MAPPING)
    _ef_core_portal(empty_db, EF_READINGS[:2])  # before the bootstrap: no push_xid (pushed first)
    before = _relations(empty_db)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        result = migrate(conn, "client", mapping=mapping)
        assert result.applied == []  # none of the project's own tables
        _ef_readings(conn, EF_READINGS[2:])
    _push_everything(empty_db, mapping, aws, admin)
    assert admin.sites() == {
        ("1", "Plant", "Europe/Berlin", 52.52, 13.405, _utc("2026-10-01T08:00:00")),
        ("2", "Depot", None, None, None, _utc("2026-10-02T09:30:00.25")),
    }
    assert admin.devices() == {
        ("1", "1", "Main", "PM5560", None, _utc("2026-10-03T00:00:00")),
        ("2", "2", "Aux", None, None, _utc("2026-10-04T00:00:00")),
    }
    assert admin.measurements() == _ef_expected(EF_READINGS)
    # Nothing was created in the portal's database but the cursor column and its index
    # (the contract: reconciliation reads by the portal's own index).
    assert _relations(empty_db) - before == {"monitoring.PowerMeasurements_push_cursor_idx"}
    with psycopg.connect(empty_db) as conn:
        columns = conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod), pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a"
            " LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
            " WHERE attrelid = 'monitoring.\"PowerMeasurements\"'::regclass AND attnum > 11 AND NOT attisdropped"
        ).fetchall()
    assert columns == [("push_xid", "xid8", "pg_current_xact_id()")]


def test_the_cursor_index_serves_the_push_on_a_mapped_table(empty_db: str, tmp_path: Path) -> None:
    mapping = _mapping_file(tmp_path, EF_CORE_MAPPING)
    _ef_core_portal(empty_db, EF_READINGS)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        migrate(conn, "client", mapping=mapping)
        conn.execute("SET enable_seqscan = off")
        queries = PortalSource(mapping).measurements(conn)
        params = {"xid": "0", "time": "-infinity", "device": "", "limit": 10}
        # One index for both phases: the legacy rows (push_xid NULL) in its order too.
        for phase, index in (("xid", "PowerMeasurements_push_cursor_idx"), ("legacy", "push_cursor_idx")):
            plan = "\n".join(r[0] for r in conn.execute(b"EXPLAIN " + queries.select[phase].as_bytes(conn), params))
            assert index in plan and "Sort" not in plan, plan


# --- 3. extra columns, a view and a trigger, times in a zone ----------------------------------

TRIGGER_PORTAL = """
CREATE SCHEMA telemetry;
CREATE TABLE telemetry.site (
    site_key uuid PRIMARY KEY, title text NOT NULL, archived boolean NOT NULL DEFAULT false,
    lat numeric(9, 6), lon numeric(9, 6), changed timestamp NOT NULL, owner_email text
);
CREATE VIEW telemetry.active_sites AS
    SELECT site_key, upper(title) AS display_name, lat, lon, changed FROM telemetry.site WHERE NOT archived;
CREATE TABLE telemetry.meter (
    serial text PRIMARY KEY, site_key uuid NOT NULL REFERENCES telemetry.site, label text NOT NULL,
    fw text, installed date
);
CREATE TABLE telemetry.reading (
    reading_id bigserial PRIMARY KEY,
    meter_serial text NOT NULL,
    read_at timestamp NOT NULL,
    kw double precision,
    volts numeric,
    amps real,
    raw_payload jsonb,
    checked boolean NOT NULL DEFAULT false
);
CREATE TABLE telemetry.latest (meter_serial text PRIMARY KEY, read_at timestamp NOT NULL);
CREATE FUNCTION telemetry.on_reading() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.checked := NEW.kw IS NOT NULL;
    INSERT INTO telemetry.latest VALUES (NEW.meter_serial, NEW.read_at)
        ON CONFLICT (meter_serial) DO UPDATE SET read_at = greatest(telemetry.latest.read_at, excluded.read_at);
    RETURN NEW;
END $$;
CREATE TRIGGER reading_checked BEFORE INSERT ON telemetry.reading
    FOR EACH ROW EXECUTE FUNCTION telemetry.on_reading();
CREATE VIEW telemetry.reading_report AS SELECT meter_serial, read_at, kw FROM telemetry.reading WHERE checked;
INSERT INTO telemetry.site VALUES
    ('6f1d6c2e-41b5-4e55-9a52-6a1f3e0f2b7c', 'North field', false, 48.137154, 11.576124, '2026-06-01 12:00:00', 'x@y'),
    ('00000000-0000-4000-8000-000000000001', 'Closed', true, NULL, NULL, '2026-06-01 12:00:00', NULL);
INSERT INTO telemetry.meter VALUES ('INV-001', '6f1d6c2e-41b5-4e55-9a52-6a1f3e0f2b7c', 'Inverter 1', '4.0.2', NULL);
"""

TRIGGER_MAPPING = {
    "time_zone": "Europe/Berlin",
    "sites": {
        "table": "telemetry.active_sites",
        "columns": {
            "id": "site_key",
            "name": "display_name",
            "timezone": None,
            "latitude": "lat",
            "longitude": "lon",
            "updated_at": "changed",
        },
    },
    "devices": {
        "table": "telemetry.meter",
        "columns": {
            "id": "serial",
            "site_id": "site_key",
            "name": "label",
            "model": None,
            "firmware_version": "fw",
            "updated_at": None,
        },
    },
    "measurements": {
        "table": "telemetry.reading",
        "columns": {
            "time": "read_at",
            "device_id": "meter_serial",
            "power_w": "kw",
            "voltage_v": "volts",
            "current_a": "amps",
            "energy_wh": None,
            "power_factor": None,
            "frequency_hz": None,
            "received_at": None,
        },
        "scale": {"power_w": "kW"},
    },
}


def test_a_portal_with_a_view_a_trigger_and_local_times_arrives_value_for_value(
    aws, admin: Admin, empty_db: str, tmp_path: Path
) -> None:
    mapping = _mapping_file(tmp_path, TRIGGER_MAPPING)
    _write(empty_db, TRIGGER_PORTAL)
    # Winter and summer time, and both sides of the night the clocks go back.
    readings = [
        ("2026-01-15 12:00:00", 1.25, "230.4", 5.5),
        ("2026-07-15 12:00:00", 0.333, "229.9", 1.45),
        ("2026-10-25 01:30:00", 2.0, None, None),
        ("2026-10-25 03:30:00", None, "231", 0.1),
    ]
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO telemetry.reading (meter_serial, read_at, kw, volts, amps) VALUES ('INV-001', %s, %s, %s, %s)",
            readings[0],
        )
        migrate(conn, "client", mapping=mapping)
        for reading in readings[1:]:
            conn.execute(
                "INSERT INTO telemetry.reading (meter_serial, read_at, kw, volts, amps, raw_payload)"
                " VALUES ('INV-001', %s, %s, %s, %s, '{\"v\": 1}')",
                reading,
            )
        # The trigger still runs, and the portal's own view still reads the table.
        assert conn.execute("SELECT count(*) FROM telemetry.reading_report").fetchone() == (3,)
        assert conn.execute("SELECT read_at FROM telemetry.latest").fetchone() == (datetime(2026, 10, 25, 3, 30),)
    _push_everything(empty_db, mapping, aws, admin)
    berlin = ZoneInfo("Europe/Berlin")
    assert admin.sites() == {
        (
            "6f1d6c2e-41b5-4e55-9a52-6a1f3e0f2b7c",
            "NORTH FIELD",
            None,
            48.137154,
            11.576124,
            datetime(2026, 6, 1, 10, 0, tzinfo=UTC),
        )
    }
    assert admin.devices() == {("INV-001", "6f1d6c2e-41b5-4e55-9a52-6a1f3e0f2b7c", "Inverter 1", None, "4.0.2", None)}
    expected = {
        (
            datetime.fromisoformat(t).replace(tzinfo=berlin).astimezone(UTC),
            "INV-001",
            None if kw is None else float(Decimal(str(kw)) * 1000),
            None if volts is None else float(volts),
            amps,
            None,
            None,
            None,
        )
        for t, kw, volts, amps in readings
    }
    assert {r[0] for r in expected} >= {datetime(2026, 1, 15, 11, tzinfo=UTC), datetime(2026, 7, 15, 10, tzinfo=UTC)}
    assert admin.measurements() == expected


# --- the check: before anything runs, every problem named -------------------------------------

ISSUE_PORTAL = """
CREATE SCHEMA monitoring;
CREATE TABLE monitoring.sites (id text PRIMARY KEY, name text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE monitoring.devices (
    id text PRIMARY KEY, site_id text NOT NULL, name text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE monitoring.power_measurements (
    time timestamptz NOT NULL, device_id text NOT NULL, power_w double precision, voltage_v double precision,
    current_a double precision, energy_wh double precision, power_factor double precision,
    frequency_hz double precision
);
INSERT INTO monitoring.power_measurements (time, device_id, power_w) VALUES ('2026-11-01T00:00:00Z', 'm1', 1);
"""
MISSING = ["sites.timezone", "sites.latitude", "sites.longitude", "devices.model", "devices.firmware_version"]


def _relations(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {
            r[0]
            for r in conn.execute(
                "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
            )
        }


def test_a_portal_that_does_not_fit_is_refused_before_anything_changes(
    empty_db: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _write(empty_db, ISSUE_PORTAL)
    before = _relations(empty_db)
    with psycopg.connect(empty_db, autocommit=True) as conn, pytest.raises(MappingError) as refused:
        migrate(conn, "client", mapping=DEFAULT_MAPPING)
    for name in MISSING:
        assert f"- {name}: column" in str(refused.value)
    assert "5 problems" in str(refused.value)
    assert _relations(empty_db) == before  # not even the bookkeeping schema
    assert cli.main(["db", "check", "--role", "client", "--database-url", empty_db]) == 1
    err = capsys.readouterr().err
    assert all(f"error: {name}: column" in err for name in MISSING), err
    # The operator maps the fields the portal lacks to null: it fits, and migrates.
    doc = {
        "sites": {"table": "monitoring.sites", "columns": {"timezone": None, "latitude": None, "longitude": None}},
        "devices": {"table": "monitoring.devices", "columns": {"model": None, "firmware_version": None}},
        "measurements": {"table": "monitoring.power_measurements", "columns": {"received_at": None}},
    }
    path = tmp_path / "portal.json"
    path.write_text(json.dumps(doc))
    assert cli.main(["db", "check", "--role", "client", "--mapping", str(path), "--database-url", empty_db]) == 0
    assert "cursor column push_xid: added by" in capsys.readouterr().out
    assert cli.main(["db", "migrate", "--role", "client", "--mapping", str(path), "--database-url", empty_db]) == 0
    assert "portal: column push_xid added to monitoring.power_measurements" in capsys.readouterr().out
    with psycopg.connect(empty_db) as conn:
        page = PortalSource(load_mapping(str(path))).read_full_set(conn, "sites")
        assert page == []
        assert conn.execute("SELECT count(*) FROM monitoring.power_measurements WHERE push_xid IS NULL").fetchone() == (
            1,
        )


def test_the_check_names_wrong_types_missing_tables_and_nullable_keys(empty_db: str) -> None:
    _write(
        empty_db,
        "CREATE SCHEMA p",
        'CREATE TABLE p.s ("Id" int, name jsonb NOT NULL)',
        "CREATE VIEW p.m AS SELECT 1 AS time",
    )
    mapping = SourceMapping.model_validate(
        {
            "time_zone": "Mars/Olympus",
            "sites": {"table": "p.s", "columns": {"id": "id", "timezone": None, "latitude": None, "longitude": None}},
            "devices": {"table": "p.nowhere"},
            "measurements": {"table": "p.m"},
        }
    )
    with psycopg.connect(empty_db, autocommit=True) as conn, pytest.raises(MappingError) as refused:
        migrate(conn, "client", mapping=mapping)
    text = str(refused.value)
    assert "time zone" in text and "Mars/Olympus" in text
    assert 'sites.id: column "id" does not exist in p.s; did you mean "Id"' in text
    assert 'sites.name: column "name" is jsonb, not a type usable for it' in text
    assert "sites.updated_at: column" in text
    assert "devices: table p.nowhere does not exist" in text
    assert "measurements: p.m is a view: the push needs a plain table" in text
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute('ALTER TABLE p.s ALTER COLUMN name TYPE text USING name::text, ADD COLUMN "Stamp" timestamp')
        fixed = mapping.model_copy(
            update={
                "time_zone": "UTC",
                "sites": mapping.sites.model_copy(
                    update={"columns": {**mapping.sites.columns, "id": '"Id"', "updated_at": '"Stamp"'}}
                ),
            }
        )
        from fleet.push.catalogue import check

        report = check(conn, fixed, ("sites",))
    assert report.errors == []
    assert [str(f) for f in report.notices] == [
        'sites.id: column "Id" allows NULL: a row with NULL there is sent and refused by the Admin'
    ]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"sites": {"table": "sites"}}, "name the table with its schema"),
        ({"sites": {"table": "monitoring.sites", "columns": {"nmae": "name"}}}, "unknown field 'nmae'"),
        ({"devices": {"table": "monitoring.devices", "columns": {"id": None}}}, "id is required"),
        ({"measurements": {"table": "m.t", "scale": {"energy_wh": "BTU"}}}, "'BTU' is neither a unit"),
        ({"measurements": {"table": "m.t", "scale": {"power_w": -1}}}, "must be a positive number"),
        ({"measurements": {"table": 'm."unclosed'}}, "not an SQL name"),
        ({"time_zones": "UTC"}, "time_zones"),
    ],
)
def test_a_bad_mapping_file_is_refused_with_its_problem_named(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_mapping(json.dumps(doc))


def test_the_shipped_example_is_the_ef_core_mapping_the_tests_use() -> None:
    assert load_mapping("mappings/efcore-example.json") == SourceMapping.model_validate(EF_CORE_MAPPING)


def test_a_mapping_setting_naming_no_file_fails_at_cold_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not found"):
        load_mapping(str(tmp_path / "nowhere.json"))
    assert load_mapping("") == DEFAULT_MAPPING


# --- one resource's failure stays its own ----------------------------------------------------


def test_a_failing_resource_records_its_failure_and_the_others_go_on(
    aws, admin: Admin, client_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(
        client_db,
        "INSERT INTO monitoring.sites (id, name) VALUES ('s1', 'Plant')",
        "INSERT INTO monitoring.devices (id, site_id, name) VALUES ('m1', 's1', 'Main')",
        "INSERT INTO monitoring.power_measurements (time, device_id, power_w) VALUES ('2026-11-01T00:00:00Z', 'm1', 5)",
        "ALTER TABLE monitoring.sites RENAME COLUMN timezone TO tz",  # the portal changed under the push
    )
    clock = Clock()
    service = make_push_service(client_db, aws, admin.server_url, admin.token, clock)
    added: list[tuple[str, float]] = []  # the in-process ingest flushes the shared metric set
    add_metric = metrics.add_metric
    monkeypatch.setattr(
        metrics, "add_metric", lambda **kw: (added.append((kw["name"], kw["value"])), add_metric(**kw))[1]
    )
    report = service.tick().resources
    assert report["sites"].outcome == "failed"
    assert 'column "timezone" does not exist' in (report["sites"].detail or "")
    assert (report["devices"].outcome, report["measurements"].outcome) == ("pushed", "pushed")
    assert added.count(("PushFailures", 1)) == 1
    state = PushStateStore(aws).get("sites")
    assert state is not None and state.failures == 1
    assert 'column "timezone" does not exist' in (state.last_error or "")
    assert state.next_attempt_at > clock.now
    assert admin.measurements() == {(_utc("2026-11-01T00:00:00"), "m1", 5.0, None, None, None, None, None)}
    # Put right, it goes on at its next attempt.
    _write(client_db, "ALTER TABLE monitoring.sites RENAME COLUMN tz TO timezone")
    clock.advance(3600)
    assert service.tick().resources["sites"].outcome == "pushed"
    assert {s[:2] for s in admin.sites()} == {("s1", "Plant")}


def test_a_query_error_on_one_resource_is_its_own(aws, admin: Admin, client_db: str) -> None:
    _write(
        client_db,
        "INSERT INTO monitoring.sites (id, name) VALUES ('s1', 'Plant')",
        "INSERT INTO monitoring.devices (id, site_id, name) VALUES ('m1', 's1', 'Main')",
        "INSERT INTO monitoring.power_measurements (time, device_id, power_w) VALUES ('2026-11-01T00:00:00Z', 'm1', 5)",
        "CREATE VIEW monitoring.device_list AS SELECT id, site_id, (name || (1 / (length(id) - 2))::text) AS name,"
        " model, firmware_version, updated_at FROM monitoring.devices",
    )
    mapping = SourceMapping.model_validate({"devices": {"table": "monitoring.device_list"}})
    service = make_push_service(client_db, aws, admin.server_url, admin.token, Clock(), source=PortalSource(mapping))
    report = service.tick().resources
    assert report["devices"].outcome == "failed"
    assert "DivisionByZero" in (report["devices"].detail or "")
    assert (report["sites"].outcome, report["measurements"].outcome) == ("pushed", "pushed")
    state = PushStateStore(aws).get("devices")
    assert state is not None and state.failures == 1 and "division by zero" in (state.last_error or "")


def test_the_default_mapping_reads_as_before(client_db: str) -> None:
    """The queries built from the default mapping are today's: same order, same columns."""
    with psycopg.connect(client_db) as conn:
        queries = PortalSource().measurements(conn)
        text = queries.select["xid"].as_string(conn)
    assert 'ORDER BY "src"."push_xid", "src"."time", "src"."device_id"' in text
    assert '"src"."time"::timestamptz AS t' in text and '"src"."power_w"::float8 AS "m0"' in text
    assert isinstance(queries, MeasurementQueries) and queries.reports_lag


def test_the_functions_read_the_mapping_their_setting_names(aws) -> None:
    from fleet.push.wiring import build_push_service

    env = {
        "DATABASE_URL": "postgresql://fleet@127.0.0.1:1/portal",
        "INGEST_URL": "https://admin.example/api/fleet/ingest",
        "INGEST_TOKEN": "flt_example",
        "PUSH_STATE_TABLE": "push-state",
        "PUSH_SOURCE_MAPPING": "mappings/efcore-example.json",
        "FLEET_ROLE": "client",
    }
    ef_core = SourceMapping.model_validate(EF_CORE_MAPPING)
    assert build_push_service(config.load(config.PushConfig, env)).source.mapping == ef_core
    assert config.load(config.BootstrapConfig, env).mapping() == ef_core
    assert config.load(config.PushConfig, {**env, "PUSH_SOURCE_MAPPING": ""}).mapping() == DEFAULT_MAPPING
    with pytest.raises(ConfigurationError, match=r"source mapping elsewhere\.json not found"):
        build_push_service(config.load(config.PushConfig, {**env, "PUSH_SOURCE_MAPPING": "elsewhere.json"}))
