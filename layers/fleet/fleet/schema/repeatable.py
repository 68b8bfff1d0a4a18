"""Repeatable definitions: each function, aggregate and view the project may change
later has one file (``sql/<role>/repeatable/``), applied after the versioned
migrations, in the same transaction, whenever the file's checksum differs from the
one recorded in ``fleet_meta.repeatables`` or its object is missing (the rules:
fleet.schema.migrate)."""

from __future__ import annotations

from pathlib import Path

import psycopg

from fleet.schema.files import Profile, Repeatable, Role, discover_repeatables

_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS fleet_meta.repeatables (
    role       text NOT NULL,
    name       text NOT NULL,
    file       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (role, name)
)
"""

_EXISTS = (
    "SELECT to_regclass(%(qualified)s) IS NOT NULL OR EXISTS ("
    " SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
    " WHERE n.nspname = %(schema)s AND p.proname = %(name)s)"
)


def apply_repeatables(
    conn: psycopg.Connection, role: Role, profile: Profile, root: Path | None = None
) -> tuple[list[str], list[str]]:
    """Apply the repeatables that changed or whose object is missing, in order, inside
    the caller's transaction; returns the files applied and those left as they were.
    A file that fails raises MigrationError naming it (the caller's transaction then
    rolls back, with the versioned migrations of the same run)."""
    files = discover_repeatables(role, profile, root)
    if not files and not _recorded(conn, role):
        return [], []  # a role without definitions (the client's portal) gets no bookkeeping table
    conn.execute(_BOOKKEEPING)
    recorded = _recorded(conn, role)
    applied: list[str] = []
    unchanged: list[str] = []
    for rep in files:
        # Checked at its turn: a file before it in the order may have dropped it
        # (a view replaced with other columns takes its dependent views with it).
        if _current(conn, rep, recorded):
            unchanged.append(rep.path.name)
            continue
        rep.run(conn, "repeatable definition")
        conn.execute(
            "INSERT INTO fleet_meta.repeatables (role, name, file, checksum) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (role, name) DO UPDATE SET file = excluded.file, checksum = excluded.checksum,"
            " applied_at = now()",
            (role, rep.qualified, rep.path.name, rep.checksum),
        )
        applied.append(rep.path.name)
    # A file taken away: its record goes too, so that the object's file, added again
    # one day, is applied again.
    conn.execute(
        "DELETE FROM fleet_meta.repeatables WHERE role = %s AND name <> ALL(%s::text[])",
        (role, [rep.qualified for rep in files]),
    )
    return applied, unchanged


def _recorded(conn: psycopg.Connection, role: Role) -> dict[str, str]:
    """The checksum each object's file had when it was last applied (none before the
    first run that knew repeatable definitions)."""
    exists = conn.execute("SELECT to_regclass('fleet_meta.repeatables') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return {}
    return dict(conn.execute("SELECT name, checksum FROM fleet_meta.repeatables WHERE role = %s", (role,)).fetchall())


def _current(conn: psycopg.Connection, rep: Repeatable, recorded: dict[str, str]) -> bool:
    """Applied as the file now reads, and its object is there."""
    if recorded.get(rep.qualified) != rep.checksum:
        return False
    row = conn.execute(_EXISTS, {"qualified": rep.qualified, "schema": rep.schema, "name": rep.name}).fetchone()
    return bool(row and row[0])


def repeatables_due(
    conn: psycopg.Connection, role: Role, profile: Profile, root: Path | None = None
) -> tuple[list[str], list[str]]:
    """Without changing anything: the files the next run would apply (new, changed,
    or their object missing) and those it would leave as they are."""
    recorded = _recorded(conn, role)
    due: list[str] = []
    current: list[str] = []
    for rep in discover_repeatables(role, profile, root):
        (current if _current(conn, rep, recorded) else due).append(rep.path.name)
    return due, current
