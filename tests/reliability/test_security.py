"""Security: no customer reaches another's data (ids, cursor, ledger), revoked and
disabled customers are refused, no token reaches a log line or an audit row, SQL
metacharacters are data, and oversized headers are refused."""

from __future__ import annotations

import json
from typing import Any

import ingest
import psycopg
import pytest
from fleet import customers, tokens
from harness import reset_caches
from support import FakeLambdaContext, http_event

EVIL = [
    "'; DROP TABLE fleet.customers; --",
    'x" OR "1"="1',
    "\\'\\\\; SELECT pg_sleep(5); --",
    "%s %(x)s {0} $1 $$ $tag$",
    "Robert'); DELETE FROM fleet.power_measurements; --",
]


def _post(token: str, batch_type: str, items: list[Any], **headers: str) -> tuple[int, dict[str, Any]]:
    event = http_event(
        "ingest/measurements.json",
        headers={"x-customer-token": token, "x-batch-type": batch_type, **headers},
        body=json.dumps({"items": items}),
    )
    result = ingest.handler(event, FakeLambdaContext())
    return result["statusCode"], json.loads(result["body"])


def _state(token: str) -> tuple[int, dict[str, Any]]:
    result = ingest.handler(http_event("ingest/state.json", headers={"x-customer-token": token}), FakeLambdaContext())
    return result["statusCode"], json.loads(result["body"])


@pytest.fixture
def two_customers(admin_db_postgres: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("DATABASE_URL", admin_db_postgres)
    reset_caches()
    with psycopg.connect(admin_db_postgres, autocommit=True) as conn:
        a = customers.create(conn, "ALPHA", "Alpha").token
        b = customers.create(conn, "BRAVO", "Bravo").token
    yield admin_db_postgres, a, b
    reset_caches()


def test_cross_tenant_attempts_of_every_kind(two_customers: Any) -> None:
    url, a, b = two_customers
    _post(a, "sites", [{"id": "s1", "name": "Alpha plant"}], **{"x-push-cursor": "alpha-cursor"})
    _post(a, "devices", [{"id": "d1", "site_id": "s1", "name": "Alpha meter"}])
    _post(
        a,
        "measurements",
        [{"time": "2026-11-01T00:00:00Z", "device_id": "d1", "power_w": 1}],
        **{"x-push-cursor": "a-m"},
    )
    # B uses A's ids, names A in the body, and sends A's cursor.
    _post(
        b, "sites", [{"id": "s1", "name": "Bravo plant", "customer_id": "ALPHA"}], **{"x-push-cursor": "alpha-cursor"}
    )
    _post(b, "devices", [{"id": "d1", "site_id": "s1", "name": "Bravo meter", "customer_id": "ALPHA"}])
    _post(
        b,
        "measurements",
        [{"time": "2026-11-01T00:00:00Z", "device_id": "d1", "power_w": 999, "customer_id": "ALPHA"}],
        **{"x-push-cursor": "a-m"},
    )
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT name FROM fleet.sites WHERE customer_id = 'ALPHA'").fetchall() == [("Alpha plant",)]
        assert conn.execute("SELECT name FROM fleet.devices WHERE customer_id = 'ALPHA'").fetchall() == [
            ("Alpha meter",)
        ]
        assert conn.execute("SELECT power_w FROM fleet.power_measurements WHERE customer_id = 'ALPHA'").fetchall() == [
            (1.0,)
        ]
    # The ledger answers each customer with its own batches only.
    status, ledger_b = _state(b)
    assert status == 200
    assert ledger_b["customer_id"] == "BRAVO"
    status, ledger_a = _state(a)
    assert ledger_a["ledger"]["sites"]["cursor"] == "alpha-cursor"
    with psycopg.connect(url) as conn:
        owners = conn.execute(
            "SELECT DISTINCT customer_id FROM fleet.ingest_events WHERE client_cursor = 'alpha-cursor'"
        ).fetchall()
    assert sorted(owners) == [("ALPHA",), ("BRAVO",)]  # each cursor is filed under its sender


def test_revoked_and_disabled_customers_are_refused(two_customers: Any) -> None:
    url, a, b = two_customers
    with psycopg.connect(url, autocommit=True) as conn:
        customers.revoke_tokens(conn, "ALPHA")
        customers.set_status(conn, "BRAVO", "disabled")
    assert _post(a, "measurements", [])[0] == 401
    assert _state(a)[0] == 401
    assert _post(b, "measurements", [])[0] == 403
    assert _state(b)[0] == 403


def test_sql_metacharacters_in_every_text_field_are_stored_as_data(two_customers: Any) -> None:
    url, a, _ = two_customers
    for i, evil in enumerate(EVIL):
        sid, did = f"{evil}"[:64], f"{evil}-{i}"[:64]
        assert _post(a, "sites", [{"id": sid, "name": evil, "timezone": evil[:128]}])[0] == 200
        assert (
            _post(a, "devices", [{"id": did, "site_id": sid, "name": evil, "model": evil, "firmware_version": evil}])[0]
            == 200
        )
        status, doc = _post(
            a,
            "measurements",
            [{"time": f"2026-11-01T00:0{i}:00Z", "device_id": did, "power_w": 1}],
            **{"x-push-cursor": evil},
        )
        assert status == 200 and doc["accepted"] == 1
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM fleet.customers").fetchone() == (2,)
        names = {r[0] for r in conn.execute("SELECT name FROM fleet.sites")}
        cursors = {r[0] for r in conn.execute("SELECT client_cursor FROM fleet.ingest_events")}
        stored = conn.execute("SELECT count(*) FROM fleet.power_measurements").fetchone()
    assert set(EVIL) <= names
    assert set(EVIL) <= cursors
    assert stored == (len(EVIL),)


def test_headers_over_their_limits_are_refused(two_customers: Any) -> None:
    _, a, _ = two_customers
    assert _post(a, "measurements", [], **{"x-push-cursor": "c" * 1025})[0] == 400
    assert _post(a, "measurements", [], **{"x-batch-id": "f" * 5000})[0] == 400
    assert _post(a, "m" * 10_000, [])[0] == 400
    assert _post(a + "x" * 10_000, "measurements", [])[0] == 401
    assert _post("flt_" + "A" * 100_000, "measurements", [])[0] == 401


def test_no_token_reaches_a_log_line_or_an_audit_row(two_customers: Any, capfd: pytest.CaptureFixture[str]) -> None:
    import io
    import logging

    from fleet.observability import logger

    url, a, b = two_customers
    # Every line the service logs, formatted as Lambda would ship it.
    sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logger.registered_formatter)
    logging.getLogger(logger.name).addHandler(handler)
    logging.getLogger().addHandler(handler)
    issued = [a, b]
    with psycopg.connect(url, autocommit=True) as conn:
        issued.append(customers.rotate_token(conn, "ALPHA").token)
    forged = tokens.generate()
    _post(a, "measurements", [{"time": "2026-11-01T00:00:00Z", "device_id": "d", "power_w": 1}])
    _post(a, "measurements", [{"time": "bad", "device_id": "d"}])  # rejected item
    _post(a, "measurements", [], **{"content-type": "text/csv"})  # refused batch
    _post(forged, "measurements", [])
    _post(issued[2], "bogus", [])
    _state(b)
    logging.getLogger(logger.name).removeHandler(handler)
    logging.getLogger().removeHandler(handler)
    out, err = capfd.readouterr()
    logs = out + err + sink.getvalue()
    assert "batch ingested" in logs  # the logs were captured
    for token in [*issued, forged]:
        assert token not in logs
        assert token[4:-7] not in logs  # not even its random part
    with psycopg.connect(url) as conn:
        dump = json.dumps(
            [
                conn.execute("SELECT * FROM fleet.ingest_events").fetchall(),
                conn.execute("SELECT * FROM fleet.quarantine").fetchall(),
                conn.execute("SELECT customer_id, token_hint, created_at FROM fleet.customer_tokens").fetchall(),
            ],
            default=str,
        )
    for token in [*issued, forged]:
        assert token not in dump
        assert token[4:-7] not in dump
