"""Several customers back-fill at once while one sends live rows, through the local
HTTP API (the template's IngestFunction in worker processes), with the server's
admission tight: the back-fills are shed (429) and go on, and the live customer's
rows keep arriving within two ticks."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
from fleet.push.service import PushService
from fleet.push.state import PushStateStore
from fleet.push.transport import IngestClient
from fleet_local.embedded import ensure_state_table
from fleet_local.runner import DEFAULT_TEMPLATE, LocalStack, serve_api
from fleet_local.template import Template
from harness import INGEST_PATH, new_token

BACKFILLERS = 3
BACKLOG = 100_000


def _client_db(pg_server: Any) -> str:
    return str(pg_server.url(pg_server.create_database(template=pg_server.template("client", "postgres"))))


def _service(client_url: str, table: str, endpoint: str, api_url: str, token: str, batch_size: int) -> PushService:
    return PushService(
        lambda: psycopg.connect(client_url, autocommit=True),
        PushStateStore.connect(table, endpoint),
        IngestClient(api_url + INGEST_PATH, token, 2.0, 20.0),
        batch_size=batch_size,
        time_budget_s=3.0,
    )


def _admin_count(admin: psycopg.Connection, customer: str) -> int:
    row = admin.execute("SELECT count(*) FROM fleet.power_measurements WHERE customer_id = %s", (customer,)).fetchone()
    return int(row[0]) if row else 0


def test_backfills_are_shed_and_live_rows_still_arrive_within_two_ticks(
    pg_server: Any, admin_db_postgres: str, dynamodb_endpoint: str
) -> None:
    names = [f"FILL{i}" for i in range(BACKFILLERS)]
    clients = [_client_db(pg_server) for _ in names]
    for url in clients:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO monitoring.power_measurements (time, device_id, power_w)"
                " SELECT '2025-01-01T00:00:00Z'::timestamptz + make_interval(secs => g * 15), 'm-' || g %% 20, g"
                " FROM generate_series(1, %s) g",
                (BACKLOG,),
            )
    live_url = _client_db(pg_server)
    tokens = [new_token(admin_db_postgres, n) for n in names]
    live_token = new_token(admin_db_postgres, "LIVE")
    for n in [*names, "LIVE"]:
        ensure_state_table(dynamodb_endpoint, f"state-{n}")
    # One batch per customer at once, two in all (and one more for a customer
    # sending live data): three back-fills want more than that.
    stack = LocalStack(
        Template(DEFAULT_TEMPLATE, {"Mode": "admin"}),
        {
            "Parameters": {"DATABASE_URL": admin_db_postgres},
            "IngestFunction": {
                "INGEST_MAX_IN_FLIGHT_PER_CUSTOMER": "1",
                "INGEST_MAX_IN_FLIGHT": "2",
                "INGEST_FRESH_AFTER_S": "1",  # the live customer ticks every 1.5 s here
            },
        },
        concurrency=5,
    )
    errors: list[BaseException] = []
    stop = threading.Event()

    def backfill(i: int, api_url: str) -> None:
        try:
            service = _service(clients[i], f"state-{names[i]}", dynamodb_endpoint, api_url, tokens[i], 500)
            while not stop.is_set():
                report = service.tick().resources["measurements"]
                if report.outcome == "idle":
                    return
                if report.outcome == "failed":
                    time.sleep(0.2)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    late: list[str] = []
    try:
        with serve_api(stack, port=0) as api, psycopg.connect(admin_db_postgres, autocommit=True) as admin:
            threads = [threading.Thread(target=backfill, args=(i, api.url)) for i in range(BACKFILLERS)]
            for t in threads:
                t.start()
            live = _service(live_url, "state-LIVE", dynamodb_endpoint, api.url, live_token, 2000)
            written: list[int] = []  # live rows on the Client before each tick
            with psycopg.connect(live_url, autocommit=True) as conn:
                for tick in range(8):
                    conn.execute(
                        "INSERT INTO monitoring.power_measurements (time, device_id, power_w)"
                        " SELECT now() - make_interval(secs => g), 'live', %s + g FROM generate_series(1, 30) g",
                        (tick * 100,),
                    )
                    written.append(30 * (tick + 1))
                    live.tick()
                    # Every row written before the previous tick is on the Admin now.
                    due = written[-2] if tick else 0
                    have = _admin_count(admin, "LIVE")
                    if have < due:
                        late.append(f"tick {tick}: {have} of {due} live rows")
                    time.sleep(1.5)
            still_filling = sum(_admin_count(admin, n) < BACKLOG for n in names)
            stop.set()
            for t in threads:
                t.join(120)
            shed = admin.execute(
                "SELECT customer_id, count(*) FROM fleet.ingest_events WHERE status = 429 GROUP BY 1"
            ).fetchall()
            filled = {n: _admin_count(admin, n) for n in names}
    finally:
        stop.set()
        stack.close()
    assert errors == []
    assert late == []
    assert still_filling >= 1  # the live rows went in while back-fills were running
    assert sum(count for customer, count in shed if customer != "LIVE") >= 1  # and they were shed
    assert all(count <= BACKLOG for count in filled.values())
