"""The ingest endpoint fuzzed: from openapi.yaml with schemathesis, and with
hypothesis-generated bodies and headers. Never a 500, never an answer outside the
contract, and every accepted row reads back exactly as sent. The edge classes (floats
near the double range, times at the ends of the datetime range with every offset, NUL
and lone surrogates in every string and header, nesting, sizes at each limit) always
get a final answer (never 429/503) and an audit row.

CI runs FUZZ_EXAMPLES=60 cases per test (the default); the deep run before a release
sets it to thousands (tests/reliability/README.md)."""

from __future__ import annotations

import gzip
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
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

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


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
        # Any id the contract takes: 1..64 characters, not only whitespace (ClientId).
        "device_id": st.text(st.characters(min_codepoint=1, max_codepoint=0xD7FF), min_size=1, max_size=64).filter(
            lambda s: not s.isspace()
        ),
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


# --- the edge classes: a final answer and an audit row, whatever the request holds ----

_EDGE_LIMITS = {"MAX_BODY_BYTES": 60_000, "MAX_DECOMPRESSED_BYTES": 120_000, "MAX_ITEMS": 40}
_edge_char = st.one_of(
    st.characters(),
    st.sampled_from(["\x00", "\ud800", "\udbff", "\udc00", "\udfff", '"', "\\", "[", "{", "]", "}"]),
)
_edge_text = st.lists(_edge_char, max_size=12).map("".join)
_edge_float = st.one_of(
    st.floats(min_value=1e300, max_value=1.7976931348623157e308),
    st.floats(min_value=-1.7976931348623157e308, max_value=-1e300),
    st.sampled_from(
        [1.7976931348623157e308, -1.7976931348623157e308, 5e-324, -5e-324, 0.0, -0.0, 2.2250738585072014e-308]
    ),
    st.floats(allow_nan=False, allow_infinity=False),
)
_offset = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))
_edge_time = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(1, 1, 3), timezones=_offset),
    st.datetimes(min_value=datetime(9999, 12, 29), max_value=datetime(9999, 12, 31, 23, 59, 59), timezones=_offset),
    st.datetimes(timezones=_offset),
).map(lambda d: d.isoformat())
_edge_id = st.one_of(
    _edge_text, st.sampled_from(["a" * 64, "a" * 65, ""]), st.text(min_size=60, max_size=70, alphabet="xyz")
)


def _nested(depth: int) -> str:
    return f"__nested_{depth}__"  # a placeholder, written as that many nested arrays


_NESTED = re.compile(r'"__nested_(\d+)__"')


def _with_odd_key(item: dict[str, Any], key: str | None) -> dict[str, Any]:
    # An ignored field with an odd name (NUL, surrogates, quotes, brackets).
    return item if key is None or key in item else {**item, key: 1}


_edge_item = st.builds(
    _with_odd_key,
    st.fixed_dictionaries(
        {"time": _edge_time, "device_id": _edge_id},
        optional={
            "power_w": _edge_float,
            "energy_wh": _edge_float,
            "voltage_v": _edge_float,
            "extra": st.one_of(_edge_text, st.integers(min_value=0, max_value=3_000).map(_nested)),
        },
    ),
    st.one_of(st.none(), _edge_text),
)


def _mostly(normal: st.SearchStrategy[Any], edge: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The normal value seven times in eight: most requests then reach the items
    (``one_of`` would draw each distinct branch equally often)."""
    return st.sampled_from(range(8)).flatmap(lambda i: edge if i == 7 else normal)


_edge_headers = st.fixed_dictionaries(
    {"x-batch-type": _mostly(st.sampled_from(["measurements", "measurements", "sites", "devices"]), _edge_text)},
    optional={
        "x-push-cursor": st.one_of(_edge_text, _mostly(st.just(1024), st.integers(1020, 1030)).map(lambda n: "c" * n)),
        "x-batch-id": _mostly(st.uuids().map(str), _edge_text),
        "content-type": _mostly(st.just("application/json"), _edge_text),
        "content-encoding": _mostly(st.just("identity"), _edge_text),
    },
)
EDGE_OUTCOMES: Counter[str] = Counter()


def _edge_body(items: list[dict[str, Any]], extra_key: str | None, pad: int) -> str:
    doc: dict[str, Any] = {"items": items}
    if extra_key is not None:
        doc[extra_key] = 1
    text = json.dumps(doc)  # ensure_ascii: NUL and surrogates travel as escapes
    text = _NESTED.sub(lambda m: "[" * int(m[1]) + "]" * int(m[1]), text)
    return text + " " * pad  # whitespace up to (or over) the size limits


@pytest.fixture
def edge_target(admin_db_postgres: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    for name, value in _EDGE_LIMITS.items():
        monkeypatch.setenv(name, str(value))
    token = new_token(admin_db_postgres, "EDGE")
    with admin_api(admin_db_postgres, monkeypatch):
        yield token, admin_db_postgres


@given(
    items=st.lists(_edge_item, max_size=_EDGE_LIMITS["MAX_ITEMS"] + 2),
    headers=_edge_headers,
    extra_key=_mostly(st.none(), _edge_text),
    pad=st.one_of(
        st.just(0),
        st.integers(_EDGE_LIMITS["MAX_BODY_BYTES"] - 2_000, _EDGE_LIMITS["MAX_BODY_BYTES"] + 10),
        st.integers(_EDGE_LIMITS["MAX_DECOMPRESSED_BYTES"] - 2_000, _EDGE_LIMITS["MAX_DECOMPRESSED_BYTES"] + 10),
    ),
    gzip_it=st.booleans(),
)
@FUZZ
def test_edge_requests_get_a_final_answer_and_an_audit_row(
    edge_target: tuple[str, str],
    items: list[dict[str, Any]],
    headers: dict[str, str],
    extra_key: str | None,
    pad: int,
    gzip_it: bool,
) -> None:
    token, url = edge_target
    raw = _edge_body(items, extra_key, pad).encode()
    if gzip_it:
        raw = gzip.compress(raw)
        headers = {**headers, "content-encoding": "gzip"}
    with psycopg.connect(url) as conn:
        before = conn.execute("SELECT count(*) FROM fleet.ingest_events").fetchone()
    event = http_event("ingest/measurements.json", headers={**headers, "x-customer-token": token}, body=raw)
    status, doc, out_headers = _call(event)
    EDGE_OUTCOMES[str(status)] += 1
    assert status in (200, 400, 413, 415), (status, doc)
    check_response("POST", "/api/fleet/ingest", status, out_headers, doc)
    with psycopg.connect(url) as conn:
        after = conn.execute("SELECT count(*), max(id) FROM fleet.ingest_events").fetchone()
        assert before is not None and after is not None
        assert after[0] == before[0] + 1, "every request of a known customer leaves one audit row"
        event_row = conn.execute(
            "SELECT status, accepted, duplicates, rejected FROM fleet.ingest_events WHERE id = %s", (after[1],)
        ).fetchone()
        kept = conn.execute("SELECT count(*) FROM fleet.quarantine WHERE ingest_event_id = %s", (after[1],)).fetchone()
    assert event_row is not None and event_row[0] == status
    if status == 200:
        EDGE_OUTCOMES["rows rejected"] += doc["rejected"]
        assert doc["accepted"] + doc["duplicates"] + doc["rejected"] == len(items), doc
        assert kept is not None and kept[0] == doc["rejected"]
        assert tuple(event_row[1:]) == (doc["accepted"], doc["duplicates"], doc["rejected"])


def test_edge_outcomes_are_reported() -> None:
    # Runs after the edge test in file order: the counts the README quotes.
    print(f"\nedge requests by answer: {dict(sorted(EDGE_OUTCOMES.items()))}")
