"""The runner of both roles: the profile chosen from what the server offers, then
what is pending applied in one transaction under the migrations' advisory lock,
the versioned migrations first and the repeatable definitions after them (the
rules: fleet.schema.migrate)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from fleet.errors import MigrationChecksumMismatch, ProfileError
from fleet.schema.files import Profile, ProfileChoice, Role, discover
from fleet.schema.repeatable import apply_repeatables, repeatables_due

# The advisory lock's key: the same in every release, so that old and new code serialise.
LOCK_KEY = "fleet.migrations"

_BOOKKEEPING = """
CREATE SCHEMA IF NOT EXISTS fleet_meta;
CREATE TABLE IF NOT EXISTS fleet_meta.migrations (
    role       text NOT NULL,
    version    text NOT NULL,
    name       text NOT NULL,
    profile    text,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (role, version)
)
"""


@dataclass
class SchemaStatus:
    """What a run would do, found without changing anything (``fleet db check``)."""

    role: Role
    profile: Profile
    applied: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    edited: list[str] = field(default_factory=list)  # applied, and changed since: refused by a run
    definitions_due: list[str] = field(default_factory=list)
    definitions_current: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # why auto passed TimescaleDB over


@dataclass
class MigrationResult:
    role: Role
    profile: Profile
    applied: list[str] = field(default_factory=list)
    already_applied: list[str] = field(default_factory=list)
    definitions_applied: list[str] = field(default_factory=list)  # repeatables (re-)applied by this run
    definitions_unchanged: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # client: what was done to the portal's table
    notices: list[str] = field(default_factory=list)  # the mapping's check (client), the profile's choice (admin)


def applied_profile(conn: psycopg.Connection, role: Role) -> Profile | None:
    """The profile the database was set up with, if any migration recorded one."""
    if not _has_bookkeeping(conn):
        return None
    row = conn.execute(
        "SELECT profile FROM fleet_meta.migrations WHERE role = %s AND profile IS NOT NULL LIMIT 1",
        (role,),
    ).fetchone()
    return row[0] if row else None


@dataclass(frozen=True)
class TimescaleOffer:
    """What the server offers of TimescaleDB."""

    available: bool  # in pg_available_extensions
    loaded: bool  # created in this database, or preloaded
    # timescaledb.license: 'timescale' (every feature) or 'apache' (Apache 2 only: no
    # continuous aggregates, no columnstore). None where the server's configuration
    # does not set it and the extension is not created in this database yet: the
    # packages' default then, 'timescale'.
    license: str | None

    @property
    def apache_only(self) -> bool:
        return self.license == "apache"

    @property
    def timescale_profile(self) -> bool:
        """Everything the timescale profile uses is there."""
        return self.loaded and not self.apache_only


def timescaledb_offer(conn: psycopg.Connection) -> TimescaleOffer:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'),"
        " EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'),"
        " current_setting('shared_preload_libraries'),"
        " current_setting('timescaledb.license', true)"
    ).fetchone()
    assert row is not None
    available, installed, preload, license_ = row
    loaded = bool(installed) or (bool(available) and "timescaledb" in str(preload))
    return TimescaleOffer(bool(available), loaded, license_ or None)


def timescaledb_offered(conn: psycopg.Connection) -> bool:
    """The server can hold the timescale profile: TimescaleDB installed and loaded
    (it must be preloaded), under a license with continuous aggregates and columnstore."""
    return timescaledb_offer(conn).timescale_profile


_APACHE_ONLY = (
    "this server's TimescaleDB runs under the Apache 2 license (timescaledb.license = 'apache'),"
    " which has no continuous aggregates and no columnstore policies"
)


def decide_profile(
    role: Role, requested: ProfileChoice, already: Profile | None, offer: TimescaleOffer
) -> tuple[Profile, str | None]:
    """The profile for what the server offers, honouring what is already applied,
    and a notice when auto passed TimescaleDB over. ProfileError when it cannot be had."""
    if role == "client":
        return "postgres", None  # the portal database is the customer's own; no extensions asked
    if already == "timescale" and offer.apache_only:
        raise ProfileError(
            f"the {role} database was set up with the timescale profile, but {_APACHE_ONLY}; "
            "set timescaledb.license = 'timescale' in the server's configuration"
        )
    if requested == "auto":
        if already is not None:
            return already, None
        if offer.loaded and offer.apache_only:
            return "postgres", f"{_APACHE_ONLY}: the postgres profile is used"
        return ("timescale" if offer.timescale_profile else "postgres"), None
    if already is not None and already != requested:
        raise ProfileError(
            f"the {role} database was set up with the {already} profile; it cannot be switched to {requested} in place"
        )
    if requested == "timescale" and offer.apache_only:
        raise ProfileError(
            f"profile 'timescale' asked for, but {_APACHE_ONLY}; set timescaledb.license = 'timescale'"
            " in the server's configuration, or use --profile postgres"
        )
    if requested == "timescale" and not offer.loaded:
        raise ProfileError(
            "profile 'timescale' asked for, but this server does not offer TimescaleDB "
            "(not in pg_available_extensions, or not in shared_preload_libraries)"
        )
    return requested, None


def choose_profile(conn: psycopg.Connection, role: Role, requested: ProfileChoice) -> tuple[Profile, str | None]:
    """Pick the profile from what the server offers, honouring what is already applied:
    the profile, and why auto passed TimescaleDB over (if it did)."""
    if role == "client":
        return "postgres", None
    return decide_profile(role, requested, applied_profile(conn, role), timescaledb_offer(conn))


def apply_pending(
    conn: psycopg.Connection, role: Role, requested: ProfileChoice, root: Path | None, lock_timeout_ms: int = 0
) -> MigrationResult:
    """Everything pending for ``role``, in one transaction: all of it or nothing."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (LOCK_KEY,))
        # Migrations compute dates (the archive bound, the first weeks): in UTC,
        # whatever the database's or the role's default time zone.
        conn.execute("SET LOCAL TimeZone = 'UTC'")
        if lock_timeout_ms:  # the portal's tables: never queue the meters' inserts for long
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{lock_timeout_ms}ms")))
        conn.execute(_BOOKKEEPING)
        profile, notice = choose_profile(conn, role, requested)
        result = MigrationResult(role=role, profile=profile, notices=[notice] if notice else [])
        _apply_versions(conn, result, root)
        result.definitions_applied, result.definitions_unchanged = apply_repeatables(conn, role, profile, root)
    return result


def _apply_versions(conn: psycopg.Connection, result: MigrationResult, root: Path | None) -> None:
    role = result.role
    recorded: dict[str, str] = dict(
        conn.execute("SELECT version, checksum FROM fleet_meta.migrations WHERE role = %s", (role,)).fetchall()
    )
    for mig in discover(role, result.profile, root):
        if mig.version in recorded:
            if recorded[mig.version] != mig.checksum:
                raise MigrationChecksumMismatch(
                    f"{role} migration {mig.path.name} was changed after it was applied "
                    "(checksum differs); add a new migration instead of editing an applied one"
                )
            result.already_applied.append(mig.path.name)
            continue
        mig.run(conn, "migration")
        conn.execute(
            "INSERT INTO fleet_meta.migrations (role, version, name, profile, checksum) VALUES (%s, %s, %s, %s, %s)",
            (role, mig.version, mig.name, mig.profile, mig.checksum),
        )
        result.applied.append(mig.path.name)


def schema_status(
    conn: psycopg.Connection, role: Role, requested: ProfileChoice = "auto", root: Path | None = None
) -> SchemaStatus:
    """The versioned migrations and repeatable definitions of ``role`` against the
    database: applied, pending, edited after they were applied; read only."""
    profile, notice = choose_profile(conn, role, requested)
    status = SchemaStatus(role, profile, notices=[notice] if notice else [])
    recorded: dict[str, str] = {}
    if _has_bookkeeping(conn):
        recorded = dict(
            conn.execute("SELECT version, checksum FROM fleet_meta.migrations WHERE role = %s", (role,)).fetchall()
        )
    for mig in discover(role, status.profile, root):
        if mig.version not in recorded:
            status.pending.append(mig.path.name)
        elif recorded[mig.version] != mig.checksum:
            status.edited.append(mig.path.name)
        else:
            status.applied.append(mig.path.name)
    status.definitions_due, status.definitions_current = repeatables_due(conn, role, status.profile, root)
    return status


def _has_bookkeeping(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT to_regclass('fleet_meta.migrations') IS NOT NULL").fetchone()
    return bool(row and row[0])
