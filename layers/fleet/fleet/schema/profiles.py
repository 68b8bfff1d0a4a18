"""Profile set-up that must follow the stack's settings on every create and update,
and the scheduled maintenance of the Admin database.

- timescale: the columnstore policy and the continuous aggregate's refresh policy.
  ``add_*_policy(if_not_exists => true)`` keeps an existing policy as it was when the
  arguments differ, so a changed setting is applied with ``alter_job``.
- postgres: weekly partitions made ahead of time.
- both: time ranges queued for a refresh of the hourly state (``fleet.hourly_state``):
  back-filled ranges the ingest queued (timescale), and the history an upgrade queued
  for a rebuild by the definition of 006_energy.sql (both). Worked through oldest first
  in bounded steps, each step saved as it is done, within a time budget per run.
- timescale: background jobs whose last run failed, for the maintenance's report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
from pydantic import BaseModel, ConfigDict, Field

from fleet.schema.files import Profile


class ProfileSettings(BaseModel):
    """Tunable settings of the Admin database profile (from the custom resource)."""

    # Aliases are the custom resource's property names; values are ISO 8601
    # durations there (``P7D``, ``PT1H``).
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    chunk_interval: timedelta = Field(timedelta(days=7), alias="ChunkInterval", gt=timedelta(0))
    compress_after: timedelta = Field(timedelta(days=7), alias="CompressAfter", gt=timedelta(0))
    refresh_start_offset: timedelta = Field(timedelta(days=30), alias="RefreshStartOffset", gt=timedelta(0))
    refresh_end_offset: timedelta = Field(timedelta(hours=1), alias="RefreshEndOffset", ge=timedelta(0))
    refresh_schedule: timedelta = Field(timedelta(hours=1), alias="RefreshSchedule", gt=timedelta(0))
    partitions_ahead: timedelta = Field(timedelta(weeks=8), alias="PartitionsAhead", gt=timedelta(0))


@dataclass
class SetupReport:
    profile: Profile
    changes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "changes": self.changes}


def apply_profile(conn: psycopg.Connection, profile: Profile, settings: ProfileSettings) -> SetupReport:
    """Make the live profile objects match ``settings``; idempotent."""
    report = SetupReport(profile)
    with conn.transaction():
        if profile == "timescale":
            _apply_timescale(conn, settings, report)
        else:
            created = ensure_partitions(conn, settings.partitions_ahead)
            if created:
                report.changes.append(f"created {created} weekly partitions")
    return report


def _apply_timescale(conn: psycopg.Connection, s: ProfileSettings, report: SetupReport) -> None:
    row = conn.execute(
        "SELECT time_interval FROM timescaledb_information.dimensions"
        " WHERE hypertable_schema = 'fleet' AND hypertable_name = 'power_measurements'"
        " AND column_name = 'time'"
    ).fetchone()
    if row is None:
        raise RuntimeError("fleet.power_measurements is not a hypertable")
    if row[0] != s.chunk_interval:
        conn.execute(
            "SELECT set_chunk_time_interval('fleet.power_measurements', %s::interval)",
            (s.chunk_interval,),
        )
        report.changes.append(f"chunk interval {row[0]} -> {s.chunk_interval}")

    # Columnstore (compression) policy.
    job = _job(conn, "policy_compression", "power_measurements")
    if job is None:
        conn.execute(
            "SELECT add_compression_policy('fleet.power_measurements', %s::interval, if_not_exists => true)",
            (s.compress_after,),
        )
        report.changes.append(f"compression policy after {s.compress_after}")
    else:
        job_id, config, _schedule = job
        if _interval(conn, config.get("compress_after")) != s.compress_after:
            config["compress_after"] = _interval_text(s.compress_after)
            conn.execute("SELECT alter_job(%s, config => %s::jsonb)", (job_id, json.dumps(config)))
            report.changes.append(f"compression policy after -> {s.compress_after}")

    # Continuous aggregate refresh policy.
    job = _job(conn, "policy_refresh_continuous_aggregate", "hourly_state")
    if job is None:
        conn.execute(
            "SELECT add_continuous_aggregate_policy('fleet.hourly_state',"
            " start_offset => %s::interval, end_offset => %s::interval,"
            " schedule_interval => %s::interval, if_not_exists => true)",
            (s.refresh_start_offset, s.refresh_end_offset, s.refresh_schedule),
        )
        report.changes.append(f"refresh policy start {s.refresh_start_offset} end {s.refresh_end_offset}")
    else:
        job_id, config, schedule = job
        changed = False
        if _interval(conn, config.get("start_offset")) != s.refresh_start_offset:
            config["start_offset"] = _interval_text(s.refresh_start_offset)
            changed = True
        if _interval(conn, config.get("end_offset")) != s.refresh_end_offset:
            config["end_offset"] = _interval_text(s.refresh_end_offset)
            changed = True
        if changed:
            conn.execute("SELECT alter_job(%s, config => %s::jsonb)", (job_id, json.dumps(config)))
            report.changes.append(f"refresh policy -> start {s.refresh_start_offset} end {s.refresh_end_offset}")
        if schedule != s.refresh_schedule:
            conn.execute(
                "SELECT alter_job(%s, schedule_interval => %s::interval)",
                (job_id, s.refresh_schedule),
            )
            report.changes.append(f"refresh schedule -> {s.refresh_schedule}")


def _job(conn: psycopg.Connection, proc_name: str, relation: str) -> tuple[int, dict[str, Any], timedelta] | None:
    row = conn.execute(
        "SELECT job_id, config, schedule_interval FROM timescaledb_information.jobs"
        " WHERE proc_name = %s AND hypertable_schema = 'fleet' AND hypertable_name = %s",
        (proc_name, relation),
    ).fetchone()
    if row is None:
        # A continuous aggregate's job names its materialisation hypertable.
        row = conn.execute(
            "SELECT j.job_id, j.config, j.schedule_interval"
            " FROM timescaledb_information.jobs j"
            " WHERE j.proc_name = %s AND (j.config->>'mat_hypertable_id')::int = ("
            "   SELECT mat_hypertable_id FROM _timescaledb_catalog.continuous_agg"
            "   WHERE user_view_schema = 'fleet' AND user_view_name = %s)",
            (proc_name, relation),
        ).fetchone()
    if row is None:
        return None
    return int(row[0]), dict(row[1] or {}), row[2]


def _interval(conn: psycopg.Connection, text: object) -> timedelta | None:
    if text is None:
        return None
    row = conn.execute("SELECT %s::interval", (str(text),)).fetchone()
    return row[0] if row else None


def _interval_text(value: timedelta) -> str:
    return f"{int(value.total_seconds())} seconds"


def ensure_partitions(conn: psycopg.Connection, ahead: timedelta) -> int:
    """Postgres profile: make the weekly partitions from last week to ``now + ahead``."""
    row = conn.execute(
        "SELECT fleet.ensure_measurement_partitions(now() - interval '7 days', now() + %s::interval)",
        (ahead,),
    ).fetchone()
    return int(row[0]) if row else 0


HOUR = timedelta(hours=1)
# One step of work on the queue: an hour of history rebuilt (postgres: it holds the
# ingest off while it runs, so it stays short whatever the fleet's size), a day
# refreshed (timescale: the refresh does not block inserts).
_STEP: dict[Profile, timedelta] = {"postgres": HOUR, "timescale": timedelta(days=1)}


@dataclass
class RefreshReport:
    steps: int = 0
    remaining: int = 0  # queued ranges left for the next run


def refresh_queued_ranges(
    conn: psycopg.Connection,
    profile: Profile,
    settings: ProfileSettings | None = None,
    *,
    budget_s: float = 120.0,
    max_steps: int | None = None,
) -> RefreshReport:
    """Work through ``fleet.hourly_refresh_queue``, oldest first, until it is empty,
    ``budget_s`` has passed or ``max_steps`` were done; each step's progress is saved.

    postgres: ``fleet.hourly_state_rebuild`` an hour at a time. timescale:
    ``refresh_continuous_aggregate`` a day at a time, widened by an hour on each side
    (the neighbours the view reads for these hours are refreshed with them), and
    never past the refresh policy's end offset: the hour still being written stays
    real-time, so a row arriving in it is in the view at once.
    ``refresh_continuous_aggregate`` cannot run inside a transaction block, so the
    connection must be in autocommit mode.
    """
    if not conn.autocommit:
        raise ValueError("refresh_queued_ranges needs an autocommit connection")
    settings = settings or ProfileSettings()
    deadline = time.monotonic() + budget_s
    report = RefreshReport()
    limit = _refresh_limit(conn, settings) if profile == "timescale" else None
    for ids, start, end in _queued_groups(conn):
        if limit is not None:
            start, end = start - HOUR, min(end + HOUR, limit)
        pos = start
        while pos < end:
            if time.monotonic() >= deadline or (max_steps is not None and report.steps >= max_steps):
                report.remaining = _queue_length(conn)
                return report
            step_end = min(pos + _STEP[profile], end)
            if profile == "timescale":
                conn.execute(
                    "CALL refresh_continuous_aggregate('fleet.hourly_state', %s::timestamptz, %s::timestamptz)",
                    (pos, step_end),
                )
                _advance(conn, ids, step_end)
            else:
                with conn.transaction():
                    conn.execute("SELECT fleet.hourly_state_rebuild(%s, %s)", (pos, step_end))
                    _advance(conn, ids, step_end)
            report.steps += 1
            pos = step_end
        # Done, or (timescale) the rest is newer than the policy's end offset: the
        # real-time part shows it and the policy materialises it.
        conn.execute("DELETE FROM fleet.hourly_refresh_queue WHERE id = ANY(%s)", (ids,))
    report.remaining = _queue_length(conn)
    return report


def _queued_groups(conn: psycopg.Connection) -> list[tuple[list[int], Any, Any]]:
    """Queued ranges, overlapping ones merged: (ids, start, end), oldest first."""
    rows = conn.execute(
        "SELECT id, range_start, range_end FROM fleet.hourly_refresh_queue ORDER BY range_start"
    ).fetchall()
    groups: list[tuple[list[int], Any, Any]] = []
    for row_id, start, end in rows:
        if groups and start <= groups[-1][2]:
            ids, first, last = groups[-1]
            groups[-1] = ([*ids, row_id], first, max(last, end))
        else:
            groups.append(([row_id], start, end))
    return groups


def _advance(conn: psycopg.Connection, ids: list[int], done_until: Any) -> None:
    conn.execute("DELETE FROM fleet.hourly_refresh_queue WHERE id = ANY(%s) AND range_end <= %s", (ids, done_until))
    conn.execute(
        "UPDATE fleet.hourly_refresh_queue SET range_start = %s WHERE id = ANY(%s) AND range_start < %s",
        (done_until, ids, done_until),
    )


def _queue_length(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM fleet.hourly_refresh_queue").fetchone()
    return int(row[0]) if row else 0


def _refresh_limit(conn: psycopg.Connection, settings: ProfileSettings) -> Any:
    """Where the refresh policy stops: the start of the hour ``end_offset`` ago."""
    job = _job(conn, "policy_refresh_continuous_aggregate", "hourly_state")
    offset = _interval(conn, job[1].get("end_offset")) if job else None
    if offset is None:
        offset = settings.refresh_end_offset
    row = conn.execute("SELECT time_bucket(INTERVAL '1 hour', now() - %s::interval)", (offset,)).fetchone()
    assert row is not None
    return row[0]


@dataclass(frozen=True)
class FailedJob:
    job_id: int
    proc_name: str
    relation: str | None
    last_run_started_at: Any
    total_failures: int
    error: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "proc_name": self.proc_name,
            "relation": self.relation,
            "last_run_started_at": str(self.last_run_started_at),
            "total_failures": self.total_failures,
            "error": self.error,
        }


def failed_jobs(conn: psycopg.Connection) -> list[FailedJob]:
    """TimescaleDB background jobs whose last run failed, with the latest error.

    A job that fails commits nothing of its own failure anywhere else: its work may
    even have committed (PostgreSQL 15.20 with TimescaleDB 2.28.3 ends every policy
    run with "cannot drop portal"), and it is rescheduled as if nothing happened.
    Empty where TimescaleDB is not installed."""
    row = conn.execute("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')").fetchone()
    if not row or not row[0]:
        return []
    rows = conn.execute(
        "SELECT s.job_id, j.proc_name, j.hypertable_schema || '.' || j.hypertable_name,"
        " s.last_run_started_at, s.total_failures,"
        " (SELECT e.err_message FROM timescaledb_information.job_errors e"
        "   WHERE e.job_id = s.job_id ORDER BY e.start_time DESC LIMIT 1)"
        " FROM timescaledb_information.job_stats s"
        " JOIN timescaledb_information.jobs j ON j.job_id = s.job_id"
        " WHERE s.last_run_status = 'Failed'"
        " ORDER BY s.job_id"
    ).fetchall()
    return [FailedJob(int(r[0]), str(r[1]), r[2], r[3], int(r[4] or 0), r[5]) for r in rows]
