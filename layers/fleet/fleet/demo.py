"""``fleet demo``: the whole system on one host, checked end to end.

An Admin stack and a Client stack, each with its own database, both bootstrapped
through the BootstrapFunction with the Create event; customer DEV0001 registered
through the CustomerAdminFunction; the Admin API served to the IngestFunction; a
small fleet writing into the Client database (live readings, a firmware replay
back-dated to 2026-04-01, a replay older than 30 days, and a transaction that
stays open across a push); the PushFunction invoked on its schedule until the
backlog is empty; then a verification report. Exit status 1 when a check fails.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from fleet.local_runner import (
    DEFAULT_TEMPLATE,
    LocalStack,
    embedded_dynamodb,
    ensure_state_table,
    local_aws_env,
    run_schedules,
    serve_api,
)
from fleet.sam_template import Template

EVENTS = DEFAULT_TEMPLATE.parent / "events"
CUSTOMER = "DEV0001"
REPLAY_DAY = datetime(2026, 4, 1, tzinfo=UTC)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class DemoResult:
    profile: str = "?"
    checks: list[Check] = field(default_factory=list)
    ticks: int = 0
    batches: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, bool(ok), detail))


@dataclass
class Sizes:
    devices: int = 4
    live_hours: int = 3
    replay_minutes: int = 1440  # one day of buffered readings, one per minute
    old_replay_minutes: int = 360
    batch_size: int = 500


def _say(out: Callable[[str], None], text: str) -> None:
    out(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {text}")


@contextmanager
def _databases(server_url: str | None) -> Iterator[tuple[str, str]]:
    """Two databases, Admin and Client, on the given server or a throwaway cluster."""
    from fleet.localdb import LocalCluster

    with ExitStack() as stack:
        if server_url is None:
            cluster = LocalCluster(timescaledb_background_workers=4).start()
            stack.callback(cluster.stop)
            server_url = cluster.url()
        suffix = f"{os.getpid()}_{int(time.time())}"
        names = [f"fleet_demo_admin_{suffix}", f"fleet_demo_client_{suffix}"]
        with psycopg.connect(server_url, autocommit=True) as conn:
            for name in names:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

        def drop() -> None:
            with psycopg.connect(server_url, autocommit=True) as conn:
                for name in names:
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

        stack.callback(drop)
        info = psycopg.conninfo.conninfo_to_dict(server_url)
        urls = []
        for name in names:
            info["dbname"] = name
            urls.append(psycopg.conninfo.make_conninfo("", **info))
        yield urls[0], urls[1]


def _bootstrap(stack: LocalStack) -> dict[str, Any]:
    from fleet.local_api import Route, serving

    event = json.loads((EVENTS / "bootstrap" / "create.json").read_text())
    # The properties CloudFormation would send: the template's custom resource's.
    for res in stack.template.doc["Resources"].values():
        if res["Type"] == "Custom::FleetSchema":
            event["ResourceProperties"] = stack.template.resolve(res["Properties"])
    responses: list[dict[str, Any]] = []

    def cfn(event_: dict[str, Any], _ctx: Any) -> dict[str, Any]:
        responses.append(json.loads(event_["body"]))
        return {"statusCode": 200, "body": ""}

    with serving([Route("PUT", "/cfn-response", cfn)]) as api:
        event["ResponseURL"] = f"{api.url}/cfn-response"
        stack.invoke("BootstrapFunction", event)
    if len(responses) != 1 or responses[0]["Status"] != "SUCCESS":
        raise RuntimeError(f"bootstrap did not succeed: {responses}")
    return responses[0]


def _write_fleet(client_url: str, sizes: Sizes, now: datetime) -> None:
    with psycopg.connect(client_url) as conn:
        conn.execute(
            "INSERT INTO monitoring.sites (id, name, timezone, latitude, longitude) VALUES"
            " ('site-1', 'Main plant', 'Europe/Berlin', 52.52, 13.405),"
            " ('site-2', 'Warehouse', 'Europe/Berlin', 52.40, 13.05)"
        )
        for i in range(1, sizes.devices + 1):
            conn.execute(
                "INSERT INTO monitoring.devices (id, site_id, name, model, firmware_version)"
                " VALUES (%s, %s, %s, 'PM-3000', '4.2.1')",
                (f"meter-{i}", f"site-{1 + (i - 1) % 2}", f"Meter {i}"),
            )
    start = now.replace(second=0, microsecond=0) - timedelta(hours=sizes.live_hours)
    minutes = sizes.live_hours * 60
    # Live readings: one transaction per 10 minutes of readings, as meters report.
    with psycopg.connect(client_url, autocommit=True) as conn:
        for block in range(0, minutes, 10):
            with conn.transaction():
                conn.execute(
                    "INSERT INTO monitoring.power_measurements"
                    " (time, device_id, power_w, voltage_v, current_a, energy_wh, power_factor, frequency_hz)"
                    " SELECT %s + make_interval(mins => m), 'meter-' || d,"
                    "        1000 + 200 * sin(m / 30.0) + 50 * d, 230.0, 4.5, 100000 + m * 20.0 + d * 1e6,"
                    "        0.97, 50.0"
                    " FROM generate_series(%s::int, %s::int) m, generate_series(1, %s::int) d",
                    (start, block, min(block + 9, minutes - 1), sizes.devices),
                )
        # A firmware replay: a day buffered in meter 3, back-dated to 2026-04-01, all
        # in one transaction (one received_at for every row).
        conn.execute(
            "INSERT INTO monitoring.power_measurements (time, device_id, power_w, energy_wh)"
            " SELECT %s + make_interval(mins => m), 'meter-3', 800 + m %% 60, 50000 + m * 13.0"
            " FROM generate_series(0, %s::int - 1) m",
            (REPLAY_DAY, sizes.replay_minutes),
        )
        # A replay older than the hourly aggregate's 30-day refresh window.
        old = (now - timedelta(days=45)).replace(minute=0, second=0, microsecond=0)
        conn.execute(
            "INSERT INTO monitoring.power_measurements (time, device_id, power_w, energy_wh)"
            " SELECT %s + make_interval(mins => m), 'meter-4', 600 + m %% 7, 70000 + m * 10.0"
            " FROM generate_series(0, %s::int - 1) m",
            (old, sizes.old_replay_minutes),
        )


def run_demo(
    server_url: str | None = None,
    sizes: Sizes | None = None,
    out: Callable[[str], None] = print,
    template_path: Path = DEFAULT_TEMPLATE,
    time_budget_s: float = 50.0,
    profile: str = "auto",
) -> DemoResult:
    sizes = sizes or Sizes()
    result = DemoResult()
    started = time.monotonic()
    local_aws_env()
    with ExitStack() as stack:
        # The functions' own logs (JSON, as CloudWatch would get them) go to a file.
        log_path = Path(tempfile.gettempdir()) / f"fleet-demo-{os.getpid()}.log"
        log = stack.enter_context(log_path.open("w"))
        _say(out, f"function logs: {log_path}")
        _say(out, "starting PostgreSQL (Admin and Client databases)" if server_url is None else "creating databases")
        admin_url, client_url = stack.enter_context(_databases(server_url))

        admin = LocalStack(
            Template(template_path, {"Mode": "admin", "DatabaseProfile": profile}),
            {"Parameters": {"DATABASE_URL": admin_url}},
            log=log,
        )
        stack.callback(admin.close)
        _say(out, "bootstrapping the Admin database through BootstrapFunction (Create event)")
        reply = _bootstrap(admin)
        result.profile = reply["Data"]["Profile"]
        _say(out, f"  Admin profile: {result.profile}; applied {reply['Data']['Applied']}")

        _say(out, f"registering customer {CUSTOMER} through CustomerAdminFunction")
        created = admin.invoke("CustomerAdminFunction", {"action": "create", "customer_id": CUSTOMER, "name": "Demo"})
        if not created.get("ok"):
            raise RuntimeError(f"customer not created: {created}")
        token = created["token"]
        _say(out, f"  token issued ({created['token_hint']}); only its SHA-256 is stored")

        api = stack.enter_context(serve_api(admin, port=0))
        ingest_url = f"{api.url}/api/fleet/ingest"
        _say(out, f"Admin API serving IngestFunction at {ingest_url}")

        dynamodb = stack.enter_context(embedded_dynamodb())
        ensure_state_table(dynamodb, "PushStateTable")
        client = LocalStack(
            Template(template_path, {"Mode": "client", "IngestEnabled": "true"}),
            {
                "Parameters": {"DATABASE_URL": client_url},
                "PushFunction": {
                    "INGEST_URL": ingest_url,
                    "INGEST_TOKEN": token,
                    "DYNAMODB_ENDPOINT_URL": dynamodb,
                    "PUSH_BATCH_SIZE": str(sizes.batch_size),
                },
            },
            log=log,
        )
        stack.callback(client.close)
        _say(out, "bootstrapping the Client database through BootstrapFunction (Create event)")
        _bootstrap(client)

        now = datetime.now(UTC)
        _say(out, "the fleet writes: live readings, a replay back-dated to 2026-04-01, one older than 30 days")
        _write_fleet(client_url, sizes, now)
        # A transaction that is open while the first push runs and commits after it:
        # its rows carry an old received_at, and must still arrive.
        open_tx = psycopg.connect(client_url)
        stack.callback(open_tx.close)
        open_tx.execute(
            "INSERT INTO monitoring.power_measurements (time, device_id, power_w, energy_wh)"
            " SELECT %s - make_interval(secs => s), 'meter-1', 42, 1 FROM generate_series(1, 50) s",
            (now - timedelta(hours=sizes.live_hours + 1),),
        )

        stop = threading.Event()
        batches = 0
        ticks = 0

        def on_push(logical_id: str, report: Any) -> None:
            nonlocal batches, ticks
            if logical_id != "PushFunction":
                return
            ticks += 1
            if not isinstance(report, dict) or "measurements" not in report:
                _say(out, f"  push tick {ticks}: error {report}")
                return
            batches += sum(int(r["batches"]) for r in report.values())
            line = ", ".join(f"{k} {v['outcome']} ({v['rows']} rows)" for k, v in report.items())
            _say(out, f"  push tick {ticks}: {line}")
            if ticks == 1 and not open_tx.closed:
                open_tx.commit()
                _say(out, "  (the long-open transaction commits now, after the first push)")
            idle = all(v["outcome"] in ("idle", "skipped") for v in report.values())
            if (idle and open_tx.info.transaction_status == psycopg.pq.TransactionStatus.IDLE) or (
                time.monotonic() - started > time_budget_s
            ):
                stop.set()

        _say(out, "running PushFunction on its schedule (rate(1 minute), time sped up 60x)")
        speed = 60.0
        t0 = datetime.now(UTC)
        run_schedules(
            client,
            stop,
            on_push,
            clock=lambda: t0 + (datetime.now(UTC) - t0) * speed,
            only={"PushFunction"},
        )
        result.ticks, result.batches = ticks, batches
        _say(out, "Admin maintenance: queued hourly-aggregate refreshes")
        maintenance = admin.invoke(
            "MaintenanceFunction", json.loads((EVENTS / "bootstrap" / "maintenance.json").read_text())
        )
        _say(out, f"  {maintenance}")
        _verify(result, admin_url, client_url, sizes, now)
    result.seconds = time.monotonic() - started
    _report(result, out)
    return result


def _verify(result: DemoResult, admin_url: str, client_url: str, sizes: Sizes, now: datetime) -> None:
    with psycopg.connect(client_url) as c:
        client_counts: dict[str, int] = dict(
            c.execute("SELECT device_id, count(*) FROM monitoring.power_measurements GROUP BY 1")
        )
    with psycopg.connect(admin_url) as a:
        admin_counts: dict[str, int] = dict(
            a.execute(
                "SELECT device_id, count(*) FROM fleet.power_measurements WHERE customer_id = %s GROUP BY 1",
                (CUSTOMER,),
            )
        )
        total = sum(client_counts.values())
        result.check(
            "rows equal per device",
            client_counts == admin_counts,
            f"client {total} rows, admin {sum(admin_counts.values())} rows, {len(client_counts)} devices",
        )
        replay = a.execute(
            "SELECT count(*), min(customer_id), max(customer_id) FROM fleet.power_measurements"
            " WHERE time >= %s AND time < %s + interval '1 day'",
            (REPLAY_DAY, REPLAY_DAY),
        ).fetchone()
        assert replay is not None
        result.check(
            "back-dated rows present with the right customer",
            replay[0] == sizes.replay_minutes and replay[1] == replay[2] == CUSTOMER,
            f"{replay[0]} rows on 2026-04-01, customer {replay[1]}",
        )
        seen = a.execute(
            "SELECT first_seen_at, last_seen_at FROM fleet.customers WHERE id = %s", (CUSTOMER,)
        ).fetchone()
        result.check(
            "first_seen_at / last_seen_at set",
            bool(seen and seen[0] and seen[1] and seen[0] <= seen[1]),
            f"first {seen[0] if seen else None:%H:%M:%S}, last {seen[1] if seen else None:%H:%M:%S}"
            if seen and seen[0]
            else "not set",
        )
        events = a.execute(
            "SELECT count(*), count(*) FILTER (WHERE status = 200), sum(accepted), sum(duplicates), sum(rejected)"
            " FROM fleet.ingest_events WHERE customer_id = %s",
            (CUSTOMER,),
        ).fetchone()
        assert events is not None
        result.check(
            "one ingest event per batch",
            events[0] == result.batches and events[1] == events[0],
            f"{events[0]} events for {result.batches} batches; accepted {events[2]}, duplicates {events[3]},"
            f" rejected {events[4]}",
        )
        hourly: dict[str, int] = dict(
            a.execute(
                "SELECT device_id, sum(sample_count)::bigint FROM fleet.hourly_per_device"
                " WHERE customer_id = %s AND bucket < %s GROUP BY 1",
                (CUSTOMER, now - timedelta(days=30)),
            )
        )
        result.check(
            "hourly view covers the back-filled hours",
            hourly.get("meter-3") == sizes.replay_minutes and hourly.get("meter-4") == sizes.old_replay_minutes,
            f"samples older than 30 days per device: {hourly}",
        )
        late = a.execute(
            "SELECT count(*) FROM fleet.power_measurements WHERE customer_id = %s AND power_w = 42", (CUSTOMER,)
        ).fetchone()
        result.check(
            "rows of a transaction open across a push arrived",
            bool(late and late[0] == 50),
            f"{late[0] if late else 0} of 50",
        )
        if result.profile == "timescale":
            ht = a.execute(
                "SELECT count(*) FROM timescaledb_information.hypertables"
                " WHERE hypertable_schema = 'fleet' AND hypertable_name = 'power_measurements'"
            ).fetchone()
            ca = a.execute(
                "SELECT materialized_only FROM timescaledb_information.continuous_aggregates"
                " WHERE view_schema = 'fleet' AND view_name = 'hourly_state'"
            ).fetchone()
            result.check(
                "TimescaleDB hypertable and real-time continuous aggregate",
                bool(ht and ht[0] == 1 and ca and ca[0] is False),
                "fleet.power_measurements is a hypertable; hourly_state materialized_only = false",
            )
        else:
            parts = a.execute(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'fleet.power_measurements'::regclass"
            ).fetchone()
            result.check(
                "weekly partitions with archive and default",
                bool(parts and parts[0] >= 3),
                f"{parts[0] if parts else 0} partitions of fleet.power_measurements",
            )


def _report(result: DemoResult, out: Callable[[str], None]) -> None:
    out("")
    out(f"verification report (database profile: {result.profile})")
    for c in result.checks:
        out(f"  [{'PASS' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
    out(
        f"{'all checks passed' if result.ok else 'SOME CHECKS FAILED'} in {result.seconds:.1f} s"
        f" ({result.ticks} push ticks, {result.batches} batches)"
    )
