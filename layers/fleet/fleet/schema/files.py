"""The ``sql/`` folder and what its files are, per role and profile: versioned
migrations (``<role>/NNN_name[.profile].sql``) and repeatable definitions
(``<role>/repeatable/NN_schema.object[.profile].sql``). How they are applied, and
the rules for changing them: fleet.schema.migrate."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import psycopg

from fleet.errors import MigrationError

Role = Literal["admin", "client"]
Profile = Literal["timescale", "postgres"]
ProfileChoice = Literal["auto", "timescale", "postgres"]
ROLES: tuple[Role, ...] = ("admin", "client")
PROFILES: tuple[Profile, ...] = ("timescale", "postgres")

_VERSIONED_RE = re.compile(r"^(?P<version>\d{3,})_(?P<name>[a-z0-9_]+)(?:\.(?P<profile>[a-z]+))?\.sql$")
_REPEATABLE_RE = re.compile(
    r"^(?P<order>\d{2,})_(?P<schema>[a-z_][a-z0-9_]*)\.(?P<name>[a-z_][a-z0-9_]*)(?:\.(?P<profile>[a-z]+))?\.sql$"
)
REPEATABLE_FOLDER = "repeatable"


def sql_dir() -> Path:
    """The ``sql/`` folder: next to the package when bundled, else the repo's."""
    override = os.environ.get("FLEET_SQL_DIR")
    if override:
        return Path(override)
    bundled = Path(__file__).parent.parent / "sql"  # fleet/sql
    if bundled.is_dir():
        return bundled
    return Path(__file__).resolve().parents[4] / "sql"  # layers/fleet/fleet/schema -> the repo


@dataclass(frozen=True)
class SqlFile:
    role: Role
    profile: Profile | None
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def run(self, conn: psycopg.Connection, kind: str) -> None:
        """Execute the file in the caller's transaction; a failure names the file."""
        try:
            conn.execute(self.sql.encode())
        except psycopg.Error as exc:
            raise MigrationError(f"{self.role} {kind} {self.path.name} failed: {exc}") from exc


@dataclass(frozen=True)
class Migration(SqlFile):
    """A versioned migration: applied once, never edited afterwards."""

    version: str
    name: str


@dataclass(frozen=True)
class Repeatable(SqlFile):
    """A repeatable definition: the one file of one function, aggregate or view,
    applied again whenever it changes (or its object is missing)."""

    order: int
    schema: str
    name: str

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


def _files(folder: Path, pattern: re.Pattern[str], what: str) -> Iterator[tuple[re.Match[str], Profile | None, Path]]:
    for path in sorted(folder.glob("*.sql")):
        match = pattern.match(path.name)
        if not match:
            raise MigrationError(f"{what} file name not understood: {path.name}")
        profile = match["profile"]
        if profile is not None and profile not in PROFILES:
            raise MigrationError(f"unknown profile in {path.name}")
        yield match, cast(Profile | None, profile), path


def discover(role: Role, profile: Profile, root: Path | None = None) -> list[Migration]:
    """The migrations of a role for a profile, in version order."""
    folder = (root or sql_dir()) / role
    if not folder.is_dir():
        raise MigrationError(f"no migrations folder {folder}")
    by_version: dict[str, list[Migration]] = {}
    for match, profile_of_file, path in _files(folder, _VERSIONED_RE, "migration"):
        mig = Migration(role, profile_of_file, path, match["version"], match["name"])
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


def discover_repeatables(role: Role, profile: Profile, root: Path | None = None) -> list[Repeatable]:
    """The repeatable definitions of a role for a profile, in their order (the
    number, then the object's name). An object has one generic file, or one file
    per profile that has it; a profile without a file simply has no such object."""
    folder = (root or sql_dir()) / role / REPEATABLE_FOLDER
    if not folder.is_dir():
        return []
    by_object: dict[str, list[Repeatable]] = {}
    for match, profile_of_file, path in _files(folder, _REPEATABLE_RE, "repeatable definition"):
        rep = Repeatable(role, profile_of_file, path, int(match["order"]), match["schema"], match["name"])
        by_object.setdefault(rep.qualified, []).append(rep)
    chosen: list[Repeatable] = []
    for qualified, candidates in by_object.items():
        names = ", ".join(c.path.name for c in candidates)
        if len({c.order for c in candidates}) > 1:
            raise MigrationError(f"{role} repeatable {qualified} has files of different orders: {names}")
        if len({c.profile for c in candidates}) != len(candidates):
            raise MigrationError(f"{role} repeatable {qualified} is defined twice: {names}")
        if any(c.profile is None for c in candidates) and len(candidates) > 1:
            raise MigrationError(f"{role} repeatable {qualified} mixes generic and profile files: {names}")
        chosen += [c for c in candidates if c.profile in (None, profile)]
    return sorted(chosen, key=lambda r: (r.order, r.qualified))
