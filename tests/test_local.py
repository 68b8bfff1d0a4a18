"""The local runner honours template.yaml: invoke, start-api, schedules, the demo."""

from __future__ import annotations

import gzip
import json
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bootstrap
import ingest
import psycopg
import pytest
from fleet import config, customers, tokens
from fleet_local.cli import main
from fleet_local.demo import Sizes, run_demo
from fleet_local.runner import DEFAULT_TEMPLATE, LocalStack, serve_api
from fleet_local.schedules import Schedule
from fleet_local.template import Template
from support import EVENTS, FakeLambdaContext, load_event, one_at_a_time, recording_server

EXAMPLE_TOKEN = load_event("ingest/measurements.json")["headers"]["x-customer-token"]


def _register_example_token(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO fleet.customers (id, name) VALUES ('DEV0001', 'Dev')")
        conn.execute(
            "INSERT INTO fleet.customer_tokens (token_sha256, customer_id, token_hint) VALUES (%s, 'DEV0001', 'x')",
            (tokens.digest(EXAMPLE_TOKEN),),
        )


def _stack(mode: str, env_vars: dict[str, dict[str, str]]) -> LocalStack:
    return LocalStack(Template(DEFAULT_TEMPLATE, {"Mode": mode, "IngestEnabled": "true"}), env_vars)


def _direct(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], handler: Any, event: dict[str, Any]) -> Any:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config.cached.cache_clear()
    ingest.service.cache_clear()
    try:
        return handler(event, FakeLambdaContext())
    finally:
        config.cached.cache_clear()
        ingest.service.cache_clear()


@pytest.mark.parametrize("name", sorted(p.name for p in (EVENTS / "ingest").glob("*.json")))
def test_local_invoke_of_ingest_equals_the_direct_handler(
    name: str, pg_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = []
    for _ in range(2):
        db = pg_server.create_database(template=pg_server.template("admin", "postgres"))
        urls.append(pg_server.url(db))
        _register_example_token(urls[-1])
    event = load_event(f"ingest/{name}")
    stack = _stack("admin", {"Parameters": {"DATABASE_URL": urls[0]}})
    try:
        local = stack.invoke("IngestFunction", event)
    finally:
        stack.close()
    direct = _direct(monkeypatch, {"DATABASE_URL": urls[1]}, ingest.handler, event)
    assert local["statusCode"] == direct["statusCode"] == 200
    assert json.loads(local["body"]) == json.loads(direct["body"])


@pytest.mark.parametrize("name", ["create.json", "update.json", "delete.json"])
def test_local_invoke_of_bootstrap_equals_the_direct_handler(name: str, pg_server, monkeypatch) -> None:
    results = []
    for how in ("local", "direct"):
        url = pg_server.url(pg_server.create_database())
        with recording_server() as (base, seen):
            event = load_event(f"bootstrap/{name}")
            event["ResponseURL"] = f"{base}/cfn"
            if how == "local":
                stack = _stack("admin", {"Parameters": {"DATABASE_URL": url}})
                try:
                    result = stack.invoke("BootstrapFunction", event)
                finally:
                    stack.close()
            else:
                result = _direct(
                    monkeypatch,
                    {"DATABASE_URL": url, "FLEET_ROLE": "admin", "DATABASE_PROFILE": "auto"},
                    bootstrap.handler,
                    event,
                )
        assert len(seen) == 1
        results.append((result, seen[0].json()["Status"]))
    assert results[0] == results[1]
    assert results[0][1] == "SUCCESS"


def test_local_invoke_of_maintenance_equals_the_direct_handler(admin_db_postgres: str, monkeypatch) -> None:
    event = load_event("bootstrap/maintenance.json")
    stack = _stack("admin", {"Parameters": {"DATABASE_URL": admin_db_postgres}})
    try:
        local = stack.invoke("MaintenanceFunction", event)
    finally:
        stack.close()
    direct = _direct(
        monkeypatch, {"DATABASE_URL": admin_db_postgres, "FLEET_ROLE": "admin"}, bootstrap.maintenance_handler, event
    )
    assert local == direct
    assert local["profile"] == "postgres"


def test_local_invoke_of_push_equals_the_direct_handler(pg_server, monkeypatch, tmp_path: Path) -> None:
    import push
    from fleet_local.api import Route, serving
    from fleet_local.embedded import embedded_dynamodb, ensure_state_table, local_aws_env

    local_aws_env()
    admin = pg_server.url(pg_server.create_database(template=pg_server.template("admin", "postgres")))
    with psycopg.connect(admin, autocommit=True) as conn:
        token_a = customers.create(conn, "A", "a").token
        token_b = customers.create(conn, "B", "b").token
    clients = []
    for _ in range(2):
        url = pg_server.url(pg_server.create_database(template=pg_server.template("client", "postgres")))
        with psycopg.connect(url) as conn:
            conn.execute(
                "INSERT INTO monitoring.sites (id, name, updated_at) VALUES ('s1', 'Plant', '2026-11-01T00:00:00Z')"
            )
            conn.execute(
                "INSERT INTO monitoring.power_measurements (time, device_id, power_w)"
                " SELECT '2026-11-01T00:00:00Z'::timestamptz + make_interval(mins => g), 'm1', g"
                " FROM generate_series(1, 120) g"
            )
        clients.append(url)
    monkeypatch.setenv("DATABASE_URL", admin)
    config.cached.cache_clear()
    ingest.service.cache_clear()
    ingest.service()  # the in-process Admin keeps its database
    event = load_event("push/scheduled.json")
    with (
        embedded_dynamodb() as endpoint,
        serving(
            [
                Route("POST", "/api/fleet/ingest", one_at_a_time(ingest.handler)),
                Route("GET", "/api/fleet/ingest/state", one_at_a_time(ingest.handler)),
            ]
        ) as api,
    ):
        ensure_state_table(endpoint, "state-local")
        ensure_state_table(endpoint, "state-direct")
        common = {"INGEST_URL": f"{api.url}/api/fleet/ingest", "DYNAMODB_ENDPOINT_URL": endpoint}
        stack = _stack(
            "client",
            {
                "Parameters": {"DATABASE_URL": clients[0]},
                "PushFunction": {**common, "INGEST_TOKEN": token_a, "PUSH_STATE_TABLE": "state-local"},
            },
        )
        try:
            local = stack.invoke("PushFunction", event)
        finally:
            stack.close()
        env = {**common, "DATABASE_URL": clients[1], "INGEST_TOKEN": token_b, "PUSH_STATE_TABLE": "state-direct"}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        config.cached.cache_clear()
        push.service.cache_clear()
        try:
            direct = push.handler(event, FakeLambdaContext())
        finally:
            push.service.cache_clear()
            config.cached.cache_clear()
            ingest.service.cache_clear()
    assert local == direct
    assert local["measurements"]["rows"] == 120


def _admin_stack(url: str) -> tuple[str, LocalStack]:
    """An Admin stack on ``url`` and the token of its one customer."""
    with psycopg.connect(url, autocommit=True) as conn:
        token = customers.create(conn, "DEV0001", "Dev").token
    return token, _stack("admin", {"Parameters": {"DATABASE_URL": url}})


def _measurements_request(
    base: str, token: str, body: bytes, headers: dict[str, str | bytes]
) -> urllib.request.Request:
    """A POST of a measurements batch to a local API at ``base``."""
    return urllib.request.Request(
        f"{base}/api/fleet/ingest",
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "X-Customer-Token": token,
            "X-Batch-Type": "measurements",
            **headers,  # type: ignore[dict-item]  # http.client sends bytes as they are
        },
    )


def test_start_api_serves_the_template_routes_with_gzip_and_404(admin_db_postgres: str) -> None:
    token, stack = _admin_stack(admin_db_postgres)
    try:
        with serve_api(stack, port=0) as api:
            assert {r.route_key for r in api.routes} == {"POST /api/fleet/ingest", "GET /api/fleet/ingest/state"}
            body = gzip.compress(
                json.dumps({"items": [{"time": "2026-11-01T00:00:00Z", "device_id": "m1", "power_w": 5}]}).encode()
            )
            request = _measurements_request(api.url, token, body, {"Content-Encoding": "gzip"})
            with urllib.request.urlopen(request, timeout=30) as resp:
                assert resp.status == 200
                assert json.loads(resp.read()) == {"accepted": 1, "duplicates": 0, "rejected": 0, "errors": []}
            with pytest.raises(urllib.error.HTTPError) as missing:
                urllib.request.urlopen(f"{api.url}/api/fleet/nope", timeout=10)
            assert missing.value.code == 404
            with pytest.raises(urllib.error.HTTPError) as unauthorised:
                urllib.request.urlopen(f"{api.url}/api/fleet/ingest/state", timeout=30)
            assert unauthorised.value.code == 401
    finally:
        stack.close()
    with psycopg.connect(admin_db_postgres) as conn:
        assert conn.execute("SELECT count(*) FROM fleet.power_measurements").fetchone() == (1,)


def test_start_api_hands_on_utf8_header_values_as_api_gateway_does(admin_db_postgres: str) -> None:
    # http.server reads header bytes as latin-1; API Gateway reads them as UTF-8.
    token, stack = _admin_stack(admin_db_postgres)
    cursors = ["zähler-7|2026-11-01T00:00:00Z", "計器-€-✓", "ascii-only"]
    try:
        with serve_api(stack, port=0) as api:
            for i, cursor in enumerate(cursors):
                body = json.dumps({"items": [{"time": f"2026-11-01T00:0{i}:00Z", "device_id": "m1"}]}).encode()
                # Bytes go on the wire as they are (a str would be sent as latin-1).
                request = _measurements_request(api.url, token, body, {"X-Push-Cursor": cursor.encode("utf-8")})
                with urllib.request.urlopen(request, timeout=30) as resp:
                    assert resp.status == 200
            state = urllib.request.Request(f"{api.url}/api/fleet/ingest/state", headers={"X-Customer-Token": token})
            with urllib.request.urlopen(state, timeout=30) as resp:
                assert json.loads(resp.read())["ledger"]["measurements"]["cursor"] == cursors[-1]
    finally:
        stack.close()
    with psycopg.connect(admin_db_postgres) as conn:
        stored = [r[0] for r in conn.execute("SELECT client_cursor FROM fleet.ingest_events ORDER BY id")]
    assert stored == cursors


def test_start_api_header_bytes_that_are_not_utf8_become_replacement_characters() -> None:
    from fleet_local.api import Route, serving

    seen: list[dict[str, Any]] = []

    def echo(event: dict[str, Any], context: Any) -> dict[str, Any]:
        seen.append(event["headers"])
        return {"statusCode": 200, "body": ""}

    with serving([Route("POST", "/echo", echo)]) as api:
        request = urllib.request.Request(
            f"{api.url}/echo",
            data=b"{}",
            method="POST",
            headers={"X-Push-Cursor": b"ok-\xff-\xc3\xa4"},  # type: ignore[dict-item]
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200
    assert seen[0]["x-push-cursor"] == "ok-\ufffd-ä"


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("rate(1 minute)", "2026-11-27T10:00:30Z", "2026-11-27T10:01:30Z"),
        ("rate(5 minutes)", "2026-11-27T10:00:00Z", "2026-11-27T10:05:00Z"),
        ("cron(0/15 * * * ? *)", "2026-11-27T10:07:10Z", "2026-11-27T10:15:00Z"),
        ("cron(0/15 * * * ? *)", "2026-11-27T10:45:00Z", "2026-11-27T11:00:00Z"),
        ("cron(30 2 ? * MON *)", "2026-11-27T10:00:00Z", "2026-11-30T02:30:00Z"),
        ("rate(15 minutes)", "2026-11-27T10:00:00Z", "2026-11-27T10:15:00Z"),
    ],
)
def test_schedule_expressions(expression: str, after: str, expected: str) -> None:
    start = datetime.fromisoformat(after)
    assert Schedule.parse(expression).next_after(start) == datetime.fromisoformat(expected)


@pytest.mark.parametrize(
    "bad", ["rate(0 minutes)", "rate(1 minutes)", "rate(5 minute)", "cron(* * * * * *)", "every 5m"]
)
def test_bad_schedule_expressions_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"rate|cron|schedule|'\?'"):
        Schedule.parse(bad)


def test_template_schedules_are_read_from_the_template() -> None:
    # Only the functions the template's Conditions create for the role are scheduled.
    assert _stack("client", {}).schedules() == [("PushFunction", "Push", "rate(1 minute)")]
    assert _stack("admin", {}).schedules() == [("MaintenanceFunction", "Maintenance", "rate(15 minutes)")]


def test_cli_local_invoke_prints_the_response(admin_db_postgres: str, tmp_path: Path, capsys) -> None:
    env_file = tmp_path / "env.json"
    env_file.write_text(json.dumps({"Parameters": {"DATABASE_URL": admin_db_postgres}}))
    code = main(
        [
            "local", "invoke", "MaintenanceFunction", "--event", str(EVENTS / "bootstrap/maintenance.json"),
            "--env-vars", str(env_file), "--parameter-overrides", "Mode=admin",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert json.loads(out)["profile"] == "postgres"


@pytest.mark.parametrize("profile", ["postgres", "timescale"])
def test_the_demo_scenario_passes_every_check(pg_server, profile: str, request: pytest.FixtureRequest) -> None:
    if profile == "timescale":
        request.getfixturevalue("timescale_required")
    lines: list[str] = []
    result = run_demo(
        server_url=pg_server.base_url,
        sizes=Sizes(devices=3, live_hours=1, replay_minutes=600, old_replay_minutes=120, batch_size=300),
        out=lines.append,
        profile=profile,
    )
    report = "\n".join(lines)
    assert result.profile == profile, report
    assert result.ok, report
    assert "all checks passed" in report
    assert len(result.checks) >= 7
    assert result.batches > 3


@pytest.mark.calendar
def test_status_shows_each_customer_at_a_glance(admin_db_postgres: str, capsys) -> None:
    from fleet_local.status import fleet_status, render

    with psycopg.connect(admin_db_postgres, autocommit=True) as conn:
        customers.create(conn, "DEV0001", "Dev")
        customers.create(conn, "DEV0002", "Quiet")
        conn.execute(
            "INSERT INTO fleet.ingest_events (customer_id, batch_type, accepted, status, client_cursor, min_time)"
            " VALUES ('DEV0001', 'measurements', 100, 200, 'cur-1', now() - interval '3 days'),"
            "        ('DEV0001', 'measurements', 300, 200, 'cur-2', now()),"
            "        ('DEV0001', 'measurements', 0, 413, NULL, NULL)"
        )
        conn.execute("UPDATE fleet.customers SET last_seen_at = now() - interval '5 minutes' WHERE id = 'DEV0001'")
        rows = {r["id"]: r for r in fleet_status(conn)}
    assert rows["DEV0001"]["rows_1h"] == 400
    assert rows["DEV0001"]["late_1d"] == 100
    assert rows["DEV0001"]["refused_1d"] == 1
    assert rows["DEV0001"]["newest"]["status"] == 413
    assert rows["DEV0002"]["rows_1d"] == 0
    text = render(list(rows.values()), datetime.now(UTC))
    assert "DEV0001" in text and "25%" in text and "5m ago" in text and "never" in text
    assert main(["status", "--database-url", admin_db_postgres]) == 0
    assert "DEV0002" in capsys.readouterr().out


def _job(job_id: int, proc: str, error: str | None) -> Any:
    from fleet.schema.profiles import FailedJob

    return FailedJob(job_id, proc, None, datetime.now(UTC), 1, error)


def test_the_demo_names_the_known_background_job_fault_and_fails_on_any_other() -> None:
    from fleet_local.demo_report import DemoResult, check_background_jobs

    portal = 'cannot drop portal "" while it is being set up'
    server = ("15.20", "2.28.3")
    known = [
        _job(3, "policy_job_stat_history_retention", portal),
        _job(1001, "policy_refresh_continuous_aggregate", portal),
    ]
    result = DemoResult()
    check_background_jobs(result, known, server)
    (check,) = result.checks
    assert check.ok, check
    assert "known fault of PostgreSQL 15.20 with TimescaleDB 2.28.3" in check.detail
    assert "policy_refresh_continuous_aggregate" in check.detail and "after" in check.detail

    for other in ([_job(1002, "policy_compression", "out of memory")], [_job(1003, "test_job", None)]):
        result = DemoResult()
        check_background_jobs(result, known + other, server)
        (check,) = result.checks
        assert not check.ok and not result.ok, check
        assert f"job {other[0].job_id} {other[0].proc_name}" in check.detail

    result = DemoResult()
    check_background_jobs(result, [], server)
    assert result.checks[0].ok and "no background job's last run failed" in result.checks[0].detail


def test_the_demo_replays_a_day_relative_to_today_older_than_its_check_needs() -> None:
    from fleet_local.demo_report import replay_day

    now = datetime.now(UTC)
    day = replay_day(now)
    assert day == day.replace(hour=0, minute=0, second=0, microsecond=0)
    assert timedelta(days=32) < now - day < timedelta(days=366)
    assert replay_day(datetime(2027, 1, 15, 8, tzinfo=UTC)) == replay_day(datetime(2027, 1, 15, 23, tzinfo=UTC))
