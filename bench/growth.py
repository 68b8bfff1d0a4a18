"""Growth: the push cursor query's time and the ingest's time per batch with 1 M and
10 M rows already in the table (target: flat, within 1.5x), EXPLAIN plans saved.

Each size has databases of its own, filled before any clock starts, and the sizes
are measured alternately, repeat by repeat, so that whatever else the machine does
falls on both alike (measuring one size after the other let the second pay for the
first's fill being written out)."""

from __future__ import annotations

import os
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from fleet import customers, push_source
from fleet.push_source import Cursor

from bench.common import database, gzip_body, load_handler, measurement_rows, save, server, summary
from bench.ingest_throughput import _Ctx, _event

_CLIENT_FILL = (
    "INSERT INTO monitoring.power_measurements (time, device_id, power_w, energy_wh)"
    " SELECT '2025-01-01T00:00:00Z'::timestamptz + make_interval(secs => g * 3), 'meter-' || (g %% 500),"
    "        g %% 5000, g FROM generate_series(%s::bigint, %s::bigint) g"
)
# A year of history over 500 devices, spread over the weekly partitions.
_ADMIN_FILL = (
    "INSERT INTO fleet.power_measurements (time, customer_id, device_id, power_w, energy_wh)"
    " SELECT now() - interval '365 days' + make_interval(secs => g * 3), 'GROW', 'meter-' || (g %% 500),"
    "        g %% 5000, g FROM generate_series(%s::bigint, %s::bigint) g"
)


def _fill(conn: psycopg.Connection, insert: str, table: str, rows: int) -> None:
    """``rows`` rows by ``insert`` (its parameters: the first and last row number), a million at a time."""
    step = 1_000_000
    for start in range(0, rows, step):
        conn.execute(insert, (start, min(start + step, rows) - 1))
    conn.execute(f"VACUUM ANALYZE {table}")


@dataclass
class _Side:
    """One table size: its own Client and Admin databases and ingest handler."""

    size: int
    client: psycopg.Connection
    ingest: Any
    token: str
    cursor: Cursor
    cursor_ms: list[float] = field(default_factory=list)
    ingest_ms: list[float] = field(default_factory=list)


def _last_page_cursor(conn: psycopg.Connection) -> Cursor:
    # A cursor 5,000 rows from the end: the query the push runs every tick.
    row = conn.execute(
        "SELECT push_xid::text, time, device_id FROM monitoring.power_measurements"
        " ORDER BY push_xid DESC, time DESC, device_id DESC OFFSET 5000 LIMIT 1"
    ).fetchone()
    assert row is not None
    return Cursor("xid", int(row[0]), row[1].isoformat(), row[2])


def _cursor_query_ms(side: _Side) -> float:
    start = time.perf_counter()
    page = push_source.read_measurements(side.client, side.cursor, 5000)
    elapsed = (time.perf_counter() - start) * 1000
    assert page.count > 0
    return elapsed


def _plan(side: _Side) -> str:
    plan = side.client.execute(
        "EXPLAIN (ANALYZE, BUFFERS) " + push_source._QUERIES["xid"][0],
        {"xid": str(side.cursor.xid), "time": side.cursor.time, "device": side.cursor.device, "limit": 5000},
    ).fetchall()
    return "\n".join(r[0] for r in plan)


def _ingest_ms(side: _Side, i: int) -> float:
    start_at = datetime.now(UTC) - timedelta(days=10, hours=i)
    event = _event(gzip_body(measurement_rows(5000, devices=500, start=start_at, seed=i)), side.token)
    t = time.perf_counter()
    result = side.ingest.handler(event, _Ctx())
    elapsed = (time.perf_counter() - t) * 1000
    assert result["statusCode"] == 200
    return elapsed


def main(smoke: bool = False) -> dict[str, float]:
    sizes = (20_000, 200_000) if smoke else (1_000_000, 10_000_000)
    repeats = 3 if smoke else 9
    results: dict[str, float] = {}
    with server() as (url, _), ExitStack() as stack:
        sides = []
        for size in sizes:
            client_url = stack.enter_context(database(url, "client"))
            admin_url = stack.enter_context(database(url, "admin", "postgres"))
            with psycopg.connect(admin_url, autocommit=True) as conn:
                token = customers.create(conn, "GROW", "growth").token
                conn.execute("SELECT fleet.ensure_measurement_partitions(now() - interval '400 days', now())")
                _fill(conn, _ADMIN_FILL, "fleet.power_measurements", size)
            client = stack.enter_context(psycopg.connect(client_url, autocommit=True, prepare_threshold=None))
            _fill(client, _CLIENT_FILL, "monitoring.power_measurements", size)
            os.environ.update({"DATABASE_URL": admin_url, "MAX_ITEMS": "5000"})
            side = _Side(size, client, load_handler("functions/ingest/ingest.py"), token, _last_page_cursor(client))
            _ingest_ms(side, -1)  # warm: the handler connects and caches its service now
            sides.append(side)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")  # the fill's dirty pages written before any clock starts
        # Side by side, repeat by repeat: background load falls on both sizes alike.
        for i in range(repeats):
            for side in sides:
                side.cursor_ms.append(_cursor_query_ms(side))
                side.ingest_ms.append(_ingest_ms(side, i))
        for side in sides:
            save(f"growth_cursor_plan_{side.size}.txt", _plan(side))
            results[f"cursor_{side.size}"] = statistics.median(side.cursor_ms)
            results[f"ingest_{side.size}"] = statistics.median(side.ingest_ms)
    small, large = sizes
    summary(f"growth.cursor_query_{small}", results[f"cursor_{small}"], "ms", 1.0, "baseline")
    summary(
        f"growth.cursor_query_{large}",
        results[f"cursor_{large}"],
        "ms",
        results[f"cursor_{large}"] / results[f"cursor_{small}"],
        "target <= 1.5",
    )
    summary(f"growth.ingest_batch_{small}", results[f"ingest_{small}"], "ms", 1.0, "baseline")
    summary(
        f"growth.ingest_batch_{large}",
        results[f"ingest_{large}"],
        "ms",
        results[f"ingest_{large}"] / results[f"ingest_{small}"],
        "target <= 1.5",
    )
    return results
