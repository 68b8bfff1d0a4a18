"""The bootstrap custom resource always answers CloudFormation, exactly once."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import bootstrap
import psycopg
import pytest
from fleet import config
from support import FakeLambdaContext, load_event, recording_server


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in ("DATABASE_URL", "DB_SECRET_ARN", "FLEET_ROLE", "DATABASE_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    config.cached.cache_clear()
    yield monkeypatch
    config.cached.cache_clear()


def _invoke(event_name: str, url: str, timeout_s: float = 60) -> tuple[dict, list]:
    with recording_server() as (base, seen):
        event = load_event(f"bootstrap/{event_name}")
        event["ResponseURL"] = f"{base}/cfn-response?X-Amz-Signature=abc"
        result = bootstrap.handler(event, FakeLambdaContext(timeout_s=timeout_s))
    return result, seen


@pytest.mark.parametrize("event_name", ["create.json", "update.json"])
def test_create_and_update_migrate_and_answer_success(env, empty_db: str, event_name: str) -> None:
    env.setenv("DATABASE_URL", empty_db)
    env.setenv("FLEET_ROLE", "admin")
    _, seen = _invoke(event_name, empty_db)
    assert len(seen) == 1
    put = seen[0]
    assert put.method == "PUT"
    assert put.path.startswith("/cfn-response")
    doc = put.json()
    assert doc["Status"] == "SUCCESS", doc["Reason"]
    assert doc["PhysicalResourceId"] == "fleet-admin-schema"
    assert doc["LogicalResourceId"] == "DatabaseSchema"
    assert doc["Data"]["Profile"] in ("postgres", "timescale")
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT to_regclass('fleet.power_measurements')").fetchone() == (
            "fleet.power_measurements",
        )


def test_physical_id_is_stable_across_create_and_update(env, empty_db: str) -> None:
    env.setenv("DATABASE_URL", empty_db)
    env.setenv("FLEET_ROLE", "client")
    _, created = _invoke("create.json", empty_db)
    _, updated = _invoke("update.json", empty_db)
    assert created[0].json()["PhysicalResourceId"] == "fleet-client-schema"
    assert updated[0].json()["Status"] == "SUCCESS"
    # The update event carries the admin id; a client stack answers with its own.
    assert updated[0].json()["PhysicalResourceId"] == "fleet-client-schema"


def test_delete_keeps_data_and_succeeds_even_without_a_database(env) -> None:
    env.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    env.setenv("FLEET_ROLE", "admin")
    result, seen = _invoke("delete.json", "")
    doc = seen[0].json()
    assert doc["Status"] == "SUCCESS"
    assert doc["PhysicalResourceId"] == "fleet-admin-schema"
    assert result["Status"] == "SUCCESS"


def test_missing_configuration_answers_failed_with_a_readable_reason(env) -> None:
    _, seen = _invoke("create.json", "")
    assert len(seen) == 1
    doc = seen[0].json()
    assert doc["Status"] == "FAILED"
    assert "FLEET_ROLE" in doc["Reason"]
    env.setenv("FLEET_ROLE", "admin")
    config.cached.cache_clear()
    _, seen = _invoke("create.json", "")
    assert seen[0].json()["Status"] == "FAILED"
    assert "DATABASE_URL or DB_SECRET_ARN" in seen[0].json()["Reason"]


def test_unreachable_database_answers_failed(env) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env.setenv("DATABASE_URL", f"postgresql://fleet:s3cret-pw@127.0.0.1:{port}/fleet")
    env.setenv("FLEET_ROLE", "admin")
    _, seen = _invoke("create.json", "")
    doc = seen[0].json()
    assert doc["Status"] == "FAILED"
    assert "DatabaseUnavailable" in doc["Reason"]
    assert "s3cret-pw" not in doc["Reason"]


def test_lambda_about_to_time_out_answers_failed_once(env) -> None:
    # A server that accepts the connection and never speaks: the connect hangs.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(silent.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        env.setenv("DATABASE_URL", f"postgresql://fleet@127.0.0.1:{silent.getsockname()[1]}/fleet")
        env.setenv("FLEET_ROLE", "admin")
        # 5.5 s left with a 5 s margin: the watchdog answers after about half a second.
        _, seen = _invoke("create.json", "", timeout_s=5.5)
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        silent.close()
    assert len(seen) == 1
    doc = seen[0].json()
    assert doc["Status"] == "FAILED"
    assert "timed out" in doc["Reason"]


def test_maintenance_handler_reports_the_profile(env, admin_db_postgres: str) -> None:
    env.setenv("DATABASE_URL", admin_db_postgres)
    env.setenv("FLEET_ROLE", "admin")
    report = bootstrap.maintenance_handler(load_event("bootstrap/maintenance.json"), FakeLambdaContext())
    assert report["profile"] == "postgres"
    assert report["ranges_refreshed"] == 0
