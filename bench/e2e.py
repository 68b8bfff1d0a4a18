"""End to end: rows in a Client database pushed with the template's default settings
by the PushFunction, through the local HTTP API to the IngestFunction (each in worker
processes of its own, as ``fleet local`` runs them), until the Admin database holds
every row; against a COPY pipe of the same rows between the same two databases
(``COPY (SELECT ...) TO STDOUT`` streamed into ``COPY ... FROM STDIN``), rounds
alternating, medians reported."""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from fleet import customers
from fleet_local.api import LocalHttpApi
from fleet_local.embedded import embedded_dynamodb, ensure_state_table, local_aws_env
from fleet_local.runner import DEFAULT_TEMPLATE, LocalStack, serve_api
from fleet_local.schedules import scheduled_event
from fleet_local.template import Template

from bench.common import database, server, summary
from bench.ingest_throughput import COLUMNS, _baseline_tables

SCHEDULE_S = 60.0  # the template's push schedule, rate(1 minute)
CUSTOMER = "E2E0001"
_PIPE_COLUMNS = ", ".join(("time", "customer_id", *COLUMNS[1:]))


def _fill(url: str, rows: int, devices: int = 50) -> None:
    """``rows`` readings, one a minute per meter, the newest 20 days ago: a backlog."""
    start = (datetime.now(UTC) - timedelta(days=20, minutes=rows // devices)).replace(second=0, microsecond=0)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO monitoring.power_measurements"
            " (time, device_id, power_w, voltage_v, current_a, energy_wh, power_factor, frequency_hz)"
            " SELECT %s + make_interval(mins => g / %s), 'meter-' || (g %% %s),"
            "        100 + (g %% 997) * 1.37, 230 + (g %% 7) * 0.1, 1.5 + (g %% 13) * 0.11, 1e6 + g * 1.5,"
            "        0.9 + (g %% 10) * 0.01, 50 + (g %% 5) * 0.01"
            " FROM generate_series(0, %s - 1) g",
            (start, devices, devices, rows),
        )
        conn.execute("VACUUM ANALYZE monitoring.power_measurements")


def _copy_pipe(client_url: str, admin_url: str, customer: str = CUSTOMER, truncate: bool = True) -> float:
    """Seconds to stream every row from the Client into an identical Admin table."""
    with psycopg.connect(admin_url, autocommit=True) as dst, psycopg.connect(client_url, autocommit=True) as src:
        if truncate:
            dst.execute("TRUNCATE bench_copy")
        start = time.perf_counter()
        with (
            src.cursor().copy(
                f"COPY (SELECT time, %s::text, {', '.join(COLUMNS[1:])} FROM monitoring.power_measurements) TO STDOUT",
                (customer,),
            ) as out,
            dst.transaction(),
            dst.cursor().copy(f"COPY bench_copy ({_PIPE_COLUMNS}) FROM STDIN") as into,
        ):
            for chunk in out:
                into.write(chunk)
        return time.perf_counter() - start


@dataclass
class Drain:
    seconds: float
    ticks: int
    last_tick_s: float
    batches: int
    ingest_busy_s: float  # the ingest route's time, summed over its requests

    def at_schedule(self) -> float:
        """The drain time with one tick a minute: the ticks before the last wait out
        their minute."""
        return (self.ticks - 1) * SCHEDULE_S + self.last_tick_s


def _admin_rows(admin_url: str, customer: str | None = None) -> int:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM fleet.power_measurements WHERE %s::text IS NULL OR customer_id = %s",
            (customer, customer),
        ).fetchone()
        return int(row[0]) if row else 0


def _reset_admin(admin_url: str) -> None:
    """What the previous round wrote goes; the customer and its token stay."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        tables = ["fleet.power_measurements", "fleet.ingest_events", "fleet.quarantine", "fleet.hourly_refresh_queue"]
        if conn.execute("SELECT to_regclass('fleet.hourly_rollup')").fetchone() != (None,):
            tables.append("fleet.hourly_rollup")
        conn.execute(f"TRUNCATE {', '.join(tables)}")


def _drain(
    client: LocalStack,
    api: LocalHttpApi,
    admin_url: str,
    rows: int,
    max_ticks: int,
    customer: str | None = None,
    clear: bool = True,
) -> Drain:
    """Ticks of the PushFunction, one after the other, until the Admin holds ``rows``
    (of ``customer``, or in all)."""
    if clear:
        with api._lock:  # the bench reads the local API's request log
            api.latencies.clear()
    start = time.perf_counter()
    ticks = batches = 0
    last = 0.0
    while ticks < max_ticks:
        tick_start = time.perf_counter()
        report: Any = client.invoke("PushFunction", scheduled_event("PushFunction", "Push", datetime.now(UTC)))
        last = time.perf_counter() - tick_start
        ticks += 1
        batches += int(report["measurements"]["batches"])
        if _admin_rows(admin_url, customer) >= rows:
            break
        if report["measurements"]["outcome"] not in ("pushed", "idle"):
            raise RuntimeError(f"push tick {ticks}: {report}")
    else:
        raise RuntimeError(f"{rows} rows not drained in {max_ticks} ticks")
    seconds = time.perf_counter() - start
    with api._lock:
        busy = sum(s for key, _status, s in api.latencies if key.startswith("POST"))
    return Drain(seconds, ticks, last, batches, busy)


@contextmanager
def _stacks(server_url: str, profile: str, log: Any) -> Iterator[tuple[str, LocalHttpApi, LocalStack, str]]:
    """(Admin URL, its API, the Admin stack, the ingest URL)."""
    with ExitStack() as stack:
        admin_url = stack.enter_context(database(server_url, "admin", profile))
        admin = LocalStack(
            Template(DEFAULT_TEMPLATE, {"Mode": "admin"}),
            {"Parameters": {"DATABASE_URL": admin_url}},
            concurrency=8,  # Lambda runs as many as there are requests; a few here
            log=log,
        )
        stack.callback(admin.close)
        api = stack.enter_context(serve_api(admin, port=0))
        yield admin_url, api, admin, f"{api.url}/api/fleet/ingest"


def _client_stack(client_url: str, ingest_url: str, token: str, dynamodb: str, table: str, log: Any) -> LocalStack:
    ensure_state_table(dynamodb, table)
    return LocalStack(
        Template(DEFAULT_TEMPLATE, {"Mode": "client", "IngestEnabled": "true"}),
        {
            "Parameters": {"DATABASE_URL": client_url},
            # The template's defaults otherwise (batch size, batches, time budget).
            "PushFunction": {
                "INGEST_URL": ingest_url,
                "INGEST_TOKEN": token,
                "DYNAMODB_ENDPOINT_URL": dynamodb,
                "PUSH_STATE_TABLE": table,
            },
        },
        log=log,
    )


def run(server_url: str, profile: str, rows: int, rounds: int) -> dict[str, float]:
    local_aws_env()
    log_path = Path(tempfile.gettempdir()) / f"fleet-bench-e2e-{os.getpid()}.log"
    pipe_s: list[float] = []
    drains: list[Drain] = []
    with ExitStack() as stack:
        log = stack.enter_context(log_path.open("w"))
        client_url = stack.enter_context(database(server_url, "client"))
        _fill(client_url, rows)
        admin_url, api, _admin, ingest_url = stack.enter_context(_stacks(server_url, profile, log))
        with psycopg.connect(admin_url, autocommit=True) as conn:
            token = customers.create(conn, CUSTOMER, "bench e2e").token
            _baseline_tables(conn, profile)
        dynamodb = stack.enter_context(embedded_dynamodb())
        for round_ in range(rounds):
            # Alternated, so that background load falls on both alike.
            pipe_s.append(_copy_pipe(client_url, admin_url))
            _reset_admin(admin_url)
            # A fresh Client stack each round: a new state table (the push starts from
            # nothing) and new workers (the invocation's start is part of the drain).
            client = _client_stack(client_url, ingest_url, token, dynamodb, f"e2e-state-{round_}", log)
            try:
                drains.append(_drain(client, api, admin_url, rows, max_ticks=max(3, rows // 1000)))
            finally:
                client.close()
    pipe_rate = rows / statistics.median(pipe_s)
    push_rate = rows / statistics.median(d.seconds for d in drains)
    ratios = sorted(p / d.seconds for p, d in zip(pipe_s, drains, strict=True))
    ticks = statistics.median(d.ticks for d in drains)
    at_schedule = statistics.median(d.at_schedule() for d in drains)
    busy = statistics.median(d.ingest_busy_s / d.seconds for d in drains)
    rounds_note = f"median of {rounds} alternated rounds ({ratios[0]:.3f}-{ratios[-1]:.3f})" if rounds > 1 else ""
    summary(
        "e2e.copy_pipe", pipe_rate, "rows/s", 1.0, f"baseline: COPY TO STDOUT piped into COPY FROM STDIN, {rows} rows"
    )
    summary(
        "e2e.push",
        push_rate,
        "rows/s",
        statistics.median(ratios),
        f"target >= 0.25 x the COPY pipe; default settings, PushFunction ticks back to back; {rounds_note}",
    )
    summary("e2e.ticks", ticks, "ticks", None, f"{statistics.median(d.batches for d in drains):.0f} batches")
    summary(
        "e2e.drain_at_schedule",
        at_schedule,
        "s",
        None,
        f"one tick a minute: the ticks before the last wait out their minute; ingest busy {busy:.0%} of the drain",
    )
    return {"copy_pipe": pipe_rate, "push": push_rate, "ratio": statistics.median(ratios), "ticks": ticks}


def run_several(server_url: str, profile: str, customers_: int, rows: int) -> dict[str, float]:
    """Several customers back-filling at once, against as many COPY pipes at once."""
    local_aws_env()
    names = [f"E2E{i:04d}" for i in range(1, customers_ + 1)]
    log_path = Path(tempfile.gettempdir()) / f"fleet-bench-e2e-several-{os.getpid()}.log"
    with ExitStack() as stack:
        log = stack.enter_context(log_path.open("w"))
        client_urls = [stack.enter_context(database(server_url, "client")) for _ in names]
        for url in client_urls:
            _fill(url, rows)
        admin_url, api, _admin, ingest_url = stack.enter_context(_stacks(server_url, profile, log))
        with psycopg.connect(admin_url, autocommit=True) as conn:
            tokens = [customers.create(conn, n, n).token for n in names]
            _baseline_tables(conn, profile)
        dynamodb = stack.enter_context(embedded_dynamodb())

        def together(work: Any) -> float:
            start = time.perf_counter()
            threads = [threading.Thread(target=work, args=(i,)) for i in range(customers_)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return time.perf_counter() - start

        pipe_s = together(lambda i: _copy_pipe(client_urls[i], admin_url, names[i], truncate=False))
        clients = [
            _client_stack(client_urls[i], ingest_url, tokens[i], dynamodb, f"e2e-several-{i}", log)
            for i in range(customers_)
        ]
        for client in clients:
            stack.callback(client.close)
        peak = [0]
        done = threading.Event()

        def watch() -> None:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                dbname = conn.info.dbname
                while not done.wait(0.2):
                    row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,)).fetchone()
                    peak[0] = max(peak[0], int(row[0]) if row else 0)

        watcher = threading.Thread(target=watch)
        watcher.start()
        with api._lock:
            api.latencies.clear()
        try:
            push_s = together(
                lambda i: _drain(clients[i], api, admin_url, rows, max(3, rows // 1000), names[i], clear=False)
            )
        finally:
            done.set()
            watcher.join()
        with api._lock:
            posts = sorted(s for key, _status, s in api.latencies if key.startswith("POST"))
            shed = sum(1 for key, status, _ in api.latencies if key.startswith("POST") and status == 429)
    total = rows * customers_
    p50, p99 = posts[len(posts) // 2], posts[min(len(posts) - 1, int(len(posts) * 0.99))]
    summary(
        "e2e.several.copy_pipes", total / pipe_s, "rows/s", 1.0, f"{customers_} COPY pipes at once, {rows} rows each"
    )
    summary(
        "e2e.several.push",
        total / push_s,
        "rows/s",
        pipe_s / push_s,
        f"{customers_} customers back-filling at once; requests p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms;"
        f" {shed} of {len(posts)} shed (429); peak Admin connections {peak[0]}",
    )
    return {"several_copy_pipes": total / pipe_s, "several_push": total / push_s, "several_p99_s": p99}


def run_freshness(server_url: str, profile: str, interval_s: float, duration_s: float) -> dict[str, float]:
    """A steady writer on the Client, the PushFunction on a schedule of ``interval_s``
    (the template's minute, sped up): from each row's commit to its visibility in
    ``fleet.hourly_per_device``."""
    local_aws_env()
    log_path = Path(tempfile.gettempdir()) / f"fleet-bench-e2e-fresh-{os.getpid()}.log"
    commits: list[tuple[float, int]] = []  # (commit time, rows written so far)
    seen: list[tuple[float, int]] = []  # (time, rows visible in the hourly view)
    with ExitStack() as stack:
        log = stack.enter_context(log_path.open("w"))
        client_url = stack.enter_context(database(server_url, "client"))
        admin_url, _api, _admin, ingest_url = stack.enter_context(_stacks(server_url, profile, log))
        with psycopg.connect(admin_url, autocommit=True) as conn:
            token = customers.create(conn, CUSTOMER, "bench e2e").token
        dynamodb = stack.enter_context(embedded_dynamodb())
        client = _client_stack(client_url, ingest_url, token, dynamodb, "e2e-fresh", log)
        stack.callback(client.close)
        client.invoke("PushFunction", scheduled_event("PushFunction", "Push", datetime.now(UTC)))  # warm, as deployed
        stop = threading.Event()

        def write() -> None:
            with psycopg.connect(client_url, autocommit=True) as conn:
                n = 0
                while not stop.wait(0.2):
                    conn.execute(
                        "INSERT INTO monitoring.power_measurements (time, device_id, power_w)"
                        " SELECT now() - make_interval(secs => 600) + make_interval(secs => %s + g), 'fresh', g"
                        " FROM generate_series(1, 10) g",
                        (n,),
                    )
                    n += 10
                    commits.append((time.monotonic(), n))

        def watch() -> None:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                while not stop.wait(0.1):
                    row = conn.execute(
                        "SELECT coalesce(sum(sample_count), 0) FROM fleet.hourly_per_device"
                        " WHERE customer_id = %s AND device_id = 'fresh'",
                        (CUSTOMER,),
                    ).fetchone()
                    seen.append((time.monotonic(), int(row[0]) if row else 0))

        def schedule() -> None:
            while not stop.is_set():
                started = time.monotonic()
                client.invoke("PushFunction", scheduled_event("PushFunction", "Push", datetime.now(UTC)))
                stop.wait(max(0.0, interval_s - (time.monotonic() - started)))

        threads = [threading.Thread(target=f) for f in (write, watch, schedule)]
        for t in threads:
            t.start()
        time.sleep(duration_s)
        stop.set()
        for t in threads:
            t.join()
    # Rows committed in the last interval may not be visible yet: leave them out.
    last_seen = seen[-1][1] if seen else 0
    latencies = []
    for committed, count in commits:
        if count > last_seen:
            break
        visible = next(t for t, c in seen if c >= count)
        latencies.append(max(0.0, visible - committed))
    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    summary(
        "e2e.freshness_p99",
        p99 / interval_s,
        "intervals",
        None,
        f"target <= 2; p50 {p50:.2f} s, p99 {p99:.2f} s with a tick every {interval_s:.0f} s;"
        f" {len(latencies)} writes of 10 rows, 5 a second, commit to fleet.hourly_per_device",
    )
    return {"freshness_p50_s": p50, "freshness_p99_s": p99}


def main(smoke: bool = False) -> dict[str, float]:
    env = os.environ.get
    rows, rounds = (3_000, 1) if smoke else (int(env("BENCH_E2E_ROWS", "1000000")), int(env("BENCH_E2E_ROUNDS", "3")))
    several = (2, 2_000) if smoke else (int(env("BENCH_E2E_CUSTOMERS", "4")), int(env("BENCH_E2E_ROWS_EACH", "250000")))
    with server() as (url, has_ts):
        profile = "timescale" if has_ts else "postgres"
        out = run(url, profile, rows, rounds) if rows else {}
        if several[0]:
            out |= run_several(url, profile, *several)
        interval, duration = (2.0, 5.0) if smoke else (float(env("BENCH_E2E_INTERVAL_S", "10")), 65.0)
        if interval:
            out |= run_freshness(url, profile, interval, duration)
        return out
