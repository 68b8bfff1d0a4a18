"""What the bootstrap custom resource and ``fleet db migrate`` do: migrations and
profile set-up for a stack's role, and the Admin database's scheduled maintenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleet import db
from fleet.push.mapping import SourceMapping
from fleet.schema.files import ProfileChoice, Role
from fleet.schema.migrate import migrate
from fleet.schema.profiles import ProfileSettings, apply_profile, ensure_partitions, failed_jobs, refresh_queued_ranges
from fleet.schema.runner import applied_profile


@dataclass
class BootstrapOutcome:
    role: Role
    profile: str
    applied: list[str]
    already_applied: list[str]
    changes: list[str]
    definitions: list[str] = field(default_factory=list)  # repeatable definitions (re-)applied

    def as_data(self) -> dict[str, Any]:
        """Custom-resource Data (values must be strings for Fn::GetAtt)."""
        return {
            "Role": self.role,
            "Profile": self.profile,
            "Applied": ",".join(self.applied) or "-",
            "Definitions": ",".join(self.definitions)[:1000] or "-",
            "Changes": "; ".join(self.changes)[:1000] or "-",
        }


def bootstrap(
    conninfo: str,
    role: Role,
    requested: ProfileChoice = "auto",
    settings: ProfileSettings | None = None,
    mapping: SourceMapping | None = None,
) -> BootstrapOutcome:
    """Migrate the stack's database. A client stack's source mapping is checked against
    the portal's catalogue first; a mismatch fails with every problem named, before
    anything is changed."""
    settings = settings or ProfileSettings()
    with db.connect(conninfo) as conn:
        result = migrate(conn, role, requested, mapping=mapping)
        notices = [f"notice: {n}" for n in result.notices]
        changes: list[str] = result.changes + notices
        if role == "admin":
            changes = notices + apply_profile(conn, result.profile, settings).changes
    return BootstrapOutcome(
        role, result.profile, result.applied, result.already_applied, changes, result.definitions_applied
    )


def maintain(
    conninfo: str,
    settings: ProfileSettings | None = None,
    *,
    budget_s: float = 120.0,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Admin maintenance: partitions ahead (postgres), the queued hourly refreshes and
    rebuilds (within ``budget_s``), and (timescale) the background jobs whose last
    run failed."""
    settings = settings or ProfileSettings()
    with db.connect(conninfo) as conn:
        profile = applied_profile(conn, "admin")
        if profile is None:
            raise RuntimeError("the admin database has not been bootstrapped")
        created = 0
        if profile == "postgres":
            with conn.transaction():
                created = ensure_partitions(conn, settings.partitions_ahead)
        refresh = refresh_queued_ranges(conn, profile, settings, budget_s=budget_s, max_steps=max_steps)
        failed = failed_jobs(conn)
    return {
        "profile": profile,
        "partitions_created": created,
        "ranges_refreshed": refresh.steps,
        "refresh_queue_remaining": refresh.remaining,
        "failed_jobs": len(failed),
        "failed_job_details": [job.as_dict() for job in failed],
    }
