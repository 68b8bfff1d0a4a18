"""Ingest throughput: measurement rows as gzip JSON bodies through the real ingest
handler (event in, response out, rows committed), against COPY of the same rows
into an identical empty table in the same database (the physical limit) and a
plain executemany INSERT ... ON CONFLICT DO NOTHING (the naive baseline)."""

from __future__ import annotations

import base64
import io
import os
import time
from typing import Any

import psycopg
from fleet import customers

from bench.common import database, gzip_body, load_handler, measurement_rows, server, summary

COLUMNS = ("time", "device_id", "power_w", "voltage_v", "current_a", "energy_wh", "power_factor", "frequency_hz")


def _event(body: bytes, token: str) -> dict[str, Any]:
    return {
        "version": "2.0",
        "routeKey": "POST /api/fleet/ingest",
        "rawPath": "/api/fleet/ingest",
        "rawQueryString": "",
        "headers": {
            "content-type": "application/json",
            "content-encoding": "gzip",
            "x-customer-token": token,
            "x-batch-type": "measurements",
            "x-push-cursor": "bench",
        },
        "requestContext": {
            "http": {"method": "POST", "path": "/api/fleet/ingest", "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1"},
            "requestId": "bench",
            "routeKey": "POST /api/fleet/ingest",
            "stage": "$default",
        },
        "body": base64.b64encode(body).decode(),
        "isBase64Encoded": True,
    }


class _Ctx:
    function_name = "bench"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:local:0:function:bench"
    aws_request_id = "bench"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def _baseline_tables(conn: psycopg.Connection, profile: str) -> None:
    """Tables identical to fleet.power_measurements: same columns, the same unique
    key, and the same layout (the same weekly partitions, or a 7-day hypertable)."""
    for name in ("bench_copy", "bench_naive"):
        layout = " PARTITION BY RANGE (time)" if profile == "postgres" else ""
        conn.execute(
            f"CREATE TABLE {name} (LIKE fleet.power_measurements INCLUDING DEFAULTS,"
            f" CONSTRAINT {name}_key UNIQUE (time, customer_id, device_id)){layout}"
        )
        if profile == "postgres":
            bounds = conn.execute(
                "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
                " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'fleet.power_measurements'::regclass"
            ).fetchall()
            for part, bound in bounds:
                conn.execute(f"CREATE TABLE {name}_{part} PARTITION OF {name} {bound}")
        else:
            conn.execute("SELECT create_hypertable(%s::regclass, by_range('time', INTERVAL '7 days'))", (name,))


def _copy_text(batch: list[dict[str, Any]], customer: str) -> bytes:
    out = io.StringIO()
    for r in batch:
        values = [r["time"], customer, r["device_id"], *(str(r[c]) for c in COLUMNS[2:])]
        out.write("\t".join(values) + "\n")
    return out.getvalue().encode()


def run_profile(server_url: str, profile: str, rows: int, batch: int) -> dict[str, float]:
    items = measurement_rows(rows)
    batches = [items[i : i + batch] for i in range(0, len(items), batch)]
    with database(server_url, "admin", profile) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            token = customers.create(conn, "BENCH", "bench").token
            _baseline_tables(conn, profile)
        # Client-side work (building bodies, COPY text) happens before any clock starts.
        events = [_event(gzip_body(b), token) for b in batches]
        copy_texts = [_copy_text(b, "BENCH") for b in batches]
        tuples = [[("BENCH", r["device_id"], r["time"], *(r[c] for c in COLUMNS[2:])) for r in b] for b in batches]

        os.environ.update({"DATABASE_URL": url, "MAX_ITEMS": str(batch), "POWERTOOLS_METRICS_NAMESPACE": "bench"})
        os.environ.pop("DB_SECRET_ARN", None)
        ingest = load_handler("functions/ingest/ingest.py")
        ctx = _Ctx()
        ingest.handler(_event(gzip_body(batches[0][:1]), token), ctx)  # warm: connect, imports
        cols = ", ".join(("customer_id", "device_id", "time", *COLUMNS[2:]))
        placeholders = ", ".join(["%s"] * (len(COLUMNS) + 1))
        copy_sql = f"COPY bench_copy ({', '.join(('time', 'customer_id', *COLUMNS[1:]))}) FROM STDIN"
        naive_sql = f"INSERT INTO bench_naive ({cols}) VALUES ({placeholders}) ON CONFLICT DO NOTHING"
        copy_s = handler_s = naive_s = 0.0
        # Side by side, batch by batch: whatever else the machine (or autovacuum) does
        # falls on all three alike.
        with psycopg.connect(url, autocommit=True) as conn:
            for text, event, rows_batch in zip(copy_texts, events, tuples, strict=True):
                start = time.perf_counter()
                with conn.transaction(), conn.cursor() as cur, cur.copy(copy_sql) as cp:
                    cp.write(text)
                copy_s += time.perf_counter() - start
                start = time.perf_counter()
                result = ingest.handler(event, ctx)
                handler_s += time.perf_counter() - start
                assert result["statusCode"] == 200, result
                start = time.perf_counter()
                with conn.transaction(), conn.cursor() as cur:
                    cur.executemany(naive_sql, rows_batch)
                naive_s += time.perf_counter() - start
            stored = conn.execute("SELECT count(*) FROM fleet.power_measurements").fetchone()[0]  # type: ignore[index]
            assert stored == rows, (stored, rows)
        start = time.perf_counter()
        for event in events:
            result = ingest.handler(event, ctx)
            assert result["statusCode"] == 200, result
        redelivery_s = time.perf_counter() - start

    copy_rate, handler_rate = rows / copy_s, rows / handler_s
    naive_rate, redelivery_rate = rows / naive_s, rows / redelivery_s
    summary(f"ingest.{profile}.copy", copy_rate, "rows/s", 1.0, "baseline: COPY into an identical empty table")
    summary(f"ingest.{profile}.handler", handler_rate, "rows/s", handler_rate / copy_rate, "target >= 0.33 x COPY")
    summary(f"ingest.{profile}.naive_executemany", naive_rate, "rows/s", naive_rate / copy_rate)
    summary(f"ingest.{profile}.handler_vs_naive", handler_rate / naive_rate, "x", None)
    summary(f"ingest.{profile}.redelivery", redelivery_rate, "rows/s", redelivery_rate / copy_rate, "all duplicates")
    return {"copy": copy_rate, "handler": handler_rate, "naive": naive_rate, "redelivery": redelivery_rate}


def main(smoke: bool = False) -> dict[str, dict[str, float]]:
    rows, batch = (2_000, 500) if smoke else (500_000, 5_000)
    out: dict[str, dict[str, float]] = {}
    with server() as (url, has_ts):
        for profile in ("postgres", "timescale"):
            if profile == "timescale" and not has_ts:
                print("ingest.timescale skipped: TimescaleDB is not installed on this server", flush=True)
                continue
            out[profile] = run_profile(url, profile, rows, batch)
    return out
