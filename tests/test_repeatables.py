"""Repeatable definitions: each function, aggregate and view in one file, applied after
the versioned migrations when its checksum changed (or its object is missing), under
the migrations' lock and in their transaction; a database migrated with the files
deployed before them moves forward with its rows and the very same definitions."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from fleet.errors import MigrationError
from fleet.schema.files import discover, discover_repeatables, sql_dir
from fleet.schema.migrate import migrate

ROOT = Path(__file__).resolve().parents[1]
PREVIOUS = "d62dcf8"  # main before repeatable definitions: every body still in its versioned files


def previous_sql(tmp_path: Path) -> Path:
    """sql/ as the commit before repeatable definitions had it, read from git; where
    the clone lacks that commit, the working tree's versioned files (which the
    checksum check keeps byte for byte as they were applied)."""
    root = tmp_path / "previous_sql"
    listing = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", PREVIOUS, "sql"], cwd=ROOT, capture_output=True, text=True
    )
    if listing.returncode != 0:
        shutil.copytree(sql_dir(), root, ignore=shutil.ignore_patterns("repeatable"))
        return root
    for name in listing.stdout.split():
        blob = subprocess.run(["git", "show", f"{PREVIOUS}:{name}"], cwd=ROOT, capture_output=True, check=True)
        target = root / Path(name).relative_to("sql")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blob.stdout)
    return root


def copied_sql(tmp_path: Path) -> Path:
    root = tmp_path / "sql"
    shutil.copytree(sql_dir(), root)
    return root


def definitions(conn: psycopg.Connection) -> dict[str, object]:
    """Every function, aggregate and view of the fleet schema as the server holds it."""
    found: dict[str, object] = {}
    for oid, kind in conn.execute(
        "SELECT p.oid::regprocedure::text, p.prokind FROM pg_proc p"
        " WHERE p.pronamespace = 'fleet'::regnamespace ORDER BY 1"
    ):
        if kind == "a":
            found[oid] = conn.execute(
                "SELECT aggtransfn::text, aggfinalfn::text, aggtranstype::regtype::text, agginitval,"
                " p.proparallel FROM pg_aggregate a JOIN pg_proc p ON p.oid = a.aggfnoid"
                " WHERE aggfnoid = %s::regprocedure",
                (oid,),
            ).fetchone()
        else:
            found[oid] = conn.execute("SELECT pg_get_functiondef(%s::regprocedure)", (oid,)).fetchone()
    for (view,) in conn.execute(
        "SELECT c.oid::regclass::text FROM pg_class c WHERE c.relnamespace = 'fleet'::regnamespace"
        " AND c.relkind = 'v' ORDER BY 1"
    ):
        columns = conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attnum > 0 ORDER BY attnum",
            (view,),
        ).fetchall()
        found[view] = (conn.execute("SELECT pg_get_viewdef(%s::regclass, true)", (view,)).fetchone(), columns)
    return found


def catalogue_versions(conn: psycopg.Connection) -> dict[str, int]:
    """The transaction that last wrote each function's and view's catalogue row: a
    CREATE OR REPLACE, even of the same text, writes it again."""
    rows = conn.execute(
        "SELECT p.oid::regprocedure::text, p.xmin::text::bigint FROM pg_proc p"
        " WHERE p.pronamespace = 'fleet'::regnamespace"
        " UNION ALL SELECT r.ev_class::regclass::text, r.xmin::text::bigint FROM pg_rewrite r"
        " JOIN pg_class c ON c.oid = r.ev_class WHERE c.relnamespace = 'fleet'::regnamespace AND c.relkind = 'v'"
    ).fetchall()
    return dict(rows)


def _insert(conn: psycopg.Connection, customer: str, start: datetime, count: int) -> None:
    times = [start + timedelta(minutes=15 * i) for i in range(count)]
    conn.execute(
        "SELECT fleet.insert_measurements(%s, %s::timestamptz[], %s::text[], %s::float8[], %s::float8[],"
        " %s::float8[], %s::float8[], %s::float8[], %s::float8[])",
        (
            customer,
            times,
            ["meter-1"] * count,
            [1000.0 + i for i in range(count)],
            [230.0] * count,
            [None] * count,
            [250.0 * i for i in range(count)],
            [None] * count,
            [50.0] * count,
        ),
    )


def _snapshot(conn: psycopg.Connection, profile: str) -> tuple[list[tuple], list[tuple]]:
    if profile == "timescale":
        conn.execute("CALL refresh_continuous_aggregate('fleet.hourly_state', NULL, NULL)")
    rows = conn.execute("SELECT * FROM fleet.power_measurements ORDER BY time, device_id").fetchall()
    hours = conn.execute("SELECT * FROM fleet.hourly_per_device ORDER BY customer_id, device_id, bucket").fetchall()
    return rows, hours


def test_every_function_and_view_has_one_repeatable_file_per_profile() -> None:
    for profile in ("postgres", "timescale"):
        names = [r.qualified for r in discover_repeatables("admin", profile)]
        assert len(names) == len(set(names)), profile
        assert {"fleet.insert_measurements", "fleet.hourly_per_device", "fleet.register_rise"} <= set(names)
    assert "fleet.ensure_measurement_partitions" in {r.qualified for r in discover_repeatables("admin", "postgres")}
    assert discover_repeatables("client", "postgres") == []


def test_the_portal_database_gets_no_definitions_and_no_bookkeeping_for_them(empty_db: str) -> None:
    with psycopg.connect(empty_db, autocommit=True) as conn:
        result = migrate(conn, "client")
        assert result.applied == ["001_monitoring.sql"]
        assert result.definitions_applied == [] and result.definitions_unchanged == []
        assert conn.execute("SELECT to_regclass('fleet_meta.repeatables')").fetchone() == (None,)


def test_fresh_database_gets_the_same_definitions_as_the_previous_files_made(
    pg_server, empty_db: str, admin_profile: str, tmp_path: Path
) -> None:
    old_db = pg_server.create_database(prefix="prev")
    try:
        with psycopg.connect(pg_server.url(old_db), autocommit=True) as conn:
            old = migrate(conn, "admin", admin_profile, root=previous_sql(tmp_path))  # type: ignore[arg-type]
            assert old.definitions_applied == []
            before = definitions(conn)
    finally:
        pg_server.drop_database(old_db)
    repeatables = discover_repeatables("admin", admin_profile)  # type: ignore[arg-type]
    with psycopg.connect(empty_db, autocommit=True) as conn:
        fresh = migrate(conn, "admin", admin_profile)  # type: ignore[arg-type]
        after = definitions(conn)
        assert fresh.definitions_applied == [r.path.name for r in repeatables]
        assert after == before
        # Every repeatable names an object the database holds, and a function's text is
        # the one of its file (the body between the dollar quotes, byte for byte).
        held = {name.split("(")[0] for name in after}
        assert {r.qualified for r in repeatables} <= held
        insert = next(r for r in repeatables if r.name == "insert_measurements")
        held_text = conn.execute("SELECT prosrc FROM pg_proc WHERE oid = 'fleet.insert_measurements'::regproc")
        assert held_text.fetchone() == (insert.sql.split("$$")[1],)


def test_database_of_the_previous_files_moves_forward_keeping_its_rows(
    empty_db: str, admin_profile: str, tmp_path: Path
) -> None:
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=3)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        migrate(conn, "admin", admin_profile, root=previous_sql(tmp_path))  # type: ignore[arg-type]
        conn.execute("INSERT INTO fleet.customers (id, name) VALUES ('DEV0001', 'Dev')")
        _insert(conn, "DEV0001", start, 40)
        before = definitions(conn)
        rows, hours = _snapshot(conn, admin_profile)
        assert len(rows) == 40 and hours

        result = migrate(conn, "admin", admin_profile)  # type: ignore[arg-type]
        assert result.applied == []  # no versioned file is new: only the definitions
        assert result.already_applied == [m.path.name for m in discover("admin", admin_profile)]  # type: ignore[arg-type]
        assert result.definitions_applied == [
            r.path.name
            for r in discover_repeatables("admin", admin_profile)  # type: ignore[arg-type]
        ]
        assert definitions(conn) == before
        assert _snapshot(conn, admin_profile) == (rows, hours)
        # The ingest goes on as before: a re-delivered batch adds nothing, new rows land.
        _insert(conn, "DEV0001", start, 40)
        _insert(conn, "DEV0001", start + timedelta(minutes=15 * 40), 8)
        assert conn.execute("SELECT count(*) FROM fleet.power_measurements").fetchone() == (48,)
        again = migrate(conn, "admin", admin_profile)  # type: ignore[arg-type]
        assert again.applied == [] and again.definitions_applied == []
        assert again.definitions_unchanged == result.definitions_applied


def test_changed_repeatable_is_applied_once_and_unchanged_ones_not_at_all(
    empty_db: str, admin_profile: str, tmp_path: Path
) -> None:
    root = copied_sql(tmp_path)
    target = root / "admin" / "repeatable" / "30_fleet.ingest_release.sql"
    with psycopg.connect(empty_db, autocommit=True) as conn:
        migrate(conn, "admin", admin_profile, root=root)  # type: ignore[arg-type]
        versions = catalogue_versions(conn)
        recorded_before = dict(conn.execute("SELECT name, applied_at FROM fleet_meta.repeatables").fetchall())
        target.write_text(
            target.read_text().replace(
                "    UPDATE fleet.ingest_admission", "    -- edited\n    UPDATE fleet.ingest_admission"
            )
        )

        changed = migrate(conn, "admin", admin_profile, root=root)  # type: ignore[arg-type]
        assert changed.applied == []
        assert changed.definitions_applied == ["30_fleet.ingest_release.sql"]
        assert (
            "-- edited"
            in conn.execute("SELECT prosrc FROM pg_proc WHERE oid = 'fleet.ingest_release'::regproc").fetchone()[0]
        )  # type: ignore[index]
        after = catalogue_versions(conn)
        release = "fleet.ingest_release(text,timestamp with time zone)"
        assert after[release] != versions[release]
        assert {k: v for k, v in after.items() if k != release} == {k: v for k, v in versions.items() if k != release}
        recorded = dict(conn.execute("SELECT name, applied_at FROM fleet_meta.repeatables").fetchall())
        assert recorded["fleet.ingest_release"] > recorded_before["fleet.ingest_release"]
        assert {k: v for k, v in recorded.items() if k != "fleet.ingest_release"} == {
            k: v for k, v in recorded_before.items() if k != "fleet.ingest_release"
        }

        once = migrate(conn, "admin", admin_profile, root=root)  # type: ignore[arg-type]
        assert once.definitions_applied == []
        assert catalogue_versions(conn) == after


def test_broken_repeatable_rolls_the_whole_run_back_naming_the_file(
    empty_db: str, admin_profile: str, tmp_path: Path
) -> None:
    root = copied_sql(tmp_path)
    target = root / "admin" / "repeatable" / "30_fleet.ingest_admit.sql"
    with psycopg.connect(empty_db, autocommit=True) as conn:
        migrate(conn, "admin", admin_profile, root=root)  # type: ignore[arg-type]
        before = definitions(conn)
        checksums = dict(conn.execute("SELECT name, checksum FROM fleet_meta.repeatables").fetchall())
        (root / "admin" / "999_extra.sql").write_text("CREATE TABLE fleet.extra (id int);")
        good = target.read_text()
        target.write_text(good.replace("RETURN ticket;", "RETURN ticket"))  # plpgsql: a syntax error

        with pytest.raises(MigrationError, match=r"admin repeatable definition 30_fleet\.ingest_admit\.sql failed"):
            migrate(conn, "admin", admin_profile, root=root)  # type: ignore[arg-type]
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT to_regclass('fleet.extra')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM fleet_meta.migrations WHERE version = '999'").fetchone() == (0,)
        assert dict(conn.execute("SELECT name, checksum FROM fleet_meta.repeatables").fetchall()) == checksums
        assert definitions(conn) == before

        target.write_text(good)
        fixed = migrate(conn, "admin", admin_profile, root=root)  # type: ignore[arg-type]
        assert fixed.applied == ["999_extra.sql"] and fixed.definitions_applied == []


_DAILY = """-- A view over fleet.hourly_per_device (test only).
CREATE OR REPLACE VIEW fleet.daily_per_device AS
SELECT date_trunc('day', bucket, 'UTC') AS day, customer_id, device_id, sum(energy_wh) AS energy_wh
FROM fleet.hourly_per_device GROUP BY 1, 2, 3;
"""


def test_view_replaced_with_other_columns_brings_its_dependent_views_back(
    empty_db: str, admin_profile: str, tmp_path: Path
) -> None:
    root = copied_sql(tmp_path)
    folder = root / "admin" / "repeatable"
    (folder / "60_fleet.daily_per_device.sql").write_text(_DAILY)
    hourly = folder / "50_fleet.hourly_per_device.sql"
    with psycopg.connect(empty_db, autocommit=True) as conn:
        first = migrate(conn, "admin", admin_profile, root=root)  # type: ignore[arg-type]
        assert first.definitions_applied[-1] == "60_fleet.daily_per_device.sql"
        # CREATE OR REPLACE VIEW cannot change a column's type: the run says which file.
        retyped = hourly.read_text().replace("x.energy_wh\nFROM", "x.energy_wh::numeric AS energy_wh\nFROM")
        assert retyped != hourly.read_text()
        hourly.write_text(retyped)
        with pytest.raises(MigrationError, match=r"50_fleet\.hourly_per_device\.sql failed"):
            migrate(conn, "admin", admin_profile, root=root)  # type: ignore[arg-type]
        # The rule: the file drops the view and the project's views on it, by name.
        hourly.write_text(
            "DROP VIEW IF EXISTS fleet.daily_per_device;\nDROP VIEW IF EXISTS fleet.hourly_per_device;\n" + retyped
        )
        result = migrate(conn, "admin", admin_profile, root=root)  # type: ignore[arg-type]
        assert result.definitions_applied == ["50_fleet.hourly_per_device.sql", "60_fleet.daily_per_device.sql"]
        types = dict(
            conn.execute(
                "SELECT attrelid::regclass::text, format_type(atttypid, atttypmod) FROM pg_attribute"
                " WHERE attrelid IN ('fleet.hourly_per_device'::regclass, 'fleet.daily_per_device'::regclass)"
                " AND attname = 'energy_wh'"
            ).fetchall()
        )
        assert types == {"fleet.hourly_per_device": "numeric", "fleet.daily_per_device": "numeric"}
        assert migrate(conn, "admin", admin_profile, root=root)  # type: ignore[arg-type].definitions_applied == []


def test_missing_object_is_created_again_and_a_removed_file_forgets_its_record(
    empty_db: str, admin_profile: str, tmp_path: Path
) -> None:
    root = copied_sql(tmp_path)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        migrate(conn, "admin", admin_profile, root=root)  # type: ignore[arg-type]
        conn.execute("DROP FUNCTION fleet.ingest_release(text, timestamptz)")
        again = migrate(conn, "admin", admin_profile, root=root)  # type: ignore[arg-type]
        assert again.definitions_applied == ["30_fleet.ingest_release.sql"]
        assert conn.execute("SELECT to_regproc('fleet.ingest_release') IS NOT NULL").fetchone() == (True,)
        (root / "admin" / "repeatable" / "30_fleet.ingest_release.sql").unlink()
        migrate(conn, "admin", admin_profile, root=root)  # type: ignore[arg-type]
        names = {row[0] for row in conn.execute("SELECT name FROM fleet_meta.repeatables")}
        assert "fleet.ingest_release" not in names and "fleet.ingest_admit" in names


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["30_insert_measurements.sql"], "file name not understood"),
        (["30_fleet.f.sql", "40_fleet.f.sql"], "different orders"),
        (["30_fleet.f.sql", "30_fleet.f.postgres.sql"], "mixes generic and profile files"),
        (["30_fleet.f.oracle.sql"], "unknown profile"),
    ],
)
def test_repeatable_files_that_cannot_be_ordered_are_refused(tmp_path: Path, files: list[str], message: str) -> None:
    folder = tmp_path / "admin" / "repeatable"
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=message):
        discover_repeatables("admin", "postgres", tmp_path)


def test_check_and_migrate_commands_list_the_definitions(
    empty_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleet_local import cli

    names = [r.path.name for r in discover_repeatables("admin", "postgres")]
    check = ["db", "check", "--role", "admin", "--profile", "postgres", "--database-url", empty_db]
    assert cli.main(check) == 0
    out = capsys.readouterr().out
    assert f"migrations: 0 applied, {len(discover('admin', 'postgres'))} pending" in out
    assert all(f"definition to apply: {name}" in out for name in names), out
    with psycopg.connect(empty_db) as conn:  # the check changed nothing
        assert conn.execute("SELECT to_regnamespace('fleet_meta')").fetchone() == (None,)

    migrate_cmd = ["db", "migrate", "--role", "admin", "--profile", "postgres", "--database-url", empty_db]
    assert cli.main(migrate_cmd) == 0
    out = capsys.readouterr().out
    assert "applied: 001_core.sql" in out and "definition applied: 30_fleet.insert_measurements.postgres.sql" in out
    assert cli.main(migrate_cmd) == 0
    assert f"already applied, {len(names)} definitions unchanged)" in capsys.readouterr().out
    assert cli.main(check) == 0
    assert f"definitions: {len(names)} current, 0 to apply" in capsys.readouterr().out

    root = copied_sql(tmp_path)
    monkeypatch.setenv("FLEET_SQL_DIR", str(root))
    view = root / "admin" / "repeatable" / "50_fleet.hourly_per_device.sql"
    view.write_text(view.read_text() + "\n-- edited\n")
    core = root / "admin" / "001_core.sql"
    core.write_text(core.read_text() + "\n-- edited after it was applied\n")
    assert cli.main(check) == 1
    captured = capsys.readouterr()
    assert "definition to apply: 50_fleet.hourly_per_device.sql" in captured.out
    assert "error: 001_core.sql was changed after it was applied" in captured.err


def test_bootstrap_reports_the_definitions_it_applied(empty_db: str) -> None:
    from fleet.schema.bootstrap import bootstrap

    first = bootstrap(empty_db, "admin", "postgres").as_data()
    assert first["Definitions"].split(",") == [r.path.name for r in discover_repeatables("admin", "postgres")]
    assert bootstrap(empty_db, "admin", "postgres").as_data()["Definitions"] == "-"


def test_sql_dir_finds_the_definitions_in_the_repo_and_in_the_built_layer() -> None:
    from fleet.schema import files

    assert sql_dir().resolve() == (ROOT / "sql").resolve()
    # Without the package's sql link (a checkout that keeps no symlinks): the repo's.
    assert Path(files.__file__).resolve().parents[4] / "sql" == ROOT / "sql"
    built = ROOT / ".aws-sam" / "build" / "FleetLayer" / "python" / "fleet" / "sql"
    if built.is_dir():  # after `make build`: the layer carries sql/ as the repo has it
        ours = {p.relative_to(ROOT / "sql"): p.read_bytes() for p in (ROOT / "sql").rglob("*.sql")}
        shipped = {p.relative_to(built): p.read_bytes() for p in built.rglob("*.sql")}
        assert shipped == ours
