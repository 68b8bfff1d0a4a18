"""Growth: the push cursor query's time and the ingest's time per batch with 1 M and
10 M rows already in the table (target: flat, within 1.5x), EXPLAIN plans saved."""

from __future__ import annotations

import os
import statistics
import time

import psycopg
from fleet import customers, push_source
from fleet.push_source import Cursor

from bench.common import database, gzip_body, load_handler, measurement_rows, save, server, summary
from bench.ingest_throughput import _Ctx, _event


def _grow_client(conn: psycopg.Connection, have: int, want: int) -> None:
    step = 1_000_000
    for start in range(have, want, step):
        end = min(start + step, want)
        conn.execute(
            "INSERT INTO monitoring.power_measurements (time, device_id, power_w, energy_wh)"
            " SELECT '2025-01-01T00:00:00Z'::timestamptz + make_interval(secs => g * 3), 'meter-' || (g %% 500),"
            "        g %% 5000, g FROM generate_series(%s::bigint, %s::bigint) g",
            (start, end - 1),
        )
    conn.execute("VACUUM ANALYZE monitoring.power_measurements")


def _grow_admin(conn: psycopg.Connection, have: int, want: int) -> None:
    step = 1_000_000
    for start in range(have, want, step):
        end = min(start + step, want)
        # A year of history over 500 devices, spread over the weekly partitions.
        conn.execute(
            "INSERT INTO fleet.power_measurements (time, customer_id, device_id, power_w, energy_wh)"
            " SELECT now() - interval '365 days' + make_interval(secs => g * 3), 'GROW', 'meter-' || (g %% 500),"
            "        g %% 5000, g FROM generate_series(%s::bigint, %s::bigint) g",
            (start, end - 1),
        )
    conn.execute("VACUUM ANALYZE fleet.power_measurements")


def _cursor_query_ms(conn: psycopg.Connection, repeats: int) -> tuple[float, str]:
    # A cursor 5,000 rows from the end: the query the push runs every tick.
    row = conn.execute(
        "SELECT push_xid::text, time, device_id FROM monitoring.power_measurements"
        " ORDER BY push_xid DESC, time DESC, device_id DESC OFFSET 5000 LIMIT 1"
    ).fetchone()
    assert row is not None
    cursor = Cursor("xid", int(row[0]), row[1].isoformat(), row[2])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        page = push_source.read_measurements(conn, cursor, 5000)
        times.append((time.perf_counter() - start) * 1000)
        assert page.count > 0
    plan = conn.execute(
        "EXPLAIN (ANALYZE, BUFFERS) " + push_source._QUERIES["xid"][0],
        {"xid": str(cursor.xid), "time": cursor.time, "device": cursor.device, "limit": 5000},
    ).fetchall()
    return statistics.median(times), "\n".join(r[0] for r in plan)


def _ingest_ms(ingest: object, token: str, offset_days: int, repeats: int) -> float:
    from datetime import UTC, datetime, timedelta

    times = []
    for i in range(repeats):
        start_at = datetime.now(UTC) - timedelta(days=offset_days, hours=i)
        event = _event(gzip_body(measurement_rows(5000, devices=500, start=start_at, seed=i)), token)
        t = time.perf_counter()
        result = ingest.handler(event, _Ctx())  # type: ignore[attr-defined]
        times.append((time.perf_counter() - t) * 1000)
        assert result["statusCode"] == 200
    return statistics.median(times)


def main(smoke: bool = False) -> dict[str, float]:
    sizes = (20_000, 200_000) if smoke else (1_000_000, 10_000_000)
    repeats = 3 if smoke else 7
    results: dict[str, float] = {}
    with server() as (url, _), database(url, "client") as client_url, database(url, "admin", "postgres") as admin_url:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            token = customers.create(conn, "GROW", "growth").token
            conn.execute("SELECT fleet.ensure_measurement_partitions(now() - interval '400 days', now())")
        os.environ.update({"DATABASE_URL": admin_url, "MAX_ITEMS": "5000"})
        ingest = load_handler("functions/ingest/ingest.py")
        client = psycopg.connect(client_url, autocommit=True, prepare_threshold=None)
        admin = psycopg.connect(admin_url, autocommit=True)
        have = 0
        for size in sizes:
            _grow_client(client, have, size)
            _grow_admin(admin, have, size)
            have = size
            cursor_ms, plan = _cursor_query_ms(client, repeats)
            save(f"growth_cursor_plan_{size}.txt", plan)
            ingest_ms = _ingest_ms(ingest, token, offset_days=10 + len(results), repeats=repeats)
            results[f"cursor_{size}"] = cursor_ms
            results[f"ingest_{size}"] = ingest_ms
        client.close()
        admin.close()
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
