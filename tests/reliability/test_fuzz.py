"""The ingest endpoint fuzzed: from openapi.yaml with schemathesis, and with
hypothesis-generated bodies and headers. Never a 500, never an answer outside the
contract, and every accepted row reads back exactly as sent."""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import ingest
import psycopg
import pytest
import schemathesis
from contract import check_response
from harness import admin_api, new_token, reset_caches
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance
from support import ROOT, FakeLambdaContext, http_event

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture
def fuzz_target(admin_db_postgres: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str, str]]:
    token = new_token(admin_db_postgres, "FUZZ")
    with admin_api(admin_db_postgres, monkeypatch) as api:
        yield api.url, token, admin_db_postgres


# schemathesis generates requests from openapi.yaml, operation by operation (its
# pytest plugin does not run under pytest 9, so its strategies are used directly).
_SCHEMA = schemathesis.openapi.from_path(ROOT / "openapi.yaml")
_OPERATIONS = {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in _SCHEMA.get_all_operations())}


@pytest.mark.parametrize("operation", sorted(_OPERATIONS))
def test_openapi_fuzz_never_breaks_the_contract(operation: str, fuzz_target: tuple[str, str, str]) -> None:
    base_url, token, _ = fuzz_target
    tried: list[int] = []

    @given(case=_OPERATIONS[operation].as_strategy())
    @FUZZ
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, headers={"X-Customer-Token": token})
        tried.append(response.status_code)
        assert response.status_code < 500 or response.status_code == 503, response.text
        assert "internal error" not in response.text
        # Excluded: a schema-valid request can still be refused by design, e.g.
        # "Content-Encoding: gzip" on a body that is not gzip (400) or an item the
        # contract rejects one by one; the contract's own check follows.
        case.validate_response(response, excluded_checks=[positive_data_acceptance])
        check_response(case.method, case.path, response.status_code, dict(response.headers), response.json())

    run()
    assert len(tried) >= 10


# --- hypothesis: arbitrary bodies and headers, through the handler ------------------

_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=80)
_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), _text)
_json = st.recursive(
    _json_scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4), max_leaves=20
)
_item = st.fixed_dictionaries(
    {},
    optional={
        "time": st.one_of(_text, st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()), st.integers()),
        "device_id": st.one_of(_text, st.integers(), st.none()),
        "power_w": _json_scalar,
        "id": _text,
        "name": _text,
        "site_id": _text,
    },
)
_body = st.one_of(
    st.binary(max_size=300),
    _json.map(lambda v: json.dumps(v, allow_nan=True)),
    st.lists(_item, max_size=8).map(lambda items: json.dumps({"items": items}, allow_nan=True)),
)
_headers = st.fixed_dictionaries(
    {},
    optional={
        "x-batch-type": st.one_of(st.sampled_from(["sites", "devices", "measurements"]), _text),
        "x-batch-id": st.one_of(st.uuids().map(str), _text),
        "x-push-cursor": st.text(max_size=1500),
        "content-type": st.sampled_from(["application/json", "text/plain", "application/json; charset=utf-8", ""]),
        "content-encoding": st.sampled_from(["gzip", "identity", "br", ""]),
    },
)


def _call(event: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    result = ingest.handler(event, FakeLambdaContext())
    body = json.loads(result["body"])
    headers = {k.lower(): v for k, v in result.get("headers", {}).items()}
    return result["statusCode"], body, headers


@given(body=_body, headers=_headers, gzip_it=st.booleans())
@FUZZ
def test_hypothesis_bodies_and_headers_never_break_the_contract(
    fuzz_target: tuple[str, str, str], body: Any, headers: dict[str, str], gzip_it: bool
) -> None:
    _, token, _ = fuzz_target
    raw = body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")
    if gzip_it:
        raw = gzip.compress(raw)
        headers = {**headers, "content-encoding": "gzip"}
    event = http_event("ingest/measurements.json", headers={**headers, "x-customer-token": token}, body=raw)
    status, doc, out_headers = _call(event)
    assert status in (200, 400, 413, 415), (status, doc)
    check_response("POST", "/api/fleet/ingest", status, out_headers, doc)


_finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
_measurement = st.fixed_dictionaries(
    {
        "time": st.datetimes(
            min_value=datetime(1990, 1, 1), max_value=datetime(2026, 11, 1), timezones=st.just(UTC)
        ).map(lambda d: d.isoformat()),
        "device_id": st.text(st.characters(min_codepoint=1, max_codepoint=0xD7FF), min_size=1, max_size=64),
    },
    optional={name: st.one_of(st.none(), _finite) for name in ("power_w", "voltage_v", "energy_wh", "frequency_hz")},
)


@given(items=st.lists(_measurement, min_size=1, max_size=20, unique_by=lambda m: (m["time"], m["device_id"])))
@FUZZ
def test_every_accepted_row_reads_back_exactly_as_sent(
    fuzz_target: tuple[str, str, str], items: list[dict[str, Any]]
) -> None:
    _, token, url = fuzz_target
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM fleet.power_measurements WHERE customer_id = 'FUZZ'")
    event = http_event(
        "ingest/measurements.json",
        headers={"x-customer-token": token, "x-batch-type": "measurements"},
        body=json.dumps({"items": items}),
    )
    status, doc, _ = _call(event)
    assert status == 200, doc
    assert doc["accepted"] == len(items), doc
    with psycopg.connect(url) as conn:
        stored = {
            (r[0], r[1]): r[2:]
            for r in conn.execute(
                "SELECT time, device_id, power_w, voltage_v, energy_wh, frequency_hz FROM fleet.power_measurements"
                " WHERE customer_id = 'FUZZ'"
            )
        }
    for item in items:
        key = (datetime.fromisoformat(item["time"]), item["device_id"])
        assert key in stored, item
        values = stored[key]
        for name, value in zip(("power_w", "voltage_v", "energy_wh", "frequency_hz"), values, strict=True):
            sent = item.get(name)
            assert (sent is None and value is None) or (sent is not None and value == sent and not math.isnan(value)), (
                name,
                sent,
                value,
            )


def test_the_future_bound_is_part_of_the_contract() -> None:
    # Guard for the generator above: times it produces are never refused as future.
    assert datetime(2026, 11, 1, tzinfo=UTC) < datetime.now(UTC) + timedelta(days=1)
    reset_caches()
