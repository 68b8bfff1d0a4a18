"""Failed TimescaleDB background jobs are seen: the maintenance reads
timescaledb_information.job_stats, reports the jobs whose last run failed (and the
handler emits the metric the template's alarm watches), and ``fleet status`` says so."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime

import bootstrap
import psycopg
import pytest
from fleet import config
from fleet.schema.bootstrap import maintain
from fleet.schema.migrate import migrate
from fleet.schema.profiles import ProfileSettings, apply_profile
from fleet_local.cluster import LocalCluster
from fleet_local.status import failed_background_jobs, fleet_status, render
from support import FakeLambdaContext, load_event
from test_template import load_template


def wait_for(check: Callable[[], bool], timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out waiting for the background job"
        time.sleep(0.5)


def _emf_metrics(out: str) -> dict[str, list[float]]:
    metrics: dict[str, list[float]] = {}
    for line in out.splitlines():
        if '"_aws"' in line:
            doc = json.loads(line)
            for d in doc["_aws"]["CloudWatchMetrics"]:
                for metric in d["Metrics"]:
                    metrics[metric["Name"]] = doc[metric["Name"]]
    return metrics


def test_maintenance_reports_background_jobs_whose_last_run_failed(
    timescale_required: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The session's cluster runs no background workers; this one does.
    with LocalCluster(timescaledb_background_workers=4) as cluster:
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE fleet_jobs")
        url = cluster.url("fleet_jobs")
        with psycopg.connect(url, autocommit=True) as conn:
            migrate(conn, "admin", "timescale")
            apply_profile(conn, "timescale", ProfileSettings())
            assert failed_background_jobs(conn) == []
            conn.execute(
                "CREATE PROCEDURE fleet.test_failing_job(job_id int, config jsonb) LANGUAGE plpgsql"
                " AS $$ BEGIN RAISE EXCEPTION 'the portal database is gone'; END $$"
            )
            job_id = conn.execute(
                "SELECT add_job('fleet.test_failing_job', INTERVAL '1 hour', initial_start => now())"
            ).fetchone()[0]  # type: ignore[index]
            # The refresh policy runs now too (on PostgreSQL 15.20 its runs end Failed).
            conn.execute(
                "SELECT alter_job(job_id, next_start => now()) FROM timescaledb_information.jobs"
                " WHERE proc_name = 'policy_refresh_continuous_aggregate'"
            )

            def ran() -> bool:
                row = conn.execute(
                    "SELECT bool_or(s.job_id = %s AND s.last_run_status = 'Failed'),"
                    " bool_or(j.proc_name = 'policy_refresh_continuous_aggregate' AND s.last_run_status IS NOT NULL)"
                    " FROM timescaledb_information.job_stats s JOIN timescaledb_information.jobs j USING (job_id)",
                    (job_id,),
                ).fetchone()
                return bool(row and row[0] and row[1])

            def idle() -> bool:
                row = conn.execute(
                    "SELECT count(*) FROM timescaledb_information.job_stats WHERE job_status = 'Running'"
                ).fetchone()
                return bool(row and row[0] == 0)

            wait_for(ran)
            # Every job held still, so that the runs seen here are the ones reported.
            conn.execute("SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs")
            wait_for(idle)
            failed_ids = {
                r[0]
                for r in conn.execute(
                    "SELECT job_id FROM timescaledb_information.job_stats WHERE last_run_status = 'Failed'"
                )
            }

        report = maintain(url)
        assert report["failed_jobs"] == len(failed_ids) >= 1
        assert {j["job_id"] for j in report["failed_job_details"]} == failed_ids
        mine = next(j for j in report["failed_job_details"] if j["job_id"] == job_id)
        assert mine["proc_name"] == "test_failing_job"
        assert "the portal database is gone" in (mine["error"] or "")
        assert mine["total_failures"] >= 1

        with psycopg.connect(url) as conn:
            text = render(fleet_status(conn), datetime.now(UTC), failed_background_jobs(conn))
        assert f"background jobs whose last run failed: {len(failed_ids)}" in text
        assert f"job {job_id} test_failing_job" in text and "the portal database is gone" in text

        # The handler emits the metric the template's alarm watches.
        for name in ("DB_SECRET_ARN", "DATABASE_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("DATABASE_URL", url)
        monkeypatch.setenv("FLEET_ROLE", "admin")
        config.cached.cache_clear()
        capsys.readouterr()
        try:
            bootstrap.maintenance_handler(load_event("bootstrap/maintenance.json"), FakeLambdaContext())
        finally:
            config.cached.cache_clear()
        assert _emf_metrics(capsys.readouterr().out)["FailedBackgroundJobs"] == [float(len(failed_ids))]


def test_the_template_alarms_on_failed_background_jobs() -> None:
    template = load_template()
    alarm = template["Resources"]["FailedBackgroundJobsAlarm"]
    props = alarm["Properties"]
    assert alarm["Condition"] == "IsAdmin"
    assert (props["Namespace"], props["MetricName"]) == ("FleetPipeline", "FailedBackgroundJobs")
    assert props["ComparisonOperator"] == "GreaterThanThreshold" and props["Threshold"] == 0
    maintenance = template["Resources"]["MaintenanceFunction"]["Properties"]
    assert maintenance["Handler"] == "bootstrap.maintenance_handler"


def test_no_background_jobs_are_reported_in_the_postgres_profile(admin_db_postgres: str) -> None:
    report = maintain(admin_db_postgres)
    assert (report["failed_jobs"], report["failed_job_details"]) == (0, [])
