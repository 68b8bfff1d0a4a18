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


@dataclass
class MigrationResult:
    role: Role
    profile: Profile
    applied: list[str] = field(default_factory=list)
    already_applied: list[str] = field(default_factory=list)
    definitions_applied: list[str] = field(default_factory=list)  # repeatables (re-)applied by this run
    definitions_unchanged: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # client: what was done to the portal's table
    notices: list[str] = field(default_factory=list)  # client: what the mapping's check says


def applied_profile(conn: psycopg.Connection, role: Role) -> Profile | None:
    """The profile the database was set up with, if any migration recorded one."""
    if not _has_bookkeeping(conn):
        return None
    row = conn.execute(
        "SELECT profile FROM fleet_meta.migrations WHERE role = %s AND profile IS NOT NULL LIMIT 1",
        (role,),
    ).fetchone()
    return row[0] if row else None


def timescaledb_offered(conn: psycopg.Connection) -> bool:
    """The server has TimescaleDB installed and loaded (it must be preloaded)."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'),"
        " EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'),"
        " current_setting('shared_preload_libraries')"
    ).fetchone()
    assert row is not None
    available, installed, preload = row
    return bool(installed) or (bool(available) and "timescaledb" in str(preload))


def choose_profile(conn: psycopg.Connection, role: Role, requested: ProfileChoice) -> Profile:
    """Pick the profile from what the server offers, honouring what is already applied."""
    if role == "client":
        return "postgres"  # the portal database is the customer's own; no extensions asked
    already = applied_profile(conn, role)
    offered = timescaledb_offered(conn)
    if requested == "auto":
        if already is not None:
            return already
        return "timescale" if offered else "postgres"
    if already is not None and already != requested:
        raise ProfileError(
            f"the {role} database was set up with the {already} profile; it cannot be switched to {requested} in place"
        )
    if requested == "timescale" and not offered:
        raise ProfileError(
            "profile 'timescale' asked for, but this server does not offer TimescaleDB "
            "(not in pg_available_extensions, or not in shared_preload_libraries)"
        )
    return requested


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
        profile = choose_profile(conn, role, requested)
        result = MigrationResult(role=role, profile=profile)
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
    status = SchemaStatus(role, choose_profile(conn, role, requested))
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
