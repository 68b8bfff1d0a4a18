"""Migrations: applied once each, recorded with a checksum, serialised, per profile."""

from __future__ import annotations

import itertools
import re
import shutil
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from fleet.errors import MigrationChecksumMismatch, ProfileError
from fleet.schema.files import discover, discover_repeatables, sql_dir
from fleet.schema.migrate import migrate


def _count(conn: psycopg.Connection, query: str, *params: object) -> int:
    return int(conn.execute(query, params).fetchone()[0])  # type: ignore[index]


@pytest.mark.calendar
def test_fresh_apply_then_reapply_is_a_no_op(empty_db: str) -> None:
    with psycopg.connect(empty_db, autocommit=True) as conn:
        first = migrate(conn, "admin", "postgres")
        assert first.applied == [m.path.name for m in discover("admin", "postgres")]
        assert first.profile == "postgres"
        second = migrate(conn, "admin", "postgres")
        assert second.applied == []
        assert second.already_applied == first.applied
        assert _count(conn, "SELECT count(*) FROM fleet_meta.migrations WHERE role = 'admin'") == len(first.applied)


def test_client_migrations_apply_and_record_checksums(empty_db: str) -> None:
    with psycopg.connect(empty_db, autocommit=True) as conn:
        result = migrate(conn, "client")
        assert result.applied == [m.path.name for m in discover("client", "postgres")]
        checksum = conn.execute("SELECT checksum FROM fleet_meta.migrations WHERE role = 'client'").fetchone()[0]  # type: ignore[index]
        assert checksum == discover("client", "postgres")[0].checksum


def test_changed_applied_migration_is_refused(empty_db: str, tmp_path: Path) -> None:
    root = tmp_path / "sql"
    shutil.copytree(sql_dir(), root)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        migrate(conn, "client", root=root)
        target = root / "client" / "001_monitoring.sql"
        target.write_text(target.read_text() + "\n-- edited after it was applied\n")
        with pytest.raises(MigrationChecksumMismatch, match=r"001_monitoring\.sql was changed"):
            migrate(conn, "client", root=root)


def test_new_migration_file_is_applied_on_the_next_run(empty_db: str, tmp_path: Path) -> None:
    root = tmp_path / "sql"
    shutil.copytree(sql_dir(), root)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        migrate(conn, "client", root=root)
        (root / "client" / "999_extra.sql").write_text("CREATE TABLE monitoring.extra (id int);")
        result = migrate(conn, "client", root=root)
        assert result.applied == ["999_extra.sql"]
        assert conn.execute("SELECT to_regclass('monitoring.extra')").fetchone() == ("monitoring.extra",)


def test_two_concurrent_applies_both_succeed_and_one_does_the_work(empty_db: str) -> None:
    results: list[object] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        try:
            with psycopg.connect(empty_db, autocommit=True) as conn:
                barrier.wait()
                results.append(migrate(conn, "admin", "postgres"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    applied = sorted(len(r.applied) for r in results)  # type: ignore[attr-defined]
    assert applied[0] == 0
    assert applied[1] == len(discover("admin", "postgres"))
    # The repeatable definitions too: the run that waited found them current.
    definitions = sorted(len(r.definitions_applied) for r in results)  # type: ignore[attr-defined]
    assert definitions == [0, len(discover_repeatables("admin", "postgres"))]


def test_profile_cannot_be_switched_in_place(admin_db_postgres: str, pg_server) -> None:
    if not pg_server.has_timescale:
        # Without TimescaleDB the request is refused for that reason instead.
        with psycopg.connect(admin_db_postgres, autocommit=True) as conn, pytest.raises(ProfileError):
            migrate(conn, "admin", "timescale")
        return
    with psycopg.connect(admin_db_postgres, autocommit=True) as conn:
        with pytest.raises(ProfileError, match="cannot be switched"):
            migrate(conn, "admin", "timescale")
        assert migrate(conn, "admin", "auto").profile == "postgres"


def test_timescale_requested_without_the_extension_is_a_clear_error(empty_db: str, pg_server) -> None:
    if pg_server.has_timescale:
        pytest.skip("this server offers TimescaleDB; the refusal cannot happen here")
    with (
        psycopg.connect(empty_db, autocommit=True) as conn,
        pytest.raises(ProfileError, match="does not offer"),
    ):
        migrate(conn, "admin", "timescale")


def test_existing_portal_table_is_extended_without_losing_rows(empty_db: str) -> None:
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(
            """
            CREATE SCHEMA monitoring;
            CREATE TABLE monitoring.power_measurements (
                time timestamptz NOT NULL, device_id text NOT NULL, power_w double precision,
                voltage_v double precision, current_a double precision, energy_wh double precision,
                power_factor double precision, frequency_hz double precision);
            INSERT INTO monitoring.power_measurements (time, device_id, power_w)
            SELECT now() - make_interval(mins => g), 'dev-1', g FROM generate_series(1, 100) g;
            """
        )
        before = conn.execute(
            "SELECT relfilenode FROM pg_class WHERE oid = 'monitoring.power_measurements'::regclass"
        ).fetchone()
        migrate(conn, "client")
        after = conn.execute(
            "SELECT relfilenode FROM pg_class WHERE oid = 'monitoring.power_measurements'::regclass"
        ).fetchone()
        assert before == after, "the table was rewritten"
        assert _count(conn, "SELECT count(*) FROM monitoring.power_measurements") == 100
        # Old rows: received_at filled, no transaction id (pushed first, as legacy rows).
        assert _count(conn, "SELECT count(*) FROM monitoring.power_measurements WHERE received_at IS NULL") == 0
        assert _count(conn, "SELECT count(*) FROM monitoring.power_measurements WHERE push_xid IS NULL") == 100
        conn.execute("INSERT INTO monitoring.power_measurements (time, device_id) VALUES (now(), 'dev-2')")
        assert _count(conn, "SELECT count(*) FROM monitoring.power_measurements WHERE push_xid IS NOT NULL") == 1


def _hourly(conn: psycopg.Connection, device: str) -> dict[datetime, tuple]:
    return {
        row[0]: row[1:]
        for row in conn.execute(
            "SELECT bucket, sample_count, avg_power_w, min_power_w, max_power_w, energy_wh"
            " FROM fleet.hourly_per_device WHERE device_id = %s ORDER BY bucket",
            (device,),
        )
    }


def _expected_partition(conn: psycopg.Connection, t: datetime) -> str:
    """Where the schema's own rule puts a row at ``t``: the archive before
    ``archive_end``, else the weekly partition of its UTC week if one was made,
    else the default partition. Asked of the database, so it holds on any day."""
    archive_end, weekly = conn.execute(
        "SELECT archive_end, to_regclass(format('fleet.%%I',"
        " 'power_measurements_' || to_char(fleet.week_start(%s) AT TIME ZONE 'UTC', 'YYYYMMDD')))::text"
        " FROM fleet.partition_settings",
        (t,),
    ).fetchone()  # type: ignore[misc]
    if t < archive_end:
        return "fleet.power_measurements_archive"
    return weekly or "fleet.power_measurements_default"


@pytest.mark.calendar
def test_postgres_profile_takes_rows_of_any_age_and_tomorrow(admin_db_postgres: str) -> None:
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    times = [
        now - timedelta(days=730),  # two years back: the archive partition
        now - timedelta(days=31),  # last month: archive or a weekly one, by the weekday
        now,
        now + timedelta(days=1),  # tomorrow
        now + timedelta(days=200),  # beyond the weeks made ahead: the default partition
    ]
    with psycopg.connect(admin_db_postgres, autocommit=True) as conn:
        conn.execute("INSERT INTO fleet.customers (id, name) VALUES ('C1', 'one')")
        for t in times:
            conn.execute(
                "INSERT INTO fleet.power_measurements (time, customer_id, device_id, power_w, energy_wh)"
                " VALUES (%s, 'C1', 'd1', 100, 1000), (%s, 'C1', 'd1', 300, 1250)",
                (t, t + timedelta(minutes=30)),
            )
        placed = conn.execute(
            "SELECT time, tableoid::regclass::text FROM fleet.power_measurements ORDER BY time"
        ).fetchall()
        assert len(placed) == 2 * len(times)
        for t, partition in placed:
            assert partition == _expected_partition(conn, t), t
        where = {partition for _, partition in placed}
        # Every kind of home is exercised: the archive, a weekly partition, the default.
        assert {"fleet.power_measurements_archive", "fleet.power_measurements_default"} <= where
        assert any(p.startswith("fleet.power_measurements_2") for p in where)
        # The archive ends on a Monday 00:00 UTC, at most five weeks before the migration.
        archive_end = conn.execute("SELECT archive_end FROM fleet.partition_settings").fetchone()[0]  # type: ignore[index]
        assert archive_end.astimezone(UTC).weekday() == 0
        assert archive_end.astimezone(UTC).time().isoformat() == "00:00:00"
        assert timedelta(weeks=4) <= datetime.now(UTC) - archive_end < timedelta(weeks=5)


@pytest.mark.calendar
def test_postgres_partition_maintenance_moves_rows_out_of_the_default(admin_db_postgres: str) -> None:
    far = datetime.now(UTC) + timedelta(days=200)
    with psycopg.connect(admin_db_postgres, autocommit=True) as conn:
        conn.execute("INSERT INTO fleet.customers (id, name) VALUES ('C1', 'one')")
        conn.execute(
            "INSERT INTO fleet.power_measurements (time, customer_id, device_id) VALUES (%s, 'C1', 'd1')",
            (far,),
        )
        # Exactly the row's UTC week (a day after it may already be the next week).
        created = conn.execute(
            "SELECT fleet.ensure_measurement_partitions(fleet.week_start(%s), fleet.week_start(%s) + interval '7 days')",
            (far, far),
        ).fetchone()[0]  # type: ignore[index]
        assert created == 1
        where = conn.execute("SELECT tableoid::regclass::text FROM fleet.power_measurements").fetchone()[0]  # type: ignore[index]
        assert where.startswith("fleet.power_measurements_2")
        assert _count(conn, "SELECT count(*) FROM fleet.power_measurements_default") == 0


@pytest.mark.calendar
def test_timescale_profile_objects(admin_db_timescale: str) -> None:
    from fleet.schema.profiles import ProfileSettings, apply_profile

    with psycopg.connect(admin_db_timescale, autocommit=True) as conn:
        apply_profile(conn, "timescale", ProfileSettings())
        interval = conn.execute(
            "SELECT time_interval FROM timescaledb_information.dimensions"
            " WHERE hypertable_schema = 'fleet' AND hypertable_name = 'power_measurements'"
        ).fetchone()[0]  # type: ignore[index]
        assert interval == timedelta(days=7)
        settings = {
            row[0]: row[1:]
            for row in conn.execute(
                "SELECT attname, segmentby_column_index, orderby_column_index, orderby_asc"
                " FROM timescaledb_information.compression_settings"
                " WHERE hypertable_schema = 'fleet' AND hypertable_name = 'power_measurements'"
            )
        }
        assert settings["customer_id"][0] == 1
        assert settings["device_id"][0] == 2
        assert settings["time"][1] == 1
        assert settings["time"][2] is False
        compress = conn.execute(
            "SELECT config->>'compress_after' FROM timescaledb_information.jobs"
            " WHERE proc_name = 'policy_compression' AND hypertable_name = 'power_measurements'"
        ).fetchone()
        assert compress is not None
        assert conn.execute("SELECT %s::interval", (compress[0],)).fetchone()[0] == timedelta(days=7)  # type: ignore[index]
        cagg = conn.execute(
            "SELECT materialized_only FROM timescaledb_information.continuous_aggregates"
            " WHERE view_schema = 'fleet' AND view_name = 'hourly_state'"
        ).fetchone()
        assert cagg == (False,)
        start = conn.execute(
            "SELECT (config->>'start_offset')::interval FROM timescaledb_information.jobs"
            " WHERE proc_name = 'policy_refresh_continuous_aggregate'"
        ).fetchone()
        assert start == (timedelta(days=30),)


def test_timescale_changed_policy_settings_alter_the_jobs(admin_db_timescale: str) -> None:
    from fleet.schema.profiles import ProfileSettings, apply_profile

    with psycopg.connect(admin_db_timescale, autocommit=True) as conn:
        apply_profile(conn, "timescale", ProfileSettings())
        report = apply_profile(
            conn,
            "timescale",
            ProfileSettings.model_validate({"CompressAfter": "P14D", "RefreshStartOffset": "P45D"}),
        )
        assert any("compression" in c for c in report.changes)
        jobs = dict(
            conn.execute(
                "SELECT proc_name, config FROM timescaledb_information.jobs"
                " WHERE proc_name IN ('policy_compression', 'policy_refresh_continuous_aggregate')"
            ).fetchall()
        )
        assert conn.execute("SELECT %s::interval", (jobs["policy_compression"]["compress_after"],)).fetchone() == (
            timedelta(days=14),
        )
        assert conn.execute(
            "SELECT %s::interval", (jobs["policy_refresh_continuous_aggregate"]["start_offset"],)
        ).fetchone() == (timedelta(days=45),)
        # Re-running with the same settings changes nothing.
        again = apply_profile(
            conn,
            "timescale",
            ProfileSettings.model_validate({"CompressAfter": "P14D", "RefreshStartOffset": "P45D"}),
        )
        assert again.changes == []


@pytest.mark.parametrize("session_zone", ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"])
def test_weekly_partitions_stay_on_monday_utc_across_daylight_saving(admin_db_postgres: str, session_zone: str) -> None:
    """Partitions made across both daylight-saving changes of a year, from a session
    living in a zone that has them: each starts Monday 00:00 UTC, lasts 168 hours and
    is named after its Monday, and running the maintenance again makes no overlap."""
    span = (datetime(2027, 3, 1, tzinfo=UTC), datetime(2027, 11, 15, tzinfo=UTC))
    with psycopg.connect(admin_db_postgres, autocommit=True) as conn:
        conn.execute("SELECT set_config('TimeZone', %s, false)", (session_zone,))
        conn.execute("SELECT fleet.ensure_measurement_partitions(%s, %s)", span)
        assert conn.execute("SELECT fleet.ensure_measurement_partitions(%s, %s)", span).fetchone() == (0,)
        conn.execute("SET TimeZone = 'UTC'")
        bounds = conn.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'fleet.power_measurements'::regclass AND c.relname ~ '^power_measurements_[0-9]{8}$'"
            " ORDER BY 1"
        ).fetchall()
    weeks = {}
    for name, bound in bounds:
        low, high = (datetime.fromisoformat(v) for v in re.findall(r"'([^']+)'", bound))
        weeks[name] = (low, high)
        assert low.weekday() == 0 and low.time().isoformat() == "00:00:00" and low.utcoffset() == timedelta(0), bound
        assert high - low == timedelta(hours=168), bound
        assert name == f"power_measurements_{low:%Y%m%d}"
    lows = sorted(low for low, _ in weeks.values() if low >= span[0] - timedelta(days=7))
    assert all(b - a == timedelta(days=7) for a, b in itertools.pairwise(lows))
    assert lows[-1] >= datetime(2027, 11, 8, tzinfo=UTC)
