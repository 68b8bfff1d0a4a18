"""``fleet demo``: the whole system on one host, checked end to end.

An Admin stack and a Client stack, each with its own database, both bootstrapped
through the BootstrapFunction with the Create event; customer DEV0001 registered
through the CustomerAdminFunction; the Admin API served to the IngestFunction; a
small fleet writing into the Client database (live readings, a firmware replay
back-dated four months, a replay older than 30 days, and a transaction that
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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from fleet_local.demo_report import CUSTOMER, DemoResult, replay_day, report, verify
from fleet_local.embedded import embedded_dynamodb, ensure_state_table, local_aws_env
from fleet_local.runner import DEFAULT_TEMPLATE, LocalStack, serve_api
from fleet_local.schedules import run_schedules
from fleet_local.template import Template

EVENTS = DEFAULT_TEMPLATE.parent / "events"


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
    from fleet_local.cluster import LocalCluster

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
    from fleet_local.api import Route, serving

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
        # A firmware replay: a day buffered in meter 3, back-dated months, all in one
        # transaction (one received_at for every row).
        conn.execute(
            "INSERT INTO monitoring.power_measurements (time, device_id, power_w, energy_wh)"
            " SELECT %s + make_interval(mins => m), 'meter-3', 800 + m %% 60, 50000 + m * 13.0"
            " FROM generate_series(0, %s::int - 1) m",
            (replay_day(now), sizes.replay_minutes),
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
        admin, token = _admin_side(stack, Template(template_path, {"Mode": "admin", "DatabaseProfile": profile}),
                                   admin_url, log, out, result)  # fmt: skip
        api = stack.enter_context(serve_api(admin, port=0))
        ingest_url = f"{api.url}/api/fleet/ingest"
        _say(out, f"Admin API serving IngestFunction at {ingest_url}")
        client_env = {"INGEST_URL": ingest_url, "INGEST_TOKEN": token, "PUSH_BATCH_SIZE": str(sizes.batch_size)}
        client = _client_side(stack, Template(template_path, {"Mode": "client", "IngestEnabled": "true"}),
                              client_url, client_env, log, out)  # fmt: skip
        now = datetime.now(UTC)
        _say(out, f"the fleet writes: live readings, a replay back-dated to {replay_day(now):%Y-%m-%d},"
                  " one older than 30 days")  # fmt: skip
        _write_fleet(client_url, sizes, now)
        open_tx = stack.enter_context(_open_transaction(client_url, now - timedelta(hours=sizes.live_hours + 1)))
        _push_until_drained(client, open_tx, result, out, deadline=started + time_budget_s)
        _say(out, "Admin maintenance: queued hourly-aggregate refreshes")
        maintenance = admin.invoke(
            "MaintenanceFunction", json.loads((EVENTS / "bootstrap" / "maintenance.json").read_text())
        )
        _say(out, f"  {maintenance}")
        verify(result, admin_url, client_url, sizes, now)
    result.seconds = time.monotonic() - started
    report(result, out)
    return result


def _admin_side(
    stack: ExitStack, template: Template, url: str, log: Any, out: Callable[[str], None], result: DemoResult
) -> tuple[LocalStack, str]:
    """The Admin stack bootstrapped, and customer DEV0001 registered: its token."""
    admin = LocalStack(template, {"Parameters": {"DATABASE_URL": url}}, log=log)
    stack.callback(admin.close)
    _say(out, "bootstrapping the Admin database through BootstrapFunction (Create event)")
    reply = _bootstrap(admin)
    result.profile = reply["Data"]["Profile"]
    _say(out, f"  Admin profile: {result.profile}; applied {reply['Data']['Applied']}")
    _say(out, f"  definitions applied: {reply['Data'].get('Definitions', '-')}")
    _say(out, f"registering customer {CUSTOMER} through CustomerAdminFunction")
    created = admin.invoke("CustomerAdminFunction", {"action": "create", "customer_id": CUSTOMER, "name": "Demo"})
    if not created.get("ok"):
        raise RuntimeError(f"customer not created: {created}")
    _say(out, f"  token issued ({created['token_hint']}); only its SHA-256 is stored")
    return admin, str(created["token"])


def _client_side(
    stack: ExitStack, template: Template, url: str, push_env: dict[str, str], log: Any, out: Callable[[str], None]
) -> LocalStack:
    """The Client stack bootstrapped, its push state in a local DynamoDB."""
    dynamodb = stack.enter_context(embedded_dynamodb())
    ensure_state_table(dynamodb, "PushStateTable")
    env = {"Parameters": {"DATABASE_URL": url}, "PushFunction": {**push_env, "DYNAMODB_ENDPOINT_URL": dynamodb}}
    client = LocalStack(template, env, log=log)
    stack.callback(client.close)
    _say(out, "bootstrapping the Client database through BootstrapFunction (Create event)")
    _bootstrap(client)
    return client


@contextmanager
def _open_transaction(client_url: str, when: datetime) -> Iterator[psycopg.Connection]:
    """A transaction that is open while the first push runs and commits after it:
    its rows carry an old received_at, and must still arrive."""
    with psycopg.connect(client_url) as conn:
        conn.execute(
            "INSERT INTO monitoring.power_measurements (time, device_id, power_w, energy_wh)"
            " SELECT %s - make_interval(secs => s), 'meter-1', 42, 1 FROM generate_series(1, 50) s",
            (when,),
        )
        yield conn


def _push_until_drained(
    client: LocalStack, open_tx: psycopg.Connection, result: DemoResult, out: Callable[[str], None], deadline: float
) -> None:
    """The PushFunction on its schedule, time sped up, until a tick finds nothing to do."""
    stop = threading.Event()

    def on_push(logical_id: str, report: Any) -> None:
        result.ticks += 1
        if not isinstance(report, dict) or "measurements" not in report:
            _say(out, f"  push tick {result.ticks}: error {report}")
            return
        result.batches += sum(int(r["batches"]) for r in report.values())
        line = ", ".join(f"{k} {v['outcome']} ({v['rows']} rows)" for k, v in report.items())
        _say(out, f"  push tick {result.ticks}: {line}")
        if result.ticks == 1:
            open_tx.commit()
            _say(out, "  (the long-open transaction commits now, after the first push)")
        idle = all(v["outcome"] in ("idle", "skipped") for v in report.values())
        if (idle and open_tx.info.transaction_status == psycopg.pq.TransactionStatus.IDLE) or (
            time.monotonic() > deadline
        ):
            stop.set()

    _say(out, "running PushFunction on its schedule (rate(1 minute), time sped up 60x)")
    speed = 60.0
    t0 = datetime.now(UTC)
    run_schedules(client, stop, on_push, clock=lambda: t0 + (datetime.now(UTC) - t0) * speed, only={"PushFunction"})
