"""Server faults: half the calls fail with 503, the server commits and answers too
late, the database restarts mid-stream. Sent == received, nothing doubled, and every
failed batch is in fleet.ingest_events."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import psycopg
import pytest
from fleet.schema.migrate import migrate
from fleet_local.cluster import LocalCluster
from harness import INGEST_PATH, Clock, admin_api, drain, new_token, tally, write_numbered
from moto import mock_aws
from support import make_push_service


@pytest.fixture
def table(aws_credentials: None) -> Iterator[Any]:
    with mock_aws():
        yield boto3.resource("dynamodb").create_table(
            TableName="state",
            KeySchema=[{"AttributeName": "resource", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "resource", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )


def _events(admin_url: str) -> dict[int, int]:
    with psycopg.connect(admin_url) as conn:
        return dict(
            conn.execute(
                "SELECT status, count(*) FROM fleet.ingest_events WHERE batch_type = 'measurements' GROUP BY 1"
            ).fetchall()
        )


def test_half_of_all_calls_fail_with_503(admin_db_postgres: str, client_db: str, table: Any, monkeypatch) -> None:
    with psycopg.connect(admin_db_postgres, autocommit=True) as conn:
        # A real fault in the database: every other insert of measurements fails
        # as a lost connection would (the ingest answers 503 and audits it).
        conn.execute(
            """
            CREATE SEQUENCE fault_seq;
            CREATE FUNCTION fault() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('fault_seq') % 2 = 0 THEN
                    RAISE EXCEPTION 'injected fault' USING ERRCODE = '08006';
                END IF;
                RETURN NULL;
            END $$;
            CREATE TRIGGER fault BEFORE INSERT ON fleet.power_measurements
                FOR EACH STATEMENT EXECUTE FUNCTION fault();
            """
        )
    write_numbered(client_db, 1, 1000, per_tx=90)
    token = new_token(admin_db_postgres, "FLAKY")
    clock = Clock()
    with admin_api(admin_db_postgres, monkeypatch) as api:
        # One batch in flight: a batch sent again over rows a later one already stored
        # runs two inserts (the plain one, then ON CONFLICT), and with every other
        # statement failing it would fail every time (random faults, with batches in
        # flight: the test below).
        service = make_push_service(
            client_db, table, api.url + INGEST_PATH, token, clock, jitter=0.5, batch_size=100, in_flight=1
        )
        failures = 0
        for _ in range(200):
            report = service.tick()
            failures += report.resources["measurements"].outcome == "failed"
            if report.resources["measurements"].outcome == "idle":
                break
            clock.advance(1900)
    result = tally(client_db, admin_db_postgres, "FLAKY")
    assert result.missing == set()
    assert result.doubled == 0
    events = _events(admin_db_postgres)
    assert failures >= 5
    assert events.get(503, 0) == failures  # every failed batch is audited
    assert events[200] == 10


def test_random_503s_with_batches_in_flight_lose_and_double_nothing(
    admin_db_postgres: str, client_db: str, table: Any, monkeypatch
) -> None:
    with psycopg.connect(admin_db_postgres, autocommit=True) as conn:
        conn.execute(
            """
            CREATE FUNCTION fault() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF random() < 0.3 THEN
                    RAISE EXCEPTION 'injected fault' USING ERRCODE = '08006';
                END IF;
                RETURN NULL;
            END $$;
            CREATE TRIGGER fault BEFORE INSERT ON fleet.power_measurements
                FOR EACH STATEMENT EXECUTE FUNCTION fault();
            """
        )
    write_numbered(client_db, 1, 2000, per_tx=90)
    token = new_token(admin_db_postgres, "RANDOM")
    clock = Clock()
    with admin_api(admin_db_postgres, monkeypatch) as api:
        service = make_push_service(
            client_db, table, api.url + INGEST_PATH, token, clock, jitter=0.5, batch_size=100, in_flight=3
        )
        failures = 0
        for _ in range(300):
            report = service.tick()
            failures += report.resources["measurements"].outcome == "failed"
            if report.resources["measurements"].outcome == "idle":
                break
            clock.advance(1900)
        else:
            raise AssertionError("backlog not drained")
    result = tally(client_db, admin_db_postgres, "RANDOM")
    assert result.missing == set()
    assert result.doubled == 0
    assert failures >= 1
    events = _events(admin_db_postgres)
    assert events.get(503, 0) >= failures  # every failed batch is audited


def test_server_that_commits_then_answers_too_late(
    admin_db_postgres: str, client_db: str, table: Any, monkeypatch
) -> None:
    calls = {"n": 0}

    def late(handler: Callable[..., Any]) -> Callable[..., Any]:
        def invoke(event: dict[str, Any], context: Any) -> Any:
            result = handler(event, context)  # committed
            calls["n"] += 1
            if event["requestContext"]["http"]["method"] == "POST" and calls["n"] % 3 == 1:
                time.sleep(1.0)  # past the client's read timeout
            return result

        return invoke

    write_numbered(client_db, 1, 600, per_tx=50)
    token = new_token(admin_db_postgres, "LATE")
    clock = Clock()
    with admin_api(admin_db_postgres, monkeypatch, wrap=late) as api:
        service = make_push_service(
            client_db, table, api.url + INGEST_PATH, token, clock, jitter=0.5, batch_size=100, read_timeout=0.4
        )
        timeouts = 0
        for _ in range(100):
            report = service.tick()
            detail = report.resources["measurements"].detail or ""
            timeouts += "timed out" in detail.lower()
            if report.resources["measurements"].outcome == "idle":
                break
            clock.advance(1900)
    result = tally(client_db, admin_db_postgres, "LATE")
    assert timeouts >= 1
    assert result.missing == set()
    assert result.doubled == 0
    with psycopg.connect(admin_db_postgres) as conn:
        dup = conn.execute(
            "SELECT sum(duplicates) FROM fleet.ingest_events WHERE batch_type = 'measurements'"
        ).fetchone()[0]  # type: ignore[index]
    assert dup >= 100  # the late-answered batches came again and were counted as duplicates


def _wait_for(url: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with psycopg.connect(url, connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_database_restarts_in_the_middle_of_the_stream(client_db: str, table: Any, monkeypatch) -> None:
    cluster = LocalCluster(preload_timescaledb=False).start()
    try:
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE fleet_admin")
        admin_url = cluster.url("fleet_admin")
        with psycopg.connect(admin_url, autocommit=True) as conn:
            migrate(conn, "admin", "postgres")
        write_numbered(client_db, 1, 3000, per_tx=200)
        token = new_token(admin_url, "RESTART")
        clock = Clock()
        stop = threading.Event()
        restarts = 0

        def restarter() -> None:
            nonlocal restarts
            while not stop.wait(0.4):
                try:
                    cluster.restart()
                    restarts += 1
                except Exception:  # a restart that failed is retried; the server comes back below
                    cluster.ensure_running()

        with admin_api(admin_url, monkeypatch) as api:
            service = make_push_service(
                client_db, table, api.url + INGEST_PATH, token, clock, jitter=0.5, batch_size=50
            )
            thread = threading.Thread(target=restarter)
            thread.start()
            try:
                for _ in range(25):
                    service.tick()
                    clock.advance(1900)
            finally:
                stop.set()
                thread.join()
                cluster.ensure_running()
            _wait_for(admin_url)
            try:
                drain(service, clock)
            except AssertionError:
                log = (cluster._tmp / "server.log").read_text()[-3000:]  # type: ignore[operator]
                raise AssertionError(f"not drained; server log tail:\n{log}") from None
        result = tally(client_db, admin_url, "RESTART")
        assert restarts >= 2
        assert result.missing == set()
        assert result.doubled == 0
        events = _events(admin_url)
        assert sum(events.values()) >= 60
    finally:
        cluster.stop()
