"""Profile set-up that must follow the stack's settings on every create and update,
and the scheduled maintenance of the Admin database.

- timescale: the columnstore policy and the continuous aggregate's refresh policy.
  ``add_*_policy(if_not_exists => true)`` keeps an existing policy as it was when the
  arguments differ, so a changed setting is applied with ``alter_job``.
- postgres: weekly partitions made ahead of time.
- both: time ranges queued by the ingest for a refresh of the hourly aggregate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
from pydantic import BaseModel, ConfigDict, Field

from fleet.migrations import Profile


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
    job = _job(conn, "policy_refresh_continuous_aggregate", "hourly_per_device")
    if job is None:
        conn.execute(
            "SELECT add_continuous_aggregate_policy('fleet.hourly_per_device',"
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


def refresh_queued_ranges(conn: psycopg.Connection, profile: Profile) -> int:
    """Refresh the hourly aggregate over the ranges the ingest queued; returns how many.

    ``refresh_continuous_aggregate`` cannot run inside a transaction block, so the
    connection must be in autocommit mode. The postgres profile keeps its rollup
    exact inside the ingest transaction and only empties the queue.
    """
    if not conn.autocommit:
        raise ValueError("refresh_queued_ranges needs an autocommit connection")
    rows = conn.execute(
        "SELECT id, range_start, range_end FROM fleet.hourly_refresh_queue ORDER BY range_start"
    ).fetchall()
    if not rows:
        return 0
    merged: list[list[Any]] = []
    for _id, start, end in rows:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    if profile == "timescale":
        for start, end in merged:
            conn.execute(
                "CALL refresh_continuous_aggregate('fleet.hourly_per_device', %s::timestamptz, %s::timestamptz)",
                (start, end),
            )
    conn.execute("DELETE FROM fleet.hourly_refresh_queue WHERE id = ANY(%s)", ([r[0] for r in rows],))
    return len(merged)
