"""``fleet status``: a fleet overview from the Admin database, read at a glance."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from fleet.ingest import digests
from fleet.schema.profiles import FailedJob, failed_jobs

# Per customer, from the audit trail (indexed by customer and time) rather than a
# scan of the measurements: measurement rows accepted in the last hour and day, the
# share of them that arrived back-dated (batches whose oldest row was over an hour
# old), and the newest batch's status and cursor. Sites and devices batches count
# only in "refused" and "newest".
# The day is 24 hours, not interval '1 day': that one is added in the session's
# time zone, and across a daylight-saving change it is 23 or 25 hours.
_QUERY = """
SELECT c.id, c.name, c.status, c.last_seen_at,
       coalesce(sum(e.accepted) FILTER (WHERE e.batch_type = 'measurements'
                                          AND e.received_at > %(at)s - interval '1 hour'), 0) AS rows_1h,
       coalesce(sum(e.accepted) FILTER (WHERE e.batch_type = 'measurements'), 0) AS rows_1d,
       coalesce(sum(e.accepted) FILTER (WHERE e.batch_type = 'measurements'
                                          AND e.min_time < e.received_at - interval '1 hour'), 0) AS late_1d,
       count(*) FILTER (WHERE e.status <> 200 AND e.received_at > %(at)s - interval '24 hours') AS refused_1d,
       (SELECT json_build_object('status', l.status, 'type', l.batch_type, 'cursor', l.client_cursor,
                                 'at', l.received_at)
          FROM fleet.ingest_events l WHERE l.customer_id = c.id ORDER BY l.id DESC LIMIT 1) AS newest
FROM fleet.customers c
LEFT JOIN fleet.ingest_events e ON e.customer_id = c.id AND e.received_at > %(at)s - interval '24 hours'
                               AND e.received_at <= %(at)s
GROUP BY c.id
ORDER BY c.id
"""


def fleet_status(conn: psycopg.Connection, at: datetime | None = None) -> list[dict[str, Any]]:
    """Per customer, the windows ending ``at`` (default: the database's now())."""
    keys = ("id", "name", "status", "last_seen_at", "rows_1h", "rows_1d", "late_1d", "refused_1d", "newest")
    if at is None:
        at = _db_now(conn)
    rows = [dict(zip(keys, row, strict=True)) for row in conn.execute(_QUERY, {"at": at})]
    digests.add_verification(conn, rows)  # "verified through", open mismatches
    return rows


def _db_now(conn: psycopg.Connection) -> datetime:
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]


def failed_background_jobs(conn: psycopg.Connection) -> list[FailedJob]:
    """TimescaleDB background jobs whose last run failed (none in the postgres profile)."""
    return failed_jobs(conn)


def _ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "never"
    seconds = int((now - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def render(rows: list[dict[str, Any]], now: datetime, failed: list[FailedJob] | None = None) -> str:
    header = (
        f"{'customer':<12} {'status':<9} {'last seen':<10} {'rows 1h':>9} {'rows 1d':>10} {'late':>6} "
        f"{'refused':>7}  newest batch"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        late = f"{100 * r['late_1d'] / r['rows_1d']:.0f}%" if r["rows_1d"] else "-"
        newest = r["newest"]
        batch = "-"
        if newest:
            cursor = (newest.get("cursor") or "")[:40]
            batch = f"{newest['status']} {newest.get('type') or '?'} cursor={cursor or '-'}"
        lines.append(
            f"{r['id']:<12} {r['status']:<9} {_ago(r['last_seen_at'], now):<10} {r['rows_1h']:>9} "
            f"{r['rows_1d']:>10} {late:>6} {r['refused_1d']:>7}  {batch}"
        )
    if not rows:
        lines.append("(no customers yet: fleet customers create ID --name NAME)")
    lines.extend(digests.verification_lines(rows))
    if failed:
        lines.append("")
        lines.append(f"background jobs whose last run failed: {len(failed)}")
        for job in failed:
            error = (job.error or "no error recorded").splitlines()[0][:120]
            lines.append(
                f"  job {job.job_id} {job.proc_name} ({job.relation or '-'}), {job.total_failures} failures,"
                f" last started {_ago(job.last_run_started_at, now)}: {error}"
            )
    return "\n".join(lines)
