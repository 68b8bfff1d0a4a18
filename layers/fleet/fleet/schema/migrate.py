"""Schema migrations for both roles: the one entry point, and the rules for changing
the schema.

Two kinds of files live in ``sql/<role>/`` (fleet.schema.files reads them):

- **Versioned migrations**, ``NNN_name.sql`` (every profile) or
  ``NNN_name.<profile>.sql`` (one profile): tables, indexes, data moves, and any
  object that holds data (the TimescaleDB continuous aggregate). Each version is
  applied once and recorded with its checksum in ``fleet_meta.migrations``; an
  applied file that has changed since is refused, never silently re-run. A change
  is a new file with the next free version.
- **Repeatable definitions**, ``repeatable/NN_<schema>.<object>[.<profile>].sql``:
  the one current definition of one function, aggregate or view (``CREATE OR
  REPLACE``), named after the object it defines. They are applied after every
  versioned migration, in the order of ``NN`` and then the object's name (an object
  comes after everything it is built on: 10 plain functions, 20 aggregates over
  them, 30 functions over tables, 50 views, 60 views over views), each when its
  checksum differs from the one recorded in ``fleet_meta.repeatables`` or when its
  object is missing; an unchanged one is not touched. A change to a function or
  view is an edit of its file, nothing else.

Everything pending runs in one transaction that holds an advisory lock, so two
concurrent runs (two stack updates at once) serialise: the second waits and then
finds nothing left to do. A failing file, versioned or repeatable, rolls the whole
run back with a MigrationError that names the file.

Rules for changing a repeatable:

- A function's body, language or settings: edit the file. Its arguments or its
  return type: the file first drops the old signature
  (``DROP FUNCTION IF EXISTS fleet.f(old argument types);``), or CREATE OR REPLACE
  would add an overload beside it (or refuse the new return type).
- A view may gain columns at the end (CREATE OR REPLACE VIEW allows that and no
  more). To rename, retype, reorder or remove columns, the view's file first drops,
  by name, the project's views built on it and then the view itself
  (``DROP VIEW IF EXISTS fleet.v;``): the dependent views come later in the order
  and their objects are then missing, so they are created again in the same
  transaction. No CASCADE: a view someone built on ours outside the project makes
  the run fail loudly instead of vanishing.
- A function the continuous aggregate uses (fleet.power_scaled, fleet.register_rise
  and the functions they call): its materialised buckets keep the old results until
  refreshed, so such a change comes with a versioned migration that queues the
  history for a refresh (fleet.hourly_refresh_queue).
- A versioned migration runs before the repeatables, so it can use only what
  earlier versioned migrations (or the repeatables of an earlier run) made; a new
  object it needs is created by the migration itself.
- Removing an object: a versioned migration drops it, and its file goes (its record
  in fleet_meta.repeatables is removed with it).

The client role works on the customer's portal database (fleet.schema.portal).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from fleet.errors import MigrationError
from fleet.schema.files import ROLES, ProfileChoice, Role
from fleet.schema.portal import migrate_client
from fleet.schema.runner import MigrationResult, apply_pending

if TYPE_CHECKING:
    from fleet.push.mapping import SourceMapping


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
    return apply_pending(conn, role, requested, root)
