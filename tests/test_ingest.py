"""The ingest endpoint, every line of the HTTP contract, through the real handler
against a real PostgreSQL Admin database."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import ingest
import psycopg
import pytest
from contract import check_response
from fleet import config, customers
from hourly_reference import hourly
from support import FakeLambdaContext, http_event


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


class IngestClient:
    """Sends requests through ``ingest.handler`` as API Gateway would."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token

    def call(self, event: dict[str, Any]) -> Answer:
        result = ingest.handler(event, FakeLambdaContext())
        body = json.loads(result["body"]) if result.get("body") else {}
        answer = Answer(result["statusCode"], body, {k.lower(): v for k, v in result.get("headers", {}).items()})
        # Every answer the tests see must be one the OpenAPI contract allows.
        http = event["requestContext"]["http"]
        check_response(http["method"], http["path"], answer.status, answer.headers, answer.body)
        return answer

    def post(
        self,
        batch_type: str | None,
        items: list[Any] | None = None,
        *,
        body: str | bytes | None = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        drop: tuple[str, ...] = (),
        gzip_body: bool = False,
        cursor: str | None = "c-1",
        batch_id: str | None = None,
    ) -> Answer:
        hdrs = {"x-customer-token": token or self.token}
        if batch_type is not None:
            hdrs["x-batch-type"] = batch_type
        if cursor is not None:
            hdrs["x-push-cursor"] = cursor
        hdrs["x-batch-id"] = batch_id or str(uuid.uuid4())
        hdrs.update(headers or {})
        if body is None:
            body = json.dumps({"items": items or []})
        if gzip_body:
            raw = body.encode() if isinstance(body, str) else body
            body = gzip.compress(raw)
            hdrs["content-encoding"] = "gzip"
        drop_all = (*drop, *(("x-batch-type",) if batch_type is None else ()))
        for name in drop_all:
            hdrs.pop(name, None)
        event = http_event("ingest/measurements.json", headers=hdrs, body=body, drop_headers=drop_all)
        return self.call(event)

    def state(self, token: str | None = None) -> Answer:
        return self.call(http_event("ingest/state.json", headers={"x-customer-token": token or self.token}))

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            return conn.execute(query, params).fetchall()

    def one(self, query: str, *params: Any) -> Any:
        return self.sql(query, *params)[0][0]


def _reset_caches() -> None:
    config.cached.cache_clear()
    ingest.service.cache_clear()


@pytest.fixture
def api(admin_db: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[IngestClient]:
    yield from _client(admin_db, monkeypatch)


@pytest.fixture
def api_timescale(admin_db_timescale: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[IngestClient]:
    yield from _client(admin_db_timescale, monkeypatch)


def _client(admin_db: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[IngestClient]:
    monkeypatch.setenv("DATABASE_URL", admin_db)
    monkeypatch.delenv("DB_SECRET_ARN", raising=False)
    monkeypatch.setenv("MAX_BODY_BYTES", "200000")
    monkeypatch.setenv("MAX_DECOMPRESSED_BYTES", "1000000")
    monkeypatch.setenv("MAX_ITEMS", "500")
    _reset_caches()
    with psycopg.connect(admin_db, autocommit=True) as conn:
        issued = customers.create(conn, "DEV0001", "Development customer")
    yield IngestClient(admin_db, issued.token)
    _reset_caches()


def new_customer(api: IngestClient, customer_id: str) -> str:
    with psycopg.connect(api.url, autocommit=True) as conn:
        return customers.create(conn, customer_id, customer_id).token


def m(t: Any, device: Any = "meter-1", power: Any = 100.0, **extra: Any) -> dict[str, Any]:
    time = t.isoformat() if isinstance(t, datetime) else t
    return {
        "time": time,
        "device_id": device,
        "power_w": power,
        "energy_wh": extra.pop("energy_wh", 1000.0),
        **extra,
    }


NOW = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=5)


def audit_rows(api: IngestClient) -> list[tuple[Any, ...]]:
    return api.sql(
        "SELECT status, batch_type, accepted, duplicates, rejected, error FROM fleet.ingest_events ORDER BY id"
    )


# --- the happy paths -----------------------------------------------------------


@pytest.mark.calendar
def test_measurements_land_and_are_audited(api: IngestClient) -> None:
    batch_id = str(uuid.uuid4())
    items = [m(NOW + timedelta(minutes=i), power=100.0 + i) for i in range(10)]
    answer = api.post("measurements", items, cursor="cur-10", batch_id=batch_id)
    assert answer.status == 200
    assert answer.body == {"accepted": 10, "duplicates": 0, "rejected": 0, "errors": []}
    assert api.one("SELECT count(*) FROM fleet.power_measurements WHERE customer_id = 'DEV0001'") == 10
    row = api.sql(
        "SELECT customer_id, batch_type, batch_id::text, accepted, client_cursor, min_time, max_time, status,"
        " bytes > 0, duration_ms >= 0 FROM fleet.ingest_events"
    )
    # In UTC: the session may live in a zone whose autumn hour happens twice, and
    # Python never finds a time inside that fold equal to one of another zone.
    row = [tuple(v.astimezone(UTC) if isinstance(v, datetime) else v for v in r) for r in row]
    assert row == [
        ("DEV0001", "measurements", batch_id, 10, "cur-10", NOW, NOW + timedelta(minutes=9), 200, True, True)
    ]
    seen = api.sql("SELECT first_seen_at IS NOT NULL, last_seen_at IS NOT NULL FROM fleet.customers")
    assert seen == [(True, True)]


def test_sites_and_devices_upsert_by_customer_and_id(api: IngestClient) -> None:
    sites = [{"id": "s1", "name": "Plant", "timezone": "UTC", "latitude": 1.5, "longitude": 2.5}]
    assert api.post("sites", sites).body["accepted"] == 1
    assert api.post("sites", sites).body == {"accepted": 0, "duplicates": 1, "rejected": 0, "errors": []}
    sites[0]["name"] = "Plant renamed"
    assert api.post("sites", sites).body["accepted"] == 1
    assert api.sql("SELECT name FROM fleet.sites") == [("Plant renamed",)]
    devices = [{"id": "d1", "site_id": "s1", "name": "Meter", "model": "X", "firmware_version": "1.0"}]
    assert api.post("devices", devices).body["accepted"] == 1
    devices[0]["firmware_version"] = "1.1"
    assert api.post("devices", devices).body["accepted"] == 1
    assert api.sql("SELECT customer_id, id, firmware_version FROM fleet.devices") == [("DEV0001", "d1", "1.1")]


def test_an_older_site_version_delivered_late_does_not_overwrite(api: IngestClient) -> None:
    new = {"id": "s1", "name": "New name", "updated_at": "2026-11-02T00:00:00Z"}
    old = {"id": "s1", "name": "Old name", "updated_at": "2026-11-01T00:00:00Z"}
    api.post("sites", [new])
    answer = api.post("sites", [old])
    assert answer.body["duplicates"] == 1
    assert api.sql("SELECT name FROM fleet.sites") == [("New name",)]


def test_gzip_body_is_accepted(api: IngestClient) -> None:
    items = [m(NOW + timedelta(seconds=i)) for i in range(50)]
    answer = api.post("measurements", items, gzip_body=True)
    assert answer.status == 200
    assert answer.body["accepted"] == 50
    assert api.one("SELECT decompressed_bytes > bytes FROM fleet.ingest_events") is True


def test_state_route_returns_the_ledger_and_limits(api: IngestClient) -> None:
    api.post("measurements", [m(NOW)], cursor="first")
    api.post("measurements", [m(NOW + timedelta(minutes=1))], cursor="second")
    api.post("measurements", [m(NOW, power=float("nan"))], body='{"items": [', cursor="refused")
    api.post("sites", [{"id": "s", "name": "n"}], cursor="sites-hash")
    answer = api.state()
    assert answer.status == 200
    assert answer.body["customer_id"] == "DEV0001"
    assert answer.body["ledger"]["measurements"]["cursor"] == "second"
    assert answer.body["ledger"]["sites"]["cursor"] == "sites-hash"
    assert answer.body["ledger"]["devices"]["cursor"] is None
    assert answer.body["limits"] == {
        "max_body_bytes": 200000,
        "max_decompressed_bytes": 1000000,
        "max_items": 500,
        "max_in_flight": 2,
    }


# --- every status code of the contract -------------------------------------------


def test_401_identical_for_missing_unknown_expired_and_revoked(api: IngestClient) -> None:
    from fleet import tokens

    unknown = tokens.generate()
    expired = new_customer(api, "EXP")
    revoked = new_customer(api, "REV")
    api.sql(
        "UPDATE fleet.customer_tokens SET expires_at = now() - interval '1 second' WHERE customer_id = 'EXP' RETURNING 1"
    )
    with psycopg.connect(api.url, autocommit=True) as conn:
        customers.revoke_tokens(conn, "REV")
    answers = [
        api.post("measurements", [m(NOW)], drop=("x-customer-token",)),
        api.post("measurements", [m(NOW)], token=unknown),
        api.post("measurements", [m(NOW)], token=expired),
        api.post("measurements", [m(NOW)], token=revoked),
        api.state(token=unknown),
    ]
    assert [a.status for a in answers] == [401] * 5
    assert len({json.dumps(a.body) for a in answers}) == 1
    assert api.one("SELECT count(*) FROM fleet.power_measurements") == 0
    assert api.one("SELECT count(*) FROM fleet.ingest_events") == 0


def test_403_for_a_disabled_customer_and_audited(api: IngestClient) -> None:
    with psycopg.connect(api.url, autocommit=True) as conn:
        customers.set_status(conn, "DEV0001", "disabled")
    answer = api.post("measurements", [m(NOW)])
    assert answer.status == 403
    assert api.state().status == 403
    assert audit_rows(api) == [(403, "measurements", 0, 0, 0, "customer is disabled")]
    assert api.one("SELECT count(*) FROM fleet.power_measurements") == 0


def test_400_for_an_unknown_batch_type_is_audited(api: IngestClient) -> None:
    answer = api.post("readings", [m(NOW)])
    assert answer.status == 400
    assert "X-Batch-Type" in answer.body["message"]
    assert audit_rows(api)[0][:2] == (400, "readings")
    assert api.post(None, [m(NOW)]).status == 400


def test_413_body_one_byte_over_the_limit(api: IngestClient) -> None:
    base = json.dumps({"items": [m(NOW)]})
    at_limit = base + " " * (200_000 - len(base))
    assert api.post("measurements", body=at_limit).status == 200
    answer = api.post("measurements", body=at_limit + " ")
    assert answer.status == 413
    assert audit_rows(api)[-1][0] == 413


def test_413_too_many_items(api: IngestClient) -> None:
    items = [m(NOW + timedelta(seconds=i)) for i in range(501)]
    answer = api.post("measurements", items, gzip_body=True)
    assert answer.status == 413
    assert "limit is 500" in answer.body["message"]
    assert api.one("SELECT count(*) FROM fleet.power_measurements") == 0
    assert api.post("measurements", items[:500], gzip_body=True).body["accepted"] == 500


def test_415_for_unknown_content_type_or_encoding(api: IngestClient) -> None:
    assert api.post("measurements", [m(NOW)], headers={"content-type": "text/csv"}).status == 415
    assert api.post("measurements", [m(NOW)], headers={"content-encoding": "br"}).status == 415
    assert (
        api.post("measurements", [m(NOW)], headers={"content-type": "application/json; charset=latin-1"}).status == 415
    )
    assert [r[0] for r in audit_rows(api)] == [415, 415, 415]
    ok = api.post("measurements", [m(NOW)], headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status == 200


def test_429_with_retry_after_when_the_database_sheds_load(api: IngestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATEMENT_TIMEOUT_MS", "300")
    _reset_caches()
    locker = psycopg.connect(api.url)
    try:
        # Another transaction holds the customer's row: the batch cannot finish in time.
        locker.execute("SELECT * FROM fleet.customers WHERE id = 'DEV0001' FOR NO KEY UPDATE")
        answer = api.post("measurements", [m(NOW)])
    finally:
        locker.rollback()
        locker.close()
    assert answer.status == 429
    assert int(answer.headers["retry-after"]) > 0
    assert api.one("SELECT count(*) FROM fleet.power_measurements") == 0
    assert audit_rows(api)[-1][0] == 429
    assert api.post("measurements", [m(NOW)]).body["accepted"] == 1


def test_503_with_retry_after_when_the_database_is_unreachable(
    api: IngestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("DATABASE_URL", f"postgresql://fleet:hunter2@127.0.0.1:{port}/fleet")
    _reset_caches()
    answer = api.post("measurements", [m(NOW)])
    assert answer.status == 503
    assert int(answer.headers["retry-after"]) > 0
    assert "hunter2" not in json.dumps(answer.body)


def test_connection_dropped_between_invocations_is_replaced(api: IngestClient) -> None:
    assert api.post("measurements", [m(NOW)]).status == 200
    pid = api.one(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'fleet-pipeline' AND datname = current_database()"
    )
    api.sql("SELECT pg_terminate_backend(%s)", pid)
    assert api.post("measurements", [m(NOW + timedelta(minutes=1))]).status == 200
    assert api.one("SELECT count(*) FROM fleet.power_measurements") == 2


# --- bad input: clear status, audit row, nothing valid lost ------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ('{"items": [', "not valid JSON"),
        ("[1, 2, 3]", "JSON object"),
        ('{"rows": []}', '"items"'),
        ('{"items": {"a": 1}}', "must be a list"),
        ('{"items": [], "extra": 1}', "unknown top-level keys"),
    ],
    ids=["malformed-json", "not-an-object", "items-missing", "items-not-a-list", "extra-keys"],
)
def test_envelope_errors_are_400_audited_and_quarantined(api: IngestClient, body: str, reason: str) -> None:
    answer = api.post("measurements", body=body)
    assert answer.status == 400
    assert reason in answer.body["message"]
    assert audit_rows(api)[-1][0] == 400
    assert api.one("SELECT count(*) FROM fleet.quarantine WHERE item_index IS NULL") == 1
    assert api.one("SELECT payload FROM fleet.quarantine") == body


def _post_by(path: str, api: IngestClient, monkeypatch: pytest.MonkeyPatch, items: list[str]) -> Answer:
    """Measurements (each as its JSON text) in a body parsed whole, or item by item
    from its bytes (as a body too large to parse whole is)."""
    body = '{"items": [' + ", ".join(items) + "]}"
    if path == "item-by-item":
        from fleet.ingest import parse, spans

        per_item = 12  # over what any item here holds, under what the body holds
        assert spans.json_values(body.encode()) > per_item
        monkeypatch.setattr(parse, "WHOLE_BODY_VALUES", per_item)
    return api.post("measurements", body=body)


def _rejected(api: IngestClient, bad: list[dict[str, Any]], good_count: int = 3) -> Answer:
    good = [m(NOW + timedelta(seconds=i), device="good") for i in range(good_count)]
    items: list[Any] = [good[0], *bad, *good[1:]]
    answer = api.post("measurements", items)
    assert answer.status == 200
    assert answer.body["accepted"] == good_count
    assert answer.body["rejected"] == len(bad)
    assert [e["index"] for e in answer.body["errors"]] == list(range(1, 1 + len(bad)))
    assert api.one("SELECT count(*) FROM fleet.power_measurements WHERE device_id = 'good'") == good_count
    assert api.one("SELECT count(*) FROM fleet.quarantine") == len(bad)
    assert audit_rows(api)[-1][:5] == (200, "measurements", good_count, 0, len(bad))
    return answer


def test_wrong_types_are_rejected_one_by_one(api: IngestClient) -> None:
    answer = _rejected(
        api,
        [
            m(NOW, power="12.5"),
            m(NOW, device=42),
            {"time": NOW.isoformat()},
            "not an object",
            m(NOW, power=True),
            m(1700000000),
        ],
    )
    reasons = [e["reason"] for e in answer.body["errors"]]
    assert reasons[0].startswith("power_w")
    assert reasons[1].startswith("device_id")
    assert "device_id" in reasons[2]
    assert "RFC 3339" in reasons[5]


def test_nan_and_infinity_are_rejected(api: IngestClient) -> None:
    good = json.dumps(m(NOW, device="good"))
    body = f'{{"items": [{good}, {{"time": "{NOW.isoformat()}", "device_id": "x", "power_w": NaN}},'
    body += f' {{"time": "{NOW.isoformat()}", "device_id": "x", "voltage_v": Infinity}}, {{"time": "{NOW.isoformat()}", "device_id": "x", "current_a": -Infinity}}]}}'
    answer = api.post("measurements", body=body)
    assert answer.status == 200
    assert answer.body["accepted"] == 1
    assert answer.body["rejected"] == 3
    assert all("finite" in e["reason"] for e in answer.body["errors"])
    assert "NaN" in api.one("SELECT payload FROM fleet.quarantine WHERE item_index = 1")


def test_time_without_offset_is_rejected(api: IngestClient) -> None:
    answer = _rejected(api, [m("2026-11-27T10:00:00"), m("2026-11-27")])
    assert all("offset" in e["reason"] for e in answer.body["errors"])


@pytest.mark.calendar
def test_time_far_in_the_future_is_rejected(api: IngestClient) -> None:
    answer = _rejected(api, [m(datetime.now(UTC) + timedelta(days=3)), m("9999-12-31T00:00:00Z")])
    assert all("future" in e["reason"] for e in answer.body["errors"])


def test_ids_over_64_characters_are_rejected(api: IngestClient) -> None:
    answer = _rejected(api, [m(NOW, device="d" * 65), m(NOW, device="")])
    assert "64" in answer.body["errors"][0]["reason"]


@pytest.mark.parametrize("path", ["whole", "item-by-item"])
def test_an_id_made_only_of_whitespace_is_rejected_and_others_kept_as_sent(
    api: IngestClient, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    blank = [" ", "\t", "   \n ", "\u00a0", "\u3000\u2003"]
    kept = [" meter-1", "meter-1 ", " \u00a0x\t"]
    items = [m(NOW, device=d) for d in [*blank, *kept]]
    answer = _post_by(path, api, monkeypatch, [json.dumps(i) for i in items])
    assert answer.status == 200, answer.body
    assert (answer.body["accepted"], answer.body["rejected"]) == (len(kept), len(blank))
    assert [e["index"] for e in answer.body["errors"]] == list(range(len(blank)))
    assert all(e["reason"].startswith("device_id: must not be only whitespace") for e in answer.body["errors"])
    stored = {r[0] for r in api.sql("SELECT device_id FROM fleet.power_measurements")}
    assert stored == set(kept)  # never trimmed: ids are the client's own


def test_a_site_or_device_id_made_only_of_whitespace_is_rejected(api: IngestClient) -> None:
    sites = api.post("sites", [{"id": " ", "name": "Blank"}, {"id": " s1 ", "name": "Plant"}])
    assert (sites.body["accepted"], sites.body["rejected"]) == (1, 1)
    assert sites.body["errors"][0]["reason"].startswith("id: must not be only whitespace")
    devices = api.post("devices", [{"id": "d1", "site_id": "\t", "name": "Meter"}])
    assert devices.body["errors"][0]["reason"].startswith("site_id: must not be only whitespace")
    assert api.sql("SELECT id FROM fleet.sites") == [(" s1 ",)]
    assert api.one("SELECT count(*) FROM fleet.devices") == 0


def test_a_nul_in_an_id_is_rejected_with_a_reason(api: IngestClient) -> None:
    answer = _rejected(api, [m(NOW, device="a\x00b")])
    assert "NUL" in answer.body["errors"][0]["reason"]


def test_text_postgresql_cannot_store_is_rejected_not_fatal(api: IngestClient) -> None:
    body = '{{"items": [{}, {{"time": "{}", "device_id": "a\\u0000b"}}, {{"time": "{}", "device_id": "\\ud800"}}, {}, {}]}}'.format(
        json.dumps(m(NOW, device="good")),
        NOW.isoformat(),
        NOW.isoformat(),
        json.dumps(m(NOW + timedelta(seconds=1), device="good")),
        json.dumps(m(NOW + timedelta(seconds=2), device="good")),
    )
    answer = api.post("measurements", body=body)
    assert answer.status == 200
    assert answer.body["accepted"] == 3
    assert answer.body["rejected"] == 2


@pytest.mark.parametrize("path", ["whole", "item-by-item"])
def test_a_lone_surrogate_in_an_ignored_field_does_not_reject_the_item(
    api: IngestClient, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    # json accepts a lone surrogate escape, pydantic-core's parser does not: an unknown
    # field holding one (as a value, a key, deep inside) is ignored as any other.
    t = NOW.isoformat()
    items = [
        json.dumps(m(NOW, device="good")),
        f'{{"time": "{t}", "device_id": "a", "note": "\\ud800"}}',
        f'{{"time": "{t}", "device_id": "b", "\\udc00key": 1}}',
        f'{{"time": "{t}", "device_id": "c", "extra": {{"x": ["\\udbff", {{"\\ud800": 2}}]}}}}',
        f'{{"time": "{t}", "device_id": "d", "pair": "\\ud83d\\ude00"}}',
    ]
    answer = _post_by(path, api, monkeypatch, items)
    assert answer.status == 200, answer.body
    assert answer.body == {"accepted": 5, "duplicates": 0, "rejected": 0, "errors": []}
    assert [r[0] for r in api.sql("SELECT device_id FROM fleet.power_measurements ORDER BY 1")] == [
        "a",
        "b",
        "c",
        "d",
        "good",
    ]


@pytest.mark.parametrize("path", ["whole", "item-by-item"])
def test_a_lone_surrogate_in_a_known_field_is_rejected_with_a_reason(
    api: IngestClient, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    t = NOW.isoformat()
    items = [
        json.dumps(m(NOW, device="good")),
        f'{{"time": "{t}", "device_id": "meter-\\ud800", "note": "\\udc00"}}',
        '{"time": "not a time", "device_id": "\\udfff"}',
        json.dumps(m(NOW + timedelta(seconds=1), device="good")),
    ]
    answer = _post_by(path, api, monkeypatch, items)
    assert answer.status == 200, answer.body
    assert (answer.body["accepted"], answer.body["rejected"]) == (2, 2)
    errors = answer.body["errors"]
    assert [e["index"] for e in errors] == [1, 2]
    for error in errors:
        assert error["reason"].startswith("device_id: holds a lone UTF-16 surrogate")
        assert "PostgreSQL" in error["reason"]
        assert "hex escape" not in error["reason"]
    assert "time:" in errors[1]["reason"]  # what else is wrong is said too
    # The item kept as sent: its JSON gives the surrogate back.
    assert (
        json.loads(api.one("SELECT payload FROM fleet.quarantine WHERE item_index = 1"))["device_id"] == "meter-\ud800"
    )


def test_a_site_or_device_with_a_lone_surrogate_only_in_an_ignored_field_lands(api: IngestClient) -> None:
    sites = '{"items": [{"id": "s1", "name": "Plant", "legacy": "\\ud800"}]}'
    assert api.post("sites", body=sites).body["accepted"] == 1
    devices = '{"items": [{"id": "d1", "site_id": "s1", "name": "\\ud800"}]}'
    answer = api.post("devices", body=devices)
    assert (answer.body["accepted"], answer.body["rejected"]) == (0, 1)
    assert answer.body["errors"][0]["reason"].startswith("name: holds a lone UTF-16 surrogate")


@pytest.mark.parametrize(
    ("batch_type", "good", "bad", "field"),
    [
        ("measurements", m(NOW, device="good"), m(NOW, device="a\x00b"), "device_id"),
        ("sites", {"id": "s1", "name": "Plant"}, {"id": "s2", "name": "Pl\x00ant"}, "name"),
        (
            "devices",
            {"id": "d1", "site_id": "s1", "name": "M"},
            {"id": "d2", "site_id": "s1", "name": "M", "model": "\x00"},
            "model",
        ),
    ],
)
def test_a_nul_as_the_only_fault_of_a_batch_rejects_its_item(
    api: IngestClient, batch_type: str, good: dict[str, Any], bad: dict[str, Any], field: str
) -> None:
    # The whole-batch validation leaves NUL to the item-by-item one (a body whose only
    # fault is an escaped NUL must still take that path).
    answer = api.post(batch_type, [good, bad])
    assert answer.status == 200
    assert (answer.body["accepted"], answer.body["rejected"]) == (1, 1)
    assert answer.body["errors"][0]["index"] == 1
    assert answer.body["errors"][0]["reason"].startswith(f"{field}:")
    assert api.one("SELECT count(*) FROM fleet.quarantine") == 1


def test_an_empty_batch_is_answered_and_audited(api: IngestClient) -> None:
    answer = api.post("measurements", [])
    assert answer.status == 200
    assert answer.body == {"accepted": 0, "duplicates": 0, "rejected": 0, "errors": []}
    assert audit_rows(api) == [(200, "measurements", 0, 0, 0, None)]


def test_gzip_bomb_is_refused_with_413(api: IngestClient) -> None:
    bomb = gzip.compress(b"{" + b" " * 50_000_000 + b"}")
    assert len(bomb) < 200_000
    answer = api.post("measurements", body=bomb, headers={"content-encoding": "gzip"})
    assert answer.status == 413
    assert "decompressed" in answer.body["message"]
    assert audit_rows(api)[-1][0] == 413


def test_truncated_gzip_is_400(api: IngestClient) -> None:
    whole = gzip.compress(json.dumps({"items": [m(NOW)]}).encode())
    answer = api.post("measurements", body=whole[: len(whole) // 2], headers={"content-encoding": "gzip"})
    assert answer.status == 400
    assert "truncated" in answer.body["message"]
    assert api.post("measurements", body=b"not gzip at all", headers={"content-encoding": "gzip"}).status == 400
    assert [r[0] for r in audit_rows(api)] == [400, 400]


def _gzip_bodies() -> dict[str, bytes]:
    whole = gzip.compress(json.dumps({"items": [m(NOW)]}).encode())
    bad_crc = bytearray(whole)
    bad_crc[-8] ^= 0xFF  # the CRC-32 of the trailer
    bad_length = bytearray(whole)
    bad_length[-1] ^= 0xFF  # the length of the trailer
    bad_block = bytearray(whole)
    bad_block[10] = 0xFF  # a reserved block type
    return {
        "not-gzip": b"not gzip at all",
        "short-not-gzip": b"{}",
        "json-not-gzip": json.dumps({"items": [m(NOW)]}).encode(),
        "empty": b"",
        "cut-short": whole[: len(whole) // 2],
        "header-only": whole[:10],
        "bad-crc": bytes(bad_crc),
        "bad-length": bytes(bad_length),
        "bad-block": bytes(bad_block),
        "trailing-garbage": whole + b"garbage",
        "second-member-cut-short": whole + whole[:20],
    }


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not-gzip", "body is not valid gzip"),
        ("short-not-gzip", "body is not valid gzip"),
        ("json-not-gzip", "body is not valid gzip"),
        ("empty", "body is not valid gzip"),
        ("cut-short", "gzip body is truncated"),
        ("header-only", "gzip body is truncated"),
        ("bad-crc", "gzip body is corrupt"),
        ("bad-length", "gzip body is corrupt"),
        ("bad-block", "gzip body is corrupt"),
        ("trailing-garbage", "unexpected data after the gzip stream"),
        ("second-member-cut-short", "gzip body is truncated"),
    ],
)
def test_each_broken_gzip_body_is_400_saying_what_is_wrong(api: IngestClient, case: str, message: str) -> None:
    answer = api.post("measurements", body=_gzip_bodies()[case], headers={"content-encoding": "gzip"})
    assert answer.status == 400
    assert answer.body["message"].startswith(message), answer.body["message"]
    assert audit_rows(api)[-1][0] == 400
    assert api.one("SELECT count(*) FROM fleet.power_measurements") == 0


def test_a_gzip_body_of_several_members_is_read_whole(api: IngestClient) -> None:
    # RFC 1952: a gzip file is a series of members; gunzip joins their contents.
    body = json.dumps({"items": [m(NOW + timedelta(seconds=i)) for i in range(4)]}).encode()
    members = b"".join(gzip.compress(body[i : i + 40]) for i in range(0, len(body), 40))
    answer = api.post("measurements", body=members + b"\x00" * 8, headers={"content-encoding": "gzip"})
    assert answer.status == 200, answer.body
    assert answer.body["accepted"] == 4
    # Thousands of empty members (20 bytes each) before them: read one by one as well.
    empty = gzip.compress(b"") * 9_000
    again = api.post("measurements", body=empty + members, headers={"content-encoding": "gzip"})
    assert again.body["duplicates"] == 4
    assert api.sql("SELECT decompressed_bytes FROM fleet.ingest_events ORDER BY id") == [(len(body),)] * 2


def test_the_decompressed_cap_holds_across_gzip_members(api: IngestClient) -> None:
    # Each member well under the cap (1,000,000 bytes here), all of them over it.
    member = gzip.compress(b" " * 300_000)
    body = gzip.compress(b'{"items": []}') + member * 4
    answer = api.post("measurements", body=body, headers={"content-encoding": "gzip"})
    assert answer.status == 413
    assert "decompressed" in answer.body["message"]


def test_token_with_a_bad_checksum_is_refused_without_a_lookup(api: IngestClient) -> None:
    token = api.token
    last = token[-1]
    forged = token[:-1] + ("A" if last != "A" else "B")
    before = api.one("SELECT idx_scan + seq_scan FROM pg_stat_user_tables WHERE relname = 'customer_tokens'")
    answer = api.post("measurements", [m(NOW)], token=forged)
    assert answer.status == 401
    after = api.one("SELECT idx_scan + seq_scan FROM pg_stat_user_tables WHERE relname = 'customer_tokens'")
    assert before == after


def test_token_in_the_query_string_is_not_accepted(api: IngestClient) -> None:
    event = http_event(
        "ingest/measurements.json",
        drop_headers=("x-customer-token",),
        query=f"token={api.token}&X-Customer-Token={api.token}",
    )
    answer = api.call(event)
    assert answer.status == 401
    assert api.one("SELECT count(*) FROM fleet.power_measurements") == 0


def test_bad_batch_id_and_overlong_cursor_are_400(api: IngestClient) -> None:
    assert api.post("measurements", [m(NOW)], batch_id="not-a-uuid").status == 400
    assert api.post("measurements", [m(NOW)], cursor="c" * 1025).status == 400
    assert api.one("SELECT count(*) FROM fleet.power_measurements") == 0


# --- re-delivery and concurrency ----------------------------------------------------


@pytest.mark.calendar
def test_replayed_batch_is_counted_as_duplicates(api: IngestClient) -> None:
    items = [m(NOW + timedelta(seconds=i)) for i in range(20)]
    first = api.post("measurements", items)
    again = api.post("measurements", items)
    assert first.body["accepted"] == 20
    assert again.body == {"accepted": 0, "duplicates": 20, "rejected": 0, "errors": []}
    assert api.one("SELECT count(*) FROM fleet.power_measurements") == 20


def test_a_row_repeated_inside_one_batch_counts_once(api: IngestClient) -> None:
    row = m(NOW)
    same_instant = m((NOW + timedelta(hours=2)).astimezone(UTC).isoformat().replace("+00:00", "+02:00"))
    same_instant["time"] = (NOW.replace(tzinfo=None) + timedelta(hours=2)).isoformat() + "+02:00"
    answer = api.post("measurements", [row, row, same_instant])
    assert answer.body["accepted"] == 1
    assert answer.body["duplicates"] == 2
    assert api.one("SELECT count(*) FROM fleet.power_measurements") == 1


@pytest.mark.parametrize("path", ["whole", "item-by-item"])
def test_times_are_kept_to_the_microsecond_and_a_reading_below_it_is_a_duplicate(
    api: IngestClient, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    # PostgreSQL keeps microseconds: the digits below are dropped (never rounded, so a
    # time never moves into the next second, day or year), and two readings of one
    # meter that differ only there are one key: the second is a duplicate.
    day = NOW.strftime("%Y-%m-%d")
    items = [
        m(f"{day}T10:00:00.123456789Z"),
        m(f"{day}T10:00:00.123456001Z", power=200.0),
        m(f"{day}T10:00:00.1234569Z", power=300.0),
        m(f"{day}T23:59:59.9999999Z", power=400.0),
    ]
    answer = _post_by(path, api, monkeypatch, [json.dumps(i) for i in items])
    assert answer.status == 200, answer.body
    assert answer.body == {"accepted": 2, "duplicates": 2, "rejected": 0, "errors": []}
    rows = api.sql("SELECT time, power_w FROM fleet.power_measurements ORDER BY time")
    start = datetime.fromisoformat(f"{day}T00:00:00+00:00")
    assert [(t.astimezone(UTC), p) for t, p in rows] == [
        (start + timedelta(hours=10, microseconds=123456), 100.0),  # the first one sent is kept
        (start + timedelta(hours=23, minutes=59, seconds=59, microseconds=999999), 400.0),
    ]
    again = api.post("measurements", [m(f"{day}T10:00:00.123456999Z")])
    assert again.body["duplicates"] == 1


def test_two_identical_batches_at_once_store_every_row_once(api: IngestClient) -> None:
    items = [m(NOW - timedelta(seconds=i), device=f"dev-{i % 7}") for i in range(400)]
    answers: list[Answer] = []
    barrier = threading.Barrier(2)

    def send() -> None:
        barrier.wait()
        answers.append(api.post("measurements", items))

    # Each thread needs its own connection: give each a service of its own.
    threads = [threading.Thread(target=send) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(a.status for a in answers) == [200, 200]
    assert sum(a.body["accepted"] for a in answers) == 400
    assert sum(a.body["duplicates"] for a in answers) == 400
    assert api.one("SELECT count(*) FROM fleet.power_measurements") == 400


# --- tenant isolation -----------------------------------------------------------------


def test_customer_b_cannot_touch_customer_a_rows(api: IngestClient) -> None:
    token_b = new_customer(api, "CUSTB")
    api.post("sites", [{"id": "s1", "name": "A's plant"}])
    api.post("devices", [{"id": "d1", "site_id": "s1", "name": "A's meter"}])
    api.post("measurements", [m(NOW, device="d1", power=111.0)], cursor="a-cursor")
    # Same ids from B, and a body that names A.
    api.post("sites", [{"id": "s1", "name": "B's plant", "customer_id": "DEV0001"}], token=token_b)
    api.post("devices", [{"id": "d1", "site_id": "s1", "name": "B's meter"}], token=token_b)
    b = api.post(
        "measurements",
        [m(NOW, device="d1", power=999.0, customer_id="DEV0001")],
        token=token_b,
        cursor="b-cursor",
    )
    assert b.body["accepted"] == 1
    assert api.sql("SELECT customer_id, name FROM fleet.sites ORDER BY 1") == [
        ("CUSTB", "B's plant"),
        ("DEV0001", "A's plant"),
    ]
    assert api.sql("SELECT customer_id, power_w FROM fleet.power_measurements ORDER BY 1") == [
        ("CUSTB", 999.0),
        ("DEV0001", 111.0),
    ]
    assert api.state(token=token_b).body["ledger"]["measurements"]["cursor"] == "b-cursor"
    assert api.state().body["ledger"]["measurements"]["cursor"] == "a-cursor"


# --- tokens ---------------------------------------------------------------------------


@pytest.mark.calendar
def test_rotation_keeps_old_and_new_until_the_old_expires(api: IngestClient) -> None:
    old = api.token
    with psycopg.connect(api.url, autocommit=True) as conn:
        new = customers.rotate_token(conn, "DEV0001").token
    assert api.post("measurements", [m(NOW)], token=old).status == 200
    assert api.post("measurements", [m(NOW + timedelta(minutes=1))], token=new).status == 200
    expires = api.one(
        "SELECT expires_at - now() FROM fleet.customer_tokens WHERE customer_id = 'DEV0001' AND expires_at IS NOT NULL"
    )
    assert timedelta(days=6, hours=23) < expires <= timedelta(days=7)
    api.sql("UPDATE fleet.customer_tokens SET expires_at = now() WHERE expires_at IS NOT NULL RETURNING 1")
    assert api.post("measurements", [m(NOW + timedelta(minutes=2))], token=old).status == 401
    assert api.post("measurements", [m(NOW + timedelta(minutes=3))], token=new).status == 200


def test_revoked_token_fails_at_once(api: IngestClient) -> None:
    assert api.post("measurements", [m(NOW)]).status == 200
    with psycopg.connect(api.url, autocommit=True) as conn:
        assert customers.revoke_tokens(conn, "DEV0001") == 1
    assert api.post("measurements", [m(NOW + timedelta(minutes=1))]).status == 401


def test_last_used_at_is_kept(api: IngestClient) -> None:
    api.post("measurements", [m(NOW)])
    assert api.one("SELECT last_used_at IS NOT NULL FROM fleet.customer_tokens") is True


# --- the hourly view ------------------------------------------------------------------


def _hourly(api: IngestClient, device: str) -> list[tuple[Any, ...]]:
    rows = api.sql(
        "SELECT bucket, sample_count, avg_power_w, min_power_w, max_power_w, energy_wh"
        " FROM fleet.hourly_per_device WHERE device_id = %s ORDER BY bucket",
        device,
    )
    # Buckets in UTC, whatever the session's zone (see test_measurements_land_and_are_audited).
    return [(r[0].astimezone(UTC), *r[1:]) for r in rows]


def _refresh(api: IngestClient) -> None:
    from fleet.schema.bootstrap import maintain

    maintain(api.url)


@pytest.mark.calendar
def test_hourly_view_is_exact_for_rows_of_any_age(api: IngestClient) -> None:
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    starts = [hour - timedelta(days=730), hour - timedelta(days=31), hour - timedelta(hours=1), hour]
    items = []
    for start in starts:
        items += [
            m(start + timedelta(minutes=10), power=100.0, energy_wh=1000.0),
            m(start + timedelta(minutes=20), power=200.0, energy_wh=1100.0),
            m(start + timedelta(minutes=40), power=600.0, energy_wh=1300.0),
        ]
    tomorrow = m(hour + timedelta(hours=20), power=50.0)
    assert api.post("measurements", [*items, tomorrow]).body["accepted"] == 13
    # A second batch into the same hours adds to them, and a replay adds nothing.
    more = [m(start + timedelta(minutes=50), power=300.0, energy_wh=1400.0) for start in starts]
    api.post("measurements", more)
    api.post("measurements", more)
    _refresh(api)
    rows = _hourly(api, "meter-1")
    by_bucket = {r[0]: r[1:] for r in rows}
    # energy_wh by the definition (tests/hourly_reference.py): the hours between these
    # readings, years apart, get their share of the register's rise too.
    want = hourly([(datetime.fromisoformat(i["time"]), i["energy_wh"]) for i in [*items, tomorrow, *more]])
    for start in starts:
        assert by_bucket[start][:4] == (4, pytest.approx(300.0), 100.0, 600.0)
        assert by_bucket[start][4] == pytest.approx(want[start].energy_wh, abs=0.1)
    assert by_bucket[hour + timedelta(hours=20)][0] == 1


@pytest.mark.calendar
def test_a_batch_part_replayed_adds_only_its_new_rows_to_the_hourly_view(api: IngestClient) -> None:
    # The duplicates abort the first attempt; the second (ON CONFLICT DO NOTHING)
    # must count only the row it inserted.
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    first = [m(hour + timedelta(minutes=10), power=100.0, energy_wh=1000.0)]
    first.append(m(hour + timedelta(minutes=20), power=200.0, energy_wh=1100.0))
    assert api.post("measurements", first).body["accepted"] == 2
    answer = api.post("measurements", [*first, m(hour + timedelta(minutes=30), power=600.0, energy_wh=1300.0)])
    assert (answer.body["accepted"], answer.body["duplicates"]) == (1, 2)
    _refresh(api)
    assert _hourly(api, "meter-1") == [(hour, 3, pytest.approx(300.0), 100.0, 600.0, pytest.approx(300.0))]


@pytest.mark.calendar
def test_back_dated_batch_over_30_days_shows_up_in_the_hourly_view(api: IngestClient) -> None:
    old = datetime(2026, 4, 1, 10, 0, tzinfo=UTC)
    api.post("measurements", [m(old + timedelta(minutes=i), power=float(i)) for i in range(60)])
    _refresh(api)
    rows = _hourly(api, "meter-1")
    assert [(r[0], r[1]) for r in rows] == [(old, 60)]
    assert rows[0][2] == pytest.approx(29.5)


@pytest.mark.calendar
def test_back_filled_rows_into_compressed_chunks_insert_and_deduplicate(api_timescale: IngestClient) -> None:
    api = api_timescale
    old = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=60)
    first = [m(old + timedelta(minutes=i), power=float(i)) for i in range(0, 60, 2)]
    assert api.post("measurements", first).body["accepted"] == 30
    compressed = api.sql(
        "SELECT count(compress_chunk(c, if_not_compressed => true))"
        " FROM show_chunks('fleet.power_measurements', older_than => now() - interval '30 days') c"
    )
    assert compressed[0][0] >= 1
    # Re-delivery of compressed rows, mixed with new rows in the same chunk.
    mixed = [m(old + timedelta(minutes=i), power=float(i)) for i in range(60)]
    answer = api.post("measurements", mixed)
    assert answer.body == {"accepted": 30, "duplicates": 30, "rejected": 0, "errors": []}
    assert api.one("SELECT count(*) FROM fleet.power_measurements") == 60
    assert api.one("SELECT sum(power_w) FROM fleet.power_measurements") == sum(range(60))
