"""Growth: the push cursor query's time and the ingest's time per batch with 1 M and
10 M rows already in the table (target: flat, within 1.5x), EXPLAIN plans saved:
the cursor query's, and the ingest insert's as PostgreSQL ran it inside
fleet.insert_measurements (auto_explain, nested statements). Reconciliation's cost per
tick on the same tables: the portal's digest work of one tick (the changed-days scan
over the last 5,000 rows pushed, their device-days' digests and one day of the
rolling re-check, every device) and the Admin's comparison of one day's digests of
every device (rolled back), both flat against 1 M.

The ingest is measured in both Admin profiles where TimescaleDB is installed; in the
timescale profile the filled history is compressed as the columnstore policy would
have left it (chunks older than its default compress_after). Each size and profile
has databases of its own, filled before any clock starts, and all are measured
alternately, repeat by repeat, so that whatever else the machine does falls on each
alike (measuring one size after the other let the second pay for the first's fill
being written out)."""

from __future__ import annotations

import math
import os
import random
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from fleet import customers
from fleet.ingest.digests import compare_digests
from fleet.ingest.store import IngestStore
from fleet.push import source as push_source
from fleet.push.cursor import Cursor
from fleet.push.digest_state import DigestSettings, DigestState, Key
from fleet.push.digests import DigestPush
from fleet.schema.profiles import ProfileSettings

from bench.common import database, gzip_body, load_handler, measurement_rows, save, server, summary
from bench.ingest_throughput import _Ctx, _event

_CLIENT_FILL = (
    "INSERT INTO monitoring.power_measurements (time, device_id, power_w, energy_wh)"
    " SELECT '2025-01-01T00:00:00Z'::timestamptz + make_interval(secs => g * 3), 'meter-' || (g %% 500),"
    "        g %% 5000, g FROM generate_series(%s::bigint, %s::bigint) g"
)
# History up to now, one reading every 3 s round 500 devices (1 M rows: 35 days;
# 10 M: a year), so the partition or chunk the ingest writes into is as full at
# either size and only the history behind it grows.
_ADMIN_FILL = (
    "INSERT INTO fleet.power_measurements (time, customer_id, device_id, power_w, energy_wh)"
    " SELECT now() - make_interval(secs => g * 3), 'GROW', 'meter-' || (g %% 500),"
    "        g %% 5000, g FROM generate_series(%s::bigint, %s::bigint) g"
)


def _fill(conn: psycopg.Connection, insert: str, table: str, rows: int) -> None:
    """``rows`` rows by ``insert`` (its parameters: the first and last row number), a million at a time."""
    step = 1_000_000
    for start in range(0, rows, step):
        conn.execute(insert, (start, min(start + step, rows) - 1))
    conn.execute(f"VACUUM ANALYZE {table}")


def _compress_history(conn: psycopg.Connection) -> None:
    """What the columnstore policy would have done to the filled history."""
    conn.execute(
        "SELECT count(compress_chunk(c, if_not_compressed => true))"
        " FROM show_chunks('fleet.power_measurements', older_than => %s::interval) c",
        (ProfileSettings().compress_after,),
    )
    conn.execute("VACUUM ANALYZE fleet.power_measurements")


@dataclass
class _Side:
    """One table size in one profile: its own Admin database and ingest handler, and
    (postgres profile only: the Client side has no profiles) its own Client database."""

    profile: str
    size: int
    admin_url: str
    ingest: Any
    token: str
    client: psycopg.Connection | None
    cursor: Cursor | None
    cursor_ms: list[float] = field(default_factory=list)
    ingest_ms: list[float] = field(default_factory=list)
    end: Cursor | None = None  # the cursor after the last row (what the push has sent)
    digest_ms: list[float] = field(default_factory=list)
    compare_ms: list[float] = field(default_factory=list)
    backfill_ms: list[float] = field(default_factory=list)


def _last_page_cursor(conn: psycopg.Connection) -> Cursor:
    # A cursor 5,000 rows from the end: the query the push runs every tick.
    row = conn.execute(
        "SELECT push_xid::text, time, device_id FROM monitoring.power_measurements"
        " ORDER BY push_xid DESC, time DESC, device_id DESC OFFSET 5000 LIMIT 1"
    ).fetchone()
    assert row is not None
    return Cursor("xid", int(row[0]), row[1].isoformat(), row[2])


def _cursor_query_ms(side: _Side) -> float:
    assert side.client is not None and side.cursor is not None
    start = time.perf_counter()
    page = push_source.read_measurements(side.client, side.cursor, 5000)
    elapsed = (time.perf_counter() - start) * 1000
    assert page.count > 0
    return elapsed


def _cursor_plan(side: _Side) -> str:
    assert side.client is not None and side.cursor is not None
    query = push_source.PortalSource().measurements(side.client).select["xid"]
    plan = side.client.execute(
        b"EXPLAIN (ANALYZE, BUFFERS) " + query.as_bytes(side.client),
        {"xid": str(side.cursor.xid), "time": side.cursor.time, "device": side.cursor.device, "limit": 5000},
    ).fetchall()
    return "\n".join(r[0] for r in plan)


def _end_cursor(conn: psycopg.Connection) -> Cursor:
    row = conn.execute(
        "SELECT push_xid::text, time, device_id FROM monitoring.power_measurements"
        " ORDER BY push_xid DESC, time DESC, device_id DESC LIMIT 1"
    ).fetchone()
    assert row is not None
    return Cursor("xid", int(row[0]), row[1].isoformat(), row[2])


_RECHECK_DAY = datetime(2025, 1, 20, tzinfo=UTC).date()  # inside the history at either size


def _digest_tick_ms(side: _Side) -> float:
    """One tick's digest work on the portal, as fleet.push.digests does it, without the
    HTTP round trip: the days of the 5,000 rows pushed last, their device-days'
    digests, and one day of the rolling re-check for every device."""
    assert side.client is not None and side.cursor is not None and side.end is not None
    push = DigestPush(None, None, DigestSettings(), time.time, random.random, 0)  # type: ignore[arg-type]
    doc = DigestState(position=side.cursor.encode())
    start = time.perf_counter()
    with side.client.transaction():
        side.client.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        push._scan_changed(side.client, doc, side.end, math.inf)
        work: dict[Any, set[str] | None] = {}
        for text in doc.pending:
            day, _, device = text.partition("|")
            devices = work.setdefault(datetime.fromisoformat(day).date(), set())
            assert devices is not None
            devices.add(device)
        work[_RECHECK_DAY] = None
        digests: dict[Key, dict[str, Any]] = push._digests(side.client, side.end, work, math.inf)
    elapsed = (time.perf_counter() - start) * 1000
    assert len(digests) >= 500, len(digests)
    return elapsed


def _compare_ms(side: _Side) -> float:
    """The Admin's side of one digests batch: 500 device-days of one day (ten days
    old: compressed in the timescale profile) compared and recorded, rolled back."""
    day = (datetime.now(UTC) - timedelta(days=10)).date()
    items = [{"device_id": f"meter-{i}", "day": day, "count": 1, "hash": "v1:0:0"} for i in range(500)]
    with psycopg.connect(side.admin_url, autocommit=True) as conn:
        start = time.perf_counter()
        with conn.transaction(force_rollback=True):
            result = compare_digests(conn, "GROW", items)
        elapsed = (time.perf_counter() - start) * 1000
    assert result.compared == 500 and len(result.differ) == 500
    return elapsed


def _batch(i: int) -> list[dict[str, Any]]:
    """The i-th batch: 5,000 readings of 500 meters (other ids than the history's),
    two days old, as a push delivers them; each i an hour earlier."""
    return measurement_rows(5000, devices=500, start=datetime.now(UTC) - timedelta(days=2, hours=i), seed=i)


def _backfill_batch(i: int) -> list[dict[str, Any]]:
    """The i-th back-filled batch: 5,000 readings of the history's own meters, each a
    second after a stored one, two days old: every reading falls between two stored
    readings of its device-hour, so the postgres ingest recomputes those hours from
    their rows (the hourly state's slow path)."""
    start = datetime.now(UTC) - timedelta(days=2, hours=i)
    rows = []
    for k in range(5000):
        rows.append(
            {
                "time": (start - timedelta(seconds=3 * k - 1)).isoformat(),
                "device_id": f"meter-{k % 500}",
                "power_w": 1000.0,
                "energy_wh": 5e6 - k,
            }
        )
    return rows


def _ingest_ms(side: _Side, i: int, batch: list[dict[str, Any]] | None = None) -> float:
    event = _event(gzip_body(batch if batch is not None else _batch(i)), side.token)
    t = time.perf_counter()
    result = side.ingest.handler(event, _Ctx())
    elapsed = (time.perf_counter() - t) * 1000
    assert result["statusCode"] == 200
    return elapsed


def _ingest_plan(side: _Side) -> str:
    """The plan of the ingest's insert for one more batch, as it ran inside
    fleet.insert_measurements (rolled back: the table keeps its size)."""
    items = [{**row, "time": datetime.fromisoformat(row["time"])} for row in _batch(-2)]
    notes: list[str] = []
    with psycopg.connect(side.admin_url, autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: notes.append(diag.message_primary or ""))
        try:
            conn.execute("LOAD 'auto_explain'")
        except psycopg.Error as exc:  # e.g. a DATABASE_URL whose role may not load it
            return f"no plan: auto_explain could not be loaded ({exc.diag.message_primary})"
        for name, value in (
            ("log_min_duration", "0"),
            ("log_analyze", "on"),
            ("log_buffers", "on"),
            ("log_nested_statements", "on"),
            ("log_level", "notice"),
        ):
            conn.execute("SELECT set_config(%s, %s, false)", (f"auto_explain.{name}", value))
        with conn.transaction(force_rollback=True):
            IngestStore()._measurements(conn, "GROW", items)  # type: ignore[arg-type]
    plans = [note for note in notes if "INSERT INTO fleet.power_measurements" in note]
    assert plans, notes
    return "\n\n".join(plans)


def _side(stack: ExitStack, url: str, profile: str, size: int) -> _Side:
    admin_url = stack.enter_context(database(url, "admin", profile))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        token = customers.create(conn, "GROW", "growth").token
        if profile == "postgres":
            conn.execute("SELECT fleet.ensure_measurement_partitions(now() - interval '400 days', now())")
        _fill(conn, _ADMIN_FILL, "fleet.power_measurements", size)
        # The hourly state of the days the back-filled batches land in, as the ingest
        # (or the refresh policy) would have left it.
        if profile == "timescale":
            conn.execute(
                "CALL refresh_continuous_aggregate('fleet.hourly_state', now() - interval '4 days',"
                " time_bucket(INTERVAL '1 hour', now() - interval '1 hour'))"
            )
            _compress_history(conn)
        else:
            conn.execute("SELECT fleet.hourly_state_rebuild(now() - interval '4 days', now())")
    client, cursor = None, None
    if profile == "postgres":
        client_url = stack.enter_context(database(url, "client"))
        client = stack.enter_context(psycopg.connect(client_url, autocommit=True, prepare_threshold=None))
        _fill(client, _CLIENT_FILL, "monitoring.power_measurements", size)
        # The portal's own index on the time, which reconciliation reads a day by (the
        # client bootstrap adds none: the contract allows only the cursor's).
        client.execute("CREATE INDEX power_measurements_time_idx ON monitoring.power_measurements (time)")
        cursor = _last_page_cursor(client)
    os.environ.update({"DATABASE_URL": admin_url, "MAX_ITEMS": "5000"})
    side = _Side(profile, size, admin_url, load_handler("functions/ingest/ingest.py"), token, client, cursor)
    if client is not None:
        side.end = _end_cursor(client)
    _ingest_ms(side, -1)  # warm: the handler connects and caches its service now
    return side


def main(smoke: bool = False) -> dict[str, float]:
    sizes = (20_000, 200_000) if smoke else (1_000_000, 10_000_000)
    repeats = 3 if smoke else 9
    results: dict[str, float] = {}
    with server() as (url, has_timescale), ExitStack() as stack:
        profiles = ["postgres"]
        if has_timescale:
            profiles.append("timescale")
        else:
            print("growth.timescale skipped: TimescaleDB is not installed on this server", flush=True)
        sides = [_side(stack, url, profile, size) for profile in profiles for size in sizes]
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")  # the fill's dirty pages written before any clock starts
        # Side by side, repeat by repeat: background load falls on every side alike.
        for i in range(repeats):
            for side in sides:
                if side.client is not None:
                    side.cursor_ms.append(_cursor_query_ms(side))
                    side.digest_ms.append(_digest_tick_ms(side))
                side.ingest_ms.append(_ingest_ms(side, i))
                side.compare_ms.append(_compare_ms(side))
                side.backfill_ms.append(_ingest_ms(side, i, _backfill_batch(i)))
        for side in sides:
            if side.client is not None:
                save(f"growth_cursor_plan_{side.size}.txt", _cursor_plan(side))
                results[f"cursor_{side.size}"] = statistics.median(side.cursor_ms)
                results[f"digest_tick_{side.size}"] = statistics.median(side.digest_ms)
            results[f"{side.profile}.compare_{side.size}"] = statistics.median(side.compare_ms)
            save(f"growth_ingest_plan_{side.profile}_{side.size}.txt", _ingest_plan(side))
            results[f"{side.profile}.ingest_{side.size}"] = statistics.median(side.ingest_ms)
            results[f"{side.profile}.backfill_{side.size}"] = statistics.median(side.backfill_ms)
    small, large = sizes
    summary(f"growth.cursor_query_{small}", results[f"cursor_{small}"], "ms", 1.0, "baseline")
    summary(
        f"growth.cursor_query_{large}",
        results[f"cursor_{large}"],
        "ms",
        results[f"cursor_{large}"] / results[f"cursor_{small}"],
        "target <= 1.5",
    )
    base, grown = results[f"digest_tick_{small}"], results[f"digest_tick_{large}"]
    summary(f"growth.digest_tick_{small}", base, "ms", 1.0, "baseline")
    summary(f"growth.digest_tick_{large}", grown, "ms", grown / base, "target <= 1.5")
    for profile in profiles:
        base, grown = results[f"{profile}.ingest_{small}"], results[f"{profile}.ingest_{large}"]
        summary(f"growth.{profile}.ingest_batch_{small}", base, "ms", 1.0, "baseline")
        summary(f"growth.{profile}.ingest_batch_{large}", grown, "ms", grown / base, "target <= 1.5")
        base, grown = results[f"{profile}.compare_{small}"], results[f"{profile}.compare_{large}"]
        summary(f"growth.{profile}.digest_compare_{small}", base, "ms", 1.0, "baseline")
        summary(f"growth.{profile}.digest_compare_{large}", grown, "ms", grown / base, "target <= 1.5")
        base, grown = results[f"{profile}.backfill_{small}"], results[f"{profile}.backfill_{large}"]
        summary(f"growth.{profile}.backfill_batch_{small}", base, "ms", 1.0, "baseline: between stored readings")
        summary(f"growth.{profile}.backfill_batch_{large}", grown, "ms", grown / base, "target <= 1.5")
    return results
