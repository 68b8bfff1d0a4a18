"""Schema migrations for both roles, and the choice of database profile.

Files live in ``sql/<role>/`` as ``NNN_name.sql`` (every profile) or
``NNN_name.<profile>.sql`` (one profile). Each version is applied once, inside one
transaction that holds an advisory lock, so two concurrent runs (two stack updates
at once) serialise: the second waits and then finds nothing left to do. An applied
file that has changed since is refused, never silently re-run.

The client role works on the customer's portal database, through the push's source
mapping (fleet.push.mapping), checked against the catalogue before anything runs.
It adds only the push's cursor column and its indexes (the cursor's order, and the
day's range reconciliation digests by) to the mapped measurements table,
without a write outage: the column nullable first, then its default (neither
rewrites the table), each ALTER waiting at most a moment for its lock and retried;
the indexes built with CREATE INDEX CONCURRENTLY outside any transaction, and an
index an interrupted build left invalid is dropped and built again. The project's
own portal tables (sql/client/) are created only with the default mapping.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from fleet.errors import MigrationChecksumMismatch, MigrationError, ProfileError

if TYPE_CHECKING:
    from fleet.push.catalogue import ResolvedTable
    from fleet.push.mapping import SourceMapping

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
    changes: list[str] = field(default_factory=list)  # client: what was done to the portal's table
    notices: list[str] = field(default_factory=list)  # client: what the mapping's check says


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
    mapping: SourceMapping | None = None,
) -> MigrationResult:
    """Apply what is pending for ``role`` in one transaction; idempotent. The client
    role works through ``mapping`` (None: the one the PUSH_SOURCE_MAPPING setting
    names, by default the project's own tables).

    ``conn`` must not be inside a transaction; it is left outside one.
    """
    if role not in ROLES:
        raise MigrationError(f"unknown role {role!r}")
    if role == "client":
        return migrate_client(conn, mapping, root)
    return _apply(conn, role, requested, root)


def _apply(
    conn: psycopg.Connection, role: Role, requested: ProfileChoice, root: Path | None, lock_timeout_ms: int = 0
) -> MigrationResult:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_LOCK_KEY,))
        # Migrations compute dates (the archive bound, the first weeks): in UTC,
        # whatever the database's or the role's default time zone.
        conn.execute("SET LOCAL TimeZone = 'UTC'")
        if lock_timeout_ms:  # the portal's tables: never queue the meters' inserts for long
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{lock_timeout_ms}ms")))
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


# -- the client role ----------------------------------------------------------------------

# An ALTER of the portal's table waits at most this long for its lock before it lets
# go and tries again: while it waits, every insert of the meters queues behind it.
ALTER_LOCK_TIMEOUT_MS = 200
ALTER_ATTEMPTS = 100  # with the pauses between them, about two minutes in all
_CLIENT_LOCK_WAIT_S = 300.0


def migrate_client(
    conn: psycopg.Connection, mapping: SourceMapping | None = None, root: Path | None = None
) -> MigrationResult:
    """The client role on the portal database: check the mapping against the catalogue
    (every problem named, nothing done if there is one), add the cursor column and build
    its indexes (outside any transaction), apply the project's own portal tables with the
    default mapping, and check again."""
    from fleet.push.catalogue import check
    from fleet.push.mapping import configured_mapping

    if mapping is None:
        mapping = configured_mapping()
    if conn.autocommit is False or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise MigrationError("the client migration needs an autocommit connection outside a transaction")
    with _session_lock(conn):
        first = check(conn, mapping, absent_ok=mapping.is_default, need_cursor=False)
        if mapping.is_default:  # the project's own tables: the migrations add received_at
            first.findings = [f for f in first.findings if (f.resource, f.field) != ("measurements", "received_at")]
        first.raise_for_errors()
        result = MigrationResult(role="client", profile="postgres")
        table = first.tables.get("measurements")
        if table is not None:
            result.changes += prepare_cursor(conn, table, mapping.is_default)
        if mapping.is_default:
            applied = _apply_retrying_locks(conn, root)
            result.applied, result.already_applied = applied.applied, applied.already_applied
        final = check(conn, mapping)
        table = final.tables.get("measurements")
        if table is not None and not final.errors:
            result.changes += prepare_cursor(conn, table, mapping.is_default)
        final.raise_for_errors()
        result.notices = [str(n) for n in final.notices]
    return result


@contextlib.contextmanager
def _session_lock(conn: psycopg.Connection) -> Iterator[None]:
    """The migrations' advisory lock for the whole client run, taken by polling: a
    session waiting in pg_advisory_lock would be a transaction CREATE INDEX
    CONCURRENTLY waits for, so two runs at once would deadlock."""
    deadline = time.monotonic() + _CLIENT_LOCK_WAIT_S
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (_LOCK_KEY,)).fetchone()
        if row and row[0]:
            break
        if time.monotonic() > deadline:
            raise MigrationError("another client migration has held the migrations lock for 5 minutes")
        time.sleep(0.2)
    try:
        yield
    finally:
        if not conn.closed and not conn.broken:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (_LOCK_KEY,))


def _apply_retrying_locks(conn: psycopg.Connection, root: Path | None) -> MigrationResult:
    for attempt in range(ALTER_ATTEMPTS):
        try:
            return _apply(conn, "client", "postgres", root, lock_timeout_ms=ALTER_LOCK_TIMEOUT_MS)
        except MigrationError as exc:
            if not isinstance(exc.__cause__, pgerrors.LockNotAvailable) or attempt + 1 == ALTER_ATTEMPTS:
                raise
            time.sleep(_pause(attempt))
    raise AssertionError("unreachable")


def _pause(attempt: int) -> float:
    return min(0.05 * 2**attempt, 2.0)


def _alter(conn: psycopg.Connection, statement: sql.Composed, what: str) -> None:
    """One short ALTER of the portal's table, never queueing the meters' inserts for
    longer than ALTER_LOCK_TIMEOUT_MS: a long transaction on the table makes it let go
    and try again."""
    for attempt in range(ALTER_ATTEMPTS):
        try:
            with conn.transaction():
                conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{ALTER_LOCK_TIMEOUT_MS}ms")))
                conn.execute(statement)
            return
        except pgerrors.LockNotAvailable:
            time.sleep(_pause(attempt))
        except psycopg.Error as exc:
            raise MigrationError(f"{what} failed: {exc}") from exc
    raise MigrationError(f"{what}: the table's lock could not be taken; a long transaction holds it")


def ensure_index(
    conn: psycopg.Connection, schema: str, table: sql.Composable, name: str, definition: sql.Composable
) -> str | None:
    """Build an index with CREATE INDEX CONCURRENTLY (writes go on meanwhile) unless a
    valid one of that name exists; one left invalid by an interrupted build is dropped
    (concurrently too) and built again. Returns what was done, or None."""
    index = sql.Identifier(schema, name)
    state = _index_valid(conn, schema, name)
    if state is True:
        return None
    done = "built"
    try:
        if state is False:
            conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(index))
            done = "rebuilt (an interrupted build had left it invalid)"
        conn.execute(sql.SQL("CREATE INDEX CONCURRENTLY {} ON {} {}").format(sql.Identifier(name), table, definition))
    except psycopg.Error as exc:
        raise MigrationError(f"building index {schema}.{name} failed (the next run builds it again): {exc}") from exc
    if _index_valid(conn, schema, name) is not True:
        raise MigrationError(f"index {schema}.{name} was built but is not valid")
    return f"index {schema}.{name} {done}"


def _index_valid(conn: psycopg.Connection, schema: str, name: str) -> bool | None:
    row = conn.execute(
        "SELECT i.indisvalid AND i.indisready FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (schema, name),
    ).fetchone()
    return None if row is None else bool(row[0])


def index_name(table: str, suffix: str) -> str:
    """``<table>_<suffix>`` within PostgreSQL's 63 bytes (a long name keeps a hash)."""
    name = f"{table}_{suffix}"
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.sha256(table.encode()).hexdigest()[:8]
    head = table.encode()[: 63 - len(suffix) - 10].decode(errors="ignore")
    return f"{head}_{digest}_{suffix}"


def prepare_cursor(conn: psycopg.Connection, table: ResolvedTable, default_tables: bool) -> list[str]:
    """The push's cursor on the mapped measurements table: ``push_xid xid8 DEFAULT
    pg_current_xact_id()`` (nullable first, then the default: no rewrite; rows from
    before keep NULL and are pushed first) and the indexes of the cursor's order and
    of reconciliation's days, on the very expressions the push reads by
    (fleet.push.queries.cursor_key)."""
    from fleet.push.queries import cursor_key

    changes: list[str] = []
    what = f"adding the cursor column to {table.plain}"
    if table.cursor is None:
        _alter(conn, sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS push_xid xid8").format(table.ident), what)
        changes.append(f"column push_xid added to {table.plain}")
    row = conn.execute(
        "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d"
        " JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum"
        " JOIN pg_class c ON c.oid = d.adrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND a.attname = 'push_xid'",
        (table.schema, table.name),
    ).fetchone()
    if row is None or row[0] != "pg_current_xact_id()":
        _alter(
            conn,
            sql.SQL("ALTER TABLE {} ALTER COLUMN push_xid SET DEFAULT pg_current_xact_id()").format(table.ident),
            what,
        )
        changes.append(f"default of push_xid set on {table.plain}")
    at, device = cursor_key(table, qualified=False)
    indexes: list[tuple[str, sql.Composable]] = [
        ("push_cursor_idx", sql.SQL("(push_xid, ({}), ({}))").format(at, device)),
        ("push_legacy_idx", sql.SQL("(({}), ({})) WHERE push_xid IS NULL").format(at, device)),
        # Reconciliation digests one UTC day at a time (every device of it, or a few):
        # a range of time, which the cursor's index (push_xid first) cannot serve; the
        # legacy index serves the rows from before the cursor column.
        ("push_day_idx", sql.SQL("(({}), ({})) WHERE push_xid IS NOT NULL").format(at, device)),
    ]
    if default_tables:
        # The project's own tables have it (sql/client/001), and its index: both done
        # here first (the column's default is stable: no rewrite), so that the
        # migration finds them in place on a table that holds rows.
        if table.column("received_at") is None:
            _alter(
                conn,
                sql.SQL(
                    "ALTER TABLE {} ADD COLUMN IF NOT EXISTS received_at timestamptz NOT NULL DEFAULT now()"
                ).format(table.ident),
                f"adding received_at to {table.plain}",
            )
            changes.append(f"column received_at added to {table.plain}")
        indexes.append(("received_at_idx", sql.SQL("(received_at)")))
    for suffix, definition in indexes:
        change = ensure_index(conn, table.schema, table.ident, index_name(table.name, suffix), definition)
        if change:
            changes.append(change)
    return changes
