"""The upgrade of a deployed Admin database to the hourly energy of 006-008: a
database migrated with the files deployed before them and holding rows, the old view
and the old rollup (or aggregate), moved to the new definition while the ingest
keeps writing."""

from __future__ import annotations

import shutil
import threading
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from fleet.schema.bootstrap import maintain
from fleet.schema.files import sql_dir
from fleet.schema.migrate import migrate
from fleet.schema.profiles import ProfileSettings, apply_profile
from test_hourly_energy import NOW_HOUR, Readings, check_all, gaps, resets, steady
from test_ingest import _client, m


def deployed_sql(tmp_path: Path) -> Path:
    """sql/ as deployed before this change: versions 001-005 only (and no repeatable
    definitions, which came later)."""
    root = tmp_path / "sql"
    shutil.copytree(sql_dir(), root, ignore=shutil.ignore_patterns("repeatable"))
    for path in (root / "admin").glob("*.sql"):
        if int(path.name.split("_", 1)[0]) >= 6:
            path.unlink()
    return root


def _insert_old_way(conn: psycopg.Connection, customer: str, readings: dict[str, Readings]) -> None:
    rows = sorted((t, device, v) for device, rs in readings.items() for t, v in rs)
    for i in range(0, len(rows), 150):
        part = rows[i : i + 150]
        conn.execute(
            "SELECT fleet.insert_measurements(%s, %s::timestamptz[], %s::text[], %s::float8[], %s::float8[],"
            " %s::float8[], %s::float8[], %s::float8[], %s::float8[])",
            (
                customer,
                [r[0] for r in part],
                [r[1] for r in part],
                [500.0] * len(part),
                [None] * len(part),
                [None] * len(part),
                [r[2] for r in part],
                [None] * len(part),
                [None] * len(part),
            ),
        )


def test_upgrade_rebuilds_existing_hours_in_steps_while_the_ingest_writes(
    empty_db: str, admin_profile: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = NOW_HOUR - timedelta(days=50)
    before: dict[str, Readings] = {
        "steady": steady(base + timedelta(minutes=7)),
        "gaps": gaps(base + timedelta(days=5)),
        "resets": resets(base + timedelta(days=12)),
        "recent": steady(NOW_HOUR - timedelta(days=3, minutes=-7)),
    }
    with psycopg.connect(empty_db, autocommit=True) as conn:
        migrate(conn, "admin", admin_profile, root=deployed_sql(tmp_path))  # type: ignore[arg-type]
        _insert_old_way(conn, "DEV0001", before)
        if admin_profile == "timescale":
            conn.execute("CALL refresh_continuous_aggregate('fleet.hourly_per_device', NULL, NULL)")
        # The old definition: 750 Wh for a steady 1,000 W hour.
        old = conn.execute(
            "SELECT energy_wh FROM fleet.hourly_per_device WHERE device_id = 'steady' AND bucket = %s",
            (base + timedelta(hours=5),),
        ).fetchone()
        assert old == (750.0,)
        table = conn.execute("SELECT relfilenode FROM pg_class WHERE oid = 'fleet.power_measurements'::regclass")
        relfilenode = table.fetchone()

        result = migrate(conn, "admin", admin_profile)  # type: ignore[arg-type]
        # The energy migrations first; later versions (other changes) may follow them.
        assert [name[:3] for name in result.applied][:3] == ["006", "007", "008"]
        apply_profile(conn, admin_profile, ProfileSettings())  # type: ignore[arg-type]  # as the bootstrap does
        assert (
            conn.execute("SELECT relfilenode FROM pg_class WHERE oid = 'fleet.power_measurements'::regclass").fetchone()
            == relfilenode
        ), "the measurements were rewritten"
        queued = conn.execute("SELECT count(*) FROM fleet.hourly_refresh_queue").fetchone()
        assert queued is not None and queued[0] >= 47  # a day a row, from the oldest row to the newest

    # The ingest keeps writing while the maintenance works through the queue, a few
    # steps a run: new hours, and readings back-filled into hours not rebuilt yet.
    client = _client(empty_db, monkeypatch)
    api = next(client)
    late: dict[str, Readings] = {
        "steady": [(t + timedelta(minutes=7), v + 125.0) for t, v in before["steady"][10:40]],
        "recent": [(t + timedelta(minutes=1), v + 10.0) for t, v in steady(NOW_HOUR - timedelta(hours=20))[:20]],
        "new": steady(NOW_HOUR - timedelta(days=30, minutes=-3))[:30],
    }
    batches = [
        [m(t, device=device, power=500.0, energy_wh=v) for t, v in rows[i : i + 10]]
        for device, rows in late.items()
        for i in range(0, len(rows), 10)
    ]
    errors: list[BaseException] = []
    runs = 0

    def maintenance() -> None:
        nonlocal runs
        try:
            while True:
                runs += 1
                if maintain(empty_db, max_steps=40)["refresh_queue_remaining"] == 0:
                    return
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=maintenance)
    worker.start()
    for batch in batches:
        answer = api.post("measurements", batch)
        assert answer.status == 200 and answer.body["accepted"] == len(batch), answer.body
    worker.join(300)
    assert not worker.is_alive() and errors == []
    assert runs > 1, "the rebuild ran in one step"
    next(client, None)
    # What the last batches queued (timescale: rows older than the refresh window).
    assert maintain(empty_db)["refresh_queue_remaining"] == 0
    if admin_profile == "timescale":
        # Rows inside the refresh window that arrived after the rebuild had passed
        # their day are the refresh policy's to materialise: one run of it.
        with psycopg.connect(empty_db, autocommit=True) as conn:
            job = conn.execute(
                "SELECT job_id FROM timescaledb_information.jobs WHERE proc_name = 'policy_refresh_continuous_aggregate'"
            ).fetchone()
            assert job is not None
            conn.execute("CALL run_job(%s)", job)

    readings = {device: [*before.get(device, []), *late.get(device, [])] for device in {*before, *late}}
    check_all(empty_db, readings, ["DEV0001"])
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT to_regclass('fleet.hourly_rollup')").fetchone() == (None,)
