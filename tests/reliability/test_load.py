"""Load: 20 simulated customers push concurrently through the local HTTP API (the
template's IngestFunction in worker processes) for a bounded time, with back-dated
replays mixed in. Per customer, Admin rows equal Client rows. Reports throughput,
p50/p99 request latency and the peak number of database connections; with
``--minutes N`` it soaks and reports whether backlog, memory and connections stay flat."""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fleet.push.service import PushService
from fleet.push.state import PushStateStore
from fleet.push.transport import IngestClient
from fleet_local.embedded import ensure_state_table
from fleet_local.runner import DEFAULT_TEMPLATE, LocalStack, serve_api
from fleet_local.template import Template
from harness import INGEST_PATH, new_token

CUSTOMERS = 20
RESULTS = Path(__file__).parent / "results"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _backlog(clients: list[str], names: list[str], admin: psycopg.Connection) -> int:
    """Rows written on the Client side and not yet on the Admin side."""
    total = 0
    for url, name in zip(clients, names, strict=True):
        with psycopg.connect(url) as c:
            total += c.execute("SELECT count(*) FROM monitoring.power_measurements").fetchone()[0]  # type: ignore[index]
        total -= admin.execute(
            "SELECT count(*) FROM fleet.power_measurements WHERE customer_id = %s", (name,)
        ).fetchone()[0]  # type: ignore[index]
    return total


def test_twenty_customers_push_concurrently_and_every_row_arrives(
    pg_server: Any, admin_db_postgres: str, dynamodb_endpoint: str, request: pytest.FixtureRequest
) -> None:
    minutes = float(request.config.getoption("minutes"))
    duration = minutes * 60 if minutes else 12.0
    clients = [
        pg_server.url(pg_server.create_database(template=pg_server.template("client", "postgres")))
        for _ in range(CUSTOMERS)
    ]
    names = [f"LOAD{i:02d}" for i in range(CUSTOMERS)]
    tokens = [new_token(admin_db_postgres, name) for name in names]
    for name in names:
        ensure_state_table(dynamodb_endpoint, f"state-{name}")
    stack = LocalStack(
        Template(DEFAULT_TEMPLATE, {"Mode": "admin"}),
        {"Parameters": {"DATABASE_URL": admin_db_postgres}},
        concurrency=4,
    )
    stop = threading.Event()
    samples: list[dict[str, float]] = []
    errors: list[BaseException] = []
    pushed = [0] * CUSTOMERS

    def customer(i: int, api_url: str) -> None:
        rng = random.Random(i)
        service = PushService(
            lambda: psycopg.connect(clients[i], autocommit=True),
            PushStateStore.connect(f"state-{names[i]}", dynamodb_endpoint),
            IngestClient(api_url + INGEST_PATH, tokens[i], 2.0, 20.0),
            batch_size=500,
            max_batches=3,
        )
        serial = 0
        try:
            with psycopg.connect(clients[i], autocommit=True) as conn:
                while not stop.is_set():
                    live = rng.randint(20, 80)
                    conn.execute(
                        "INSERT INTO monitoring.power_measurements (time, device_id, power_w)"
                        " SELECT now() - make_interval(secs => g), 'live', %s + g FROM generate_series(1, %s) g",
                        (serial, live),
                    )
                    serial += live
                    if rng.random() < 0.15:  # a firmware replay, back-dated by up to a year
                        back = rng.randint(1, 365)
                        conn.execute(
                            "INSERT INTO monitoring.power_measurements (time, device_id, power_w)"
                            " SELECT now() - make_interval(days => %s) + make_interval(secs => g), 'replay-' || %s, g"
                            " FROM generate_series(1, 400) g",
                            (back, back),
                        )
                    report = service.tick()
                    pushed[i] += report.resources["measurements"].rows
                    time.sleep(rng.uniform(0.05, 0.3))
            # Drain what is left, past any backoff.
            service.clock = lambda: time.time() + 10**6  # type: ignore[method-assign]
            for _ in range(200):
                report = service.tick()
                pushed[i] += report.resources["measurements"].rows
                if report.resources["measurements"].outcome == "idle":
                    break
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    try:
        with serve_api(stack, port=0) as api:
            threads = [threading.Thread(target=customer, args=(i, api.url)) for i in range(CUSTOMERS)]
            started = time.monotonic()
            for t in threads:
                t.start()
            with psycopg.connect(admin_db_postgres, autocommit=True) as watcher:
                dbname = watcher.info.dbname
                while time.monotonic() - started < duration:
                    conns = watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,)
                    ).fetchone()[0]  # type: ignore[index]
                    workers = [w.proc.pid for p in stack._pools.values() for w in p._all if w.alive]
                    samples.append(
                        {
                            "t": time.monotonic() - started,
                            "connections": conns,
                            "worker_rss_mb": sum(_rss_kb(pid) for pid in workers) / 1024,
                            "backlog": _backlog(clients[:2], names[:2], watcher),
                        }
                    )
                    time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(300)
            elapsed = time.monotonic() - started
            latencies = sorted(s for _, status, s in api.latencies if status == 200)
            statuses = [status for _, status, _ in api.latencies]
    finally:
        stop.set()
        stack.close()
    assert errors == [], errors
    for i, name in enumerate(names):
        with psycopg.connect(clients[i]) as c, psycopg.connect(admin_db_postgres) as a:
            client_rows = set(c.execute("SELECT time, device_id, power_w FROM monitoring.power_measurements"))
            admin_rows = set(
                a.execute(
                    "SELECT time, device_id, power_w FROM fleet.power_measurements WHERE customer_id = %s", (name,)
                )
            )
        assert client_rows == admin_rows, f"{name}: {len(client_rows - admin_rows)} missing"
    total = sum(pushed)
    report = {
        "customers": CUSTOMERS,
        "seconds": round(elapsed, 1),
        "rows": total,
        "rows_per_s": round(total / elapsed),
        "requests": len(statuses),
        "non_200": len([s for s in statuses if s != 200]),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 1),
        "peak_db_connections": max(s["connections"] for s in samples),
        "worker_rss_mb_first_last": [round(samples[0]["worker_rss_mb"]), round(samples[-1]["worker_rss_mb"])],
        "connections_first_last": [samples[0]["connections"], samples[-1]["connections"]],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("soak.json" if minutes else "load.json")).write_text(
        json.dumps({"report": report, "samples": samples}, indent=1)
    )
    print("LOAD", json.dumps(report))
    assert total > 0
    assert report["peak_db_connections"] <= 4 + 2  # one per worker, plus the watcher
    if minutes:
        half = len(samples) // 2
        first, second = samples[:half], samples[half:]
        for key in ("connections", "worker_rss_mb"):
            assert max(s[key] for s in second) <= 1.5 * max(s[key] for s in first) + 1, key
