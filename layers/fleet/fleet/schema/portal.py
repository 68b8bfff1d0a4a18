"""The client role on the customer's portal database, through the push's source
mapping (fleet.push.mapping), checked against the catalogue before anything runs.

It adds only the push's cursor column and the cursor's index to the mapped
measurements table, as the contract says, without a write outage: the column
nullable first, then its default (neither rewrites the table), each ALTER waiting at
most a moment for its lock and retried; the index built with CREATE INDEX
CONCURRENTLY outside any transaction, and an index an interrupted build left invalid
is dropped and built again. The one index serves both phases of the cursor (rows
from before the column have push_xid NULL, and are read by it in (time, device id)
order). Reconciliation reads a UTC day by an index the portal already has (one that
leads with the time column, or with the device id and the time;
fleet.push.catalogue finds it); a day index is built only with the operator's
consent in the mapping (``"reconcile_day_index": true``). An index an earlier
version built is never dropped: the check's notices say what it is for and how to
drop it. The project's own portal tables (sql/client/) are created only with the
default mapping, by the runner, with the indexes their migration names.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from fleet.errors import MigrationError
from fleet.schema.runner import LOCK_KEY, MigrationResult, apply_pending

if TYPE_CHECKING:
    from fleet.push.catalogue import ResolvedTable
    from fleet.push.mapping import SourceMapping

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
    day_index = mapping.measurements.reconcile_day_index
    if conn.autocommit is False or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise MigrationError("the client migration needs an autocommit connection outside a transaction")
    with _session_lock(conn):
        first = check(conn, mapping, absent_ok=mapping.is_default, need_cursor=False)
        if mapping.is_default:  # the project's own tables: the migrations add received_at
            first.findings = [f for f in first.findings if (f.resource, f.field) != ("measurements", "received_at")]
        first.raise_for_errors()
        table = first.tables.get("measurements")
        changes = prepare_cursor(conn, table, mapping.is_default, day_index) if table is not None else []
        if mapping.is_default:
            result = _apply_retrying_locks(conn, root)
        else:
            result = MigrationResult(role="client", profile="postgres")
        result.changes = changes
        final = check(conn, mapping)
        table = final.tables.get("measurements")
        if table is not None and not final.errors:
            result.changes += prepare_cursor(conn, table, mapping.is_default, day_index)
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
        row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (LOCK_KEY,)).fetchone()
        if row and row[0]:
            break
        if time.monotonic() > deadline:
            raise MigrationError("another client migration has held the migrations lock for 5 minutes")
        time.sleep(0.2)
    try:
        yield
    finally:
        if not conn.closed and not conn.broken:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (LOCK_KEY,))


def _apply_retrying_locks(conn: psycopg.Connection, root: Path | None) -> MigrationResult:
    for attempt in range(ALTER_ATTEMPTS):
        try:
            return apply_pending(conn, "client", "postgres", root, lock_timeout_ms=ALTER_LOCK_TIMEOUT_MS)
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


def prepare_cursor(
    conn: psycopg.Connection, table: ResolvedTable, default_tables: bool, day_index: bool = False
) -> list[str]:
    """The push's cursor on the mapped measurements table: ``push_xid xid8 DEFAULT
    pg_current_xact_id()`` (nullable first, then the default: no rewrite; rows from
    before keep NULL and are pushed first) and the index of the cursor's order, on the
    very expressions the push reads by (fleet.push.queries.cursor_key). ``day_index``:
    the operator consented to reconciliation's day index as well."""
    from fleet.push.catalogue import DAY_INDEX_SUFFIX, LEGACY_INDEX_SUFFIX, index_name
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
    ]
    if day_index:
        # Reconciliation digests one UTC day at a time: a range of time, which the
        # cursor's index serves only for the rows from before the cursor column
        # (push_xid NULL). Built only with the operator's consent (the mapping).
        indexes.append((DAY_INDEX_SUFFIX, sql.SQL("(({}), ({})) WHERE push_xid IS NOT NULL").format(at, device)))
    if default_tables:
        # The project's own tables have these (sql/client/001: the legacy index and
        # received_at with its index): done here first, concurrently (the column's
        # default is stable: no rewrite), so that the migration's plain CREATE INDEX
        # IF NOT EXISTS finds them in place on a table that holds rows.
        indexes.append((LEGACY_INDEX_SUFFIX, sql.SQL("(({}), ({})) WHERE push_xid IS NULL").format(at, device)))
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
