"""Schema migrations for both roles, and the choice of database profile.

Files live in ``sql/<role>/`` as ``NNN_name.sql`` (every profile) or
``NNN_name.<profile>.sql`` (one profile). Each version is applied once, inside one
transaction that holds an advisory lock, so two concurrent runs (two stack updates
at once) serialise: the second waits and then finds nothing left to do. An applied
file that has changed since is refused, never silently re-run.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psycopg

from fleet.errors import MigrationChecksumMismatch, MigrationError, ProfileError

Role = Literal["admin", "client"]
Profile = Literal["timescale", "postgres"]
ProfileChoice = Literal["auto", "timescale", "postgres"]
ROLES: tuple[Role, ...] = ("admin", "client")
PROFILES: tuple[Profile, ...] = ("timescale", "postgres")

_FILE_RE = re.compile(r"^(?P<version>\d{3,})_(?P<name>[a-z0-9_]+)(?:\.(?P<profile>[a-z]+))?\.sql$")
_LOCK_KEY = "fleet.migrations"

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


def sql_dir() -> Path:
    """The ``sql/`` folder: next to the package when bundled, else the repo's."""
    override = os.environ.get("FLEET_SQL_DIR")
    if override:
        return Path(override)
    bundled = Path(__file__).parent / "sql"
    if bundled.is_dir():
        return bundled
    return Path(__file__).resolve().parents[3] / "sql"


@dataclass(frozen=True)
class Migration:
    role: Role
    version: str
    name: str
    profile: Profile | None
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass
class MigrationResult:
    role: Role
    profile: Profile
    applied: list[str] = field(default_factory=list)
    already_applied: list[str] = field(default_factory=list)


def discover(role: Role, profile: Profile, root: Path | None = None) -> list[Migration]:
    """The migrations of a role for a profile, in version order."""
    folder = (root or sql_dir()) / role
    if not folder.is_dir():
        raise MigrationError(f"no migrations folder {folder}")
    by_version: dict[str, list[Migration]] = {}
    for path in sorted(folder.glob("*.sql")):
        match = _FILE_RE.match(path.name)
        if not match:
            raise MigrationError(f"migration file name not understood: {path.name}")
        file_profile = match["profile"]
        if file_profile is not None and file_profile not in PROFILES:
            raise MigrationError(f"unknown profile in {path.name}")
        mig = Migration(role, match["version"], match["name"], file_profile, path)
        by_version.setdefault(mig.version, []).append(mig)
    chosen: list[Migration] = []
    for version in sorted(by_version, key=int):
        candidates = by_version[version]
        generic = [m for m in candidates if m.profile is None]
        specific = [m for m in candidates if m.profile == profile]
        if len(generic) + len({m.profile for m in candidates if m.profile}) != len(candidates):
            raise MigrationError(f"version {version} of {role} is defined twice")
        if generic and len(candidates) > 1:
            raise MigrationError(f"version {version} of {role} mixes generic and profile files")
        if generic:
            chosen.append(generic[0])
        elif specific:
            chosen.append(specific[0])
        else:
            raise MigrationError(f"version {version} of {role} has no file for profile {profile}")
    return chosen


def applied_profile(conn: psycopg.Connection, role: Role) -> Profile | None:
    """The profile the database was set up with, if any migration recorded one."""
    exists = conn.execute("SELECT to_regclass('fleet_meta.migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
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


def migrate(
    conn: psycopg.Connection,
    role: Role,
    requested: ProfileChoice = "auto",
    root: Path | None = None,
) -> MigrationResult:
    """Apply what is pending for ``role`` in one transaction; idempotent.

    ``conn`` must not be inside a transaction; it is left outside one.
    """
    if role not in ROLES:
        raise MigrationError(f"unknown role {role!r}")
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_LOCK_KEY,))
        # Migrations compute dates (the archive bound, the first weeks): in UTC,
        # whatever the database's or the role's default time zone.
        conn.execute("SET LOCAL TimeZone = 'UTC'")
        conn.execute(_BOOKKEEPING)
        profile = choose_profile(conn, role, requested)
        result = MigrationResult(role=role, profile=profile)
        recorded = {
            row[0]: (row[1], row[2])
            for row in conn.execute(
                "SELECT version, checksum, name FROM fleet_meta.migrations WHERE role = %s",
                (role,),
            )
        }
        for mig in discover(role, profile, root):
            if mig.version in recorded:
                checksum, _name = recorded[mig.version]
                if checksum != mig.checksum:
                    raise MigrationChecksumMismatch(
                        f"{role} migration {mig.path.name} was changed after it was applied "
                        "(checksum differs); add a new migration instead of editing an applied one"
                    )
                result.already_applied.append(mig.path.name)
                continue
            try:
                conn.execute(mig.sql.encode())
            except psycopg.Error as exc:
                raise MigrationError(f"{role} migration {mig.path.name} failed: {exc}") from exc
            conn.execute(
                "INSERT INTO fleet_meta.migrations (role, version, name, profile, checksum)"
                " VALUES (%s, %s, %s, %s, %s)",
                (role, mig.version, mig.name, mig.profile, mig.checksum),
            )
            result.applied.append(mig.path.name)
    return result
