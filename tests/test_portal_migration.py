"""The client migration on a portal table that holds rows and keeps receiving them:
no write outage, and an index an interrupted build left invalid is built again."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from fleet.push.catalogue import check
from fleet.push.mapping import DEFAULT_MAPPING, parse_mapping
from fleet.schema import portal
from fleet.schema.migrate import migrate
from fleet_local import cli
from test_portal_mapping import EF_CORE_MAPPING, EF_READINGS, _ef_core_portal

# A portal as it was before the project's migrations: the default names, no
# received_at, no push_xid, and many rows.
OLD_PORTAL = """
CREATE SCHEMA monitoring;
CREATE TABLE monitoring.power_measurements (
    time timestamptz NOT NULL, device_id text NOT NULL, power_w double precision, voltage_v double precision,
    current_a double precision, energy_wh double precision, power_factor double precision,
    frequency_hz double precision
)
"""
OLD_ROWS = (
    "INSERT INTO monitoring.power_measurements (time, device_id, power_w, energy_wh)"
    " SELECT '2024-01-01T00:00:00Z'::timestamptz + make_interval(secs => g * 60), 'meter-' || (g %% 500), g, g * 1.5"
    " FROM generate_series(1, %s) g"
)
ROWS = 1_500_000  # a blocking index build on it takes well over a second here


@dataclass
class Writer:
    """A meter writing one reading at a time, each in its own transaction."""

    url: str
    waits: list[tuple[float, float]] = field(default_factory=list)  # (started, seconds)
    failures: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                n = 0
                while not self._stop.is_set():
                    started = time.perf_counter()
                    conn.execute(
                        "INSERT INTO monitoring.power_measurements (time, device_id, power_w)"
                        " VALUES (now(), 'writer', %s)",
                        (n,),
                    )
                    self.waits.append((started, time.perf_counter() - started))
                    n += 1
                    time.sleep(0.005)
        except BaseException as exc:
            self.failures.append(exc)

    @contextmanager
    def running(self) -> Iterator[Writer]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(30)


def _indexes(conn: psycopg.Connection) -> dict[str, bool]:
    return {
        name: valid
        for name, valid in conn.execute(
            "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE i.indrelid = 'monitoring.power_measurements'::regclass"
        )
    }


# The project's own tables (sql/client/001): the cursor's index, the legacy index and
# received_at's; no day index (the contract: reconciliation reads by the portal's own).
CURSOR_INDEXES = {
    "power_measurements_push_cursor_idx",
    "power_measurements_push_legacy_idx",
    "power_measurements_received_at_idx",
}


def test_migrating_a_table_that_receives_inserts_makes_none_wait_a_second(empty_db: str) -> None:
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(OLD_PORTAL)
        conn.execute(OLD_ROWS, (ROWS,))
        conn.execute("VACUUM ANALYZE monitoring.power_measurements")
    writer = Writer(empty_db)
    with writer.running(), psycopg.connect(empty_db, autocommit=True) as conn:
        time.sleep(0.3)
        started = time.perf_counter()
        result = migrate(conn, "client", mapping=DEFAULT_MAPPING)
        ended = time.perf_counter()
        time.sleep(0.3)
    assert writer.failures == []
    during = [wait for at, wait in writer.waits if started <= at <= ended]
    assert ended - started > 1.0, "the migration was too quick to show anything"
    assert len(during) > (ended - started) * 20  # inserts went on the whole time
    assert max(during) < 1.0, f"an insert waited {max(during):.2f} s"
    assert result.applied == ["001_monitoring.sql"]
    assert {c.split()[1] for c in result.changes if c.startswith("index ")} == {
        f"monitoring.{name}" for name in CURSOR_INDEXES
    }
    with psycopg.connect(empty_db) as conn:
        assert _indexes(conn).items() >= {(name, True) for name in CURSOR_INDEXES}
        count = conn.execute(
            "SELECT count(*) FILTER (WHERE push_xid IS NULL), count(*) FILTER (WHERE device_id = 'writer'),"
            " count(*) FILTER (WHERE device_id = 'writer' AND push_xid IS NOT NULL AND received_at IS NOT NULL)"
            " FROM monitoring.power_measurements"
        ).fetchone()
        assert count is not None
        legacy, written, stamped = count
        assert legacy >= ROWS  # the old rows (and the writer's before the default) are pushed first
        assert written == len(writer.waits) and stamped > 0
        assert check(conn, DEFAULT_MAPPING).errors == []


def test_an_index_an_interrupted_build_left_invalid_is_built_again(empty_db: str) -> None:
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(OLD_PORTAL)
        conn.execute(OLD_ROWS, (1000,))
        conn.execute("ALTER TABLE monitoring.power_measurements ADD COLUMN push_xid xid8")
    # A build that waits for a writer's transaction, and is cancelled while it waits:
    # what a bootstrap stopped mid-way (a Lambda timeout) leaves behind.
    with psycopg.connect(empty_db) as holder, psycopg.connect(empty_db, autocommit=True) as builder:
        holder.execute("INSERT INTO monitoring.power_measurements (time, device_id) VALUES (now(), 'x')")
        pid = builder.info.backend_pid

        def cancel_soon() -> None:
            time.sleep(1.0)
            with psycopg.connect(empty_db, autocommit=True) as other:
                other.execute("SELECT pg_cancel_backend(%s)", (pid,))

        threading.Thread(target=cancel_soon, daemon=True).start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            builder.execute(
                "CREATE INDEX CONCURRENTLY power_measurements_push_cursor_idx"
                " ON monitoring.power_measurements (push_xid, time, device_id)"
            )
        holder.rollback()
    with psycopg.connect(empty_db, autocommit=True) as conn:
        assert _indexes(conn)["power_measurements_push_cursor_idx"] is False
        result = migrate(conn, "client", mapping=DEFAULT_MAPPING)
        assert "index monitoring.power_measurements_push_cursor_idx rebuilt" in " ".join(result.changes)
        assert _indexes(conn).items() >= {(name, True) for name in CURSOR_INDEXES}
        again = migrate(conn, "client", mapping=DEFAULT_MAPPING)
        assert again.changes == [] and again.applied == []


def test_the_cursor_column_waits_out_a_long_transaction_without_queueing_inserts(
    empty_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ALTER that cannot have its lock at once lets go within a moment and tries
    again, rather than holding every insert behind it until the long transaction ends."""
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(OLD_PORTAL)
        conn.execute(OLD_ROWS, (1000,))
    monkeypatch.setattr(portal, "ALTER_ATTEMPTS", 1000)
    writer = Writer(empty_db)
    with psycopg.connect(empty_db) as long_one, writer.running():
        long_one.execute("SELECT count(*) FROM monitoring.power_measurements")  # holds its lock till the end
        done = threading.Event()

        def run() -> None:
            with psycopg.connect(empty_db, autocommit=True) as conn:
                migrate(conn, "client", mapping=DEFAULT_MAPPING)
            done.set()

        thread = threading.Thread(target=run, daemon=True)
        started = time.perf_counter()
        thread.start()
        time.sleep(2.0)
        assert not done.is_set()  # still waiting for the long transaction...
        long_one.rollback()  # ...which ends
        thread.join(60)
        assert done.is_set()
    assert writer.failures == []
    during = [wait for at, wait in writer.waits if at >= started]
    assert len(during) > 100
    assert max(during) < 1.0, f"an insert waited {max(during):.2f} s"


# --- the indexes on a portal's own table: the cursor's, and no other -------------------


def _table_indexes(conn: psycopg.Connection, table: str) -> set[str]:
    return {
        r[0]
        for r in conn.execute("SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = %s::regclass", (table,))
    }


EF_TABLE = 'monitoring."PowerMeasurements"'


def _ef_portal_with_rows(url: str, *, drop_own_index: bool = False) -> None:
    _ef_core_portal(url, EF_READINGS)
    if drop_own_index:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute('DROP INDEX monitoring."IX_PowerMeasurements_DeviceId_Time"')


def test_a_portal_gets_the_cursor_column_and_one_index_and_nothing_else(empty_db: str) -> None:
    _ef_portal_with_rows(empty_db)
    mapping = parse_mapping(json.dumps(EF_CORE_MAPPING))
    with psycopg.connect(empty_db, autocommit=True) as conn:
        before = _table_indexes(conn, EF_TABLE)
        assert before == {'monitoring."PowerMeasurements_pkey"', 'monitoring."IX_PowerMeasurements_DeviceId_Time"'}
        result = migrate(conn, "client", mapping=mapping)
        assert _table_indexes(conn, EF_TABLE) - before == {'monitoring."PowerMeasurements_push_cursor_idx"'}
        assert _table_indexes(conn, EF_TABLE) >= before  # the portal's own are untouched
        assert [c for c in result.changes if c.startswith("index ")] == [
            "index monitoring.PowerMeasurements_push_cursor_idx built"
        ]
        # Reconciliation reads a day by the portal's own (DeviceId, Time): nothing to say.
        assert result.notices == []
        table = check(conn, mapping).tables["measurements"]
        assert table is not None and table.day_index is not None
        assert (table.day_index.name, table.day_index.by) == ("IX_PowerMeasurements_DeviceId_Time", "device")


def test_without_a_usable_index_the_check_says_reconciliation_is_off_and_what_to_create(
    empty_db: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _ef_portal_with_rows(empty_db, drop_own_index=True)
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(EF_CORE_MAPPING))
    with psycopg.connect(empty_db, autocommit=True) as conn:
        result = migrate(conn, "client", mapping=parse_mapping(path.read_text()))
        assert _table_indexes(conn, EF_TABLE) == {
            'monitoring."PowerMeasurements_pkey"',
            'monitoring."PowerMeasurements_push_cursor_idx"',
        }
    statement = 'CREATE INDEX CONCURRENTLY ON "monitoring"."PowerMeasurements" ("Time")'
    assert len(result.notices) == 1 and "reconciliation is off" in result.notices[0]
    assert statement in result.notices[0] and '"reconcile_day_index": true' in result.notices[0]
    assert cli.main(["db", "check", "--role", "client", "--mapping", str(path), "--database-url", empty_db]) == 0
    out = capsys.readouterr().out
    assert "notice: measurements: reconciliation is off" in out and statement in out
    # The operator runs the statement as written: the check finds it, the notice goes.
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(statement)
        table = check(conn, parse_mapping(path.read_text())).tables["measurements"]
        assert table is not None and table.day_index is not None and table.day_index.by == "time"
        assert check(conn, parse_mapping(path.read_text())).notices == []


def test_the_day_index_is_built_only_with_the_operators_consent(empty_db: str) -> None:
    _ef_portal_with_rows(empty_db, drop_own_index=True)
    doc = json.loads(json.dumps(EF_CORE_MAPPING))
    doc["measurements"]["reconcile_day_index"] = True
    mapping = parse_mapping(json.dumps(doc))
    with psycopg.connect(empty_db, autocommit=True) as conn:
        before = _table_indexes(conn, EF_TABLE)
        result = migrate(conn, "client", mapping=mapping)
        assert _table_indexes(conn, EF_TABLE) - before == {
            'monitoring."PowerMeasurements_push_cursor_idx"',
            'monitoring."PowerMeasurements_push_day_idx"',
        }
        assert result.notices == []
        table = check(conn, mapping).tables["measurements"]
        assert table is not None and table.day_index is not None
        assert (table.day_index.name, table.day_index.raw) == ("PowerMeasurements_push_day_idx", False)


def test_an_earlier_versions_indexes_are_kept_and_said_to_be_droppable(empty_db: str) -> None:
    # What the previous client bootstrap left on a portal: the legacy and day indexes.
    _ef_portal_with_rows(empty_db, drop_own_index=True)
    mapping = parse_mapping(json.dumps(EF_CORE_MAPPING))
    with psycopg.connect(empty_db, autocommit=True) as conn:
        migrate(conn, "client", mapping=mapping)
        at, device = "timezone('UTC', \"Time\")", '("DeviceId")::text'
        conn.execute(
            f'CREATE INDEX "PowerMeasurements_push_legacy_idx" ON {EF_TABLE} (({at}), ({device})) WHERE push_xid IS NULL'
        )
        conn.execute(
            f'CREATE INDEX "PowerMeasurements_push_day_idx" ON {EF_TABLE} (({at}), ({device})) WHERE push_xid IS NOT NULL'
        )
        before = _table_indexes(conn, EF_TABLE)
        result = migrate(conn, "client", mapping=mapping)
        assert result.changes == [] and _table_indexes(conn, EF_TABLE) == before  # nothing dropped
        legacy, day = result.notices
        assert "PowerMeasurements_push_legacy_idx was built by an earlier version" in legacy
        assert 'DROP INDEX CONCURRENTLY "monitoring"."PowerMeasurements_push_legacy_idx"' in legacy
        assert "the contract does not require it" in day and "reads days by it while it exists" in day
        assert 'DROP INDEX CONCURRENTLY "monitoring"."PowerMeasurements_push_day_idx"' in day
        table = check(conn, mapping).tables["measurements"]
        assert table is not None and table.day_index is not None
        assert table.day_index.name == "PowerMeasurements_push_day_idx"  # still used
