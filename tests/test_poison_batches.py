"""No poison batch: every body gets a final answer (200 with the bad items rejected and
quarantined, or 400 for the envelope), audited, and never a 429/503 for something the
body holds. Through the real handler, against a real PostgreSQL Admin database."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from fleet_local.template import Template
from hypothesis import given, settings
from hypothesis import strategies as st
from support import ROOT, http_event
from test_ingest import NOW, Answer, IngestClient, _client, m

FUNCTION_MEMORY_MB = Template(ROOT / "template.yaml").all_functions()["IngestFunction"].memory_mb


@pytest.fixture
def api(admin_db_postgres: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[IngestClient]:
    yield from _client(admin_db_postgres, monkeypatch)


def audit(api: IngestClient) -> list[tuple[Any, ...]]:
    return api.sql(
        "SELECT status, batch_type, client_cursor, accepted, rejected, error FROM fleet.ingest_events ORDER BY id"
    )


def quarantined(api: IngestClient) -> list[tuple[Any, ...]]:
    return api.sql("SELECT item_index, reason, payload FROM fleet.quarantine ORDER BY id")


def post_raw(api: IngestClient, body: str | bytes, headers: dict[str, str]) -> Answer:
    hdrs = {"x-customer-token": api.token, "x-batch-id": str(uuid.uuid4()), **headers}
    return api.call(http_event("ingest/measurements.json", headers=hdrs, body=body))


def peak_of_one_invocation(db_url: str, gzipped: bytes) -> dict[str, Any]:
    """bench/memory.py's measurement: the handler in a fresh process, its VmHWM."""
    with tempfile.NamedTemporaryFile(suffix=".gz", delete=False) as fh:
        fh.write(gzipped)
    script = (
        "import json, sys; from bench.memory import peak_of_one_invocation as peak;"
        " print(json.dumps(peak(sys.argv[1], open(sys.argv[2], 'rb').read())))"
    )
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "layers/fleet")])}
        proc = subprocess.run(
            [sys.executable, "-c", script, db_url, fh.name], capture_output=True, text=True, env=env, check=False
        )
    finally:
        os.unlink(fh.name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return doc


def ddl(api: IngestClient, statements: str) -> None:
    with psycopg.connect(api.url, autocommit=True) as conn:
        conn.execute(statements)


def good(n: int, device: str = "good") -> list[dict[str, Any]]:
    return [m(NOW + timedelta(seconds=i), device=device) for i in range(n)]


# --- the nine failures of the black-box probe, one by one ---------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("filler", "device"),
    [(b"[[]],", "meter-1"), (b"{},", "m" * 65)],
    ids=["1-empty-arrays-in-an-ignored-field", "2-empty-objects-in-an-item-with-a-bad-id"],
)
def test_16_mb_of_empty_values_stays_within_the_function_memory(
    admin_db_postgres: str, filler: bytes, device: str
) -> None:
    # 16 MB (inside every default limit) of tiny values: the first in an ignored field
    # of a valid item, the second inside an item whose id is one character too long.
    junk = filler * ((16_000_000 - 200) // len(filler))
    body = (
        b'{"items": [{"time": "2026-01-01T00:00:00Z", "device_id": "' + device.encode() + b'", "extra": ['
        b"" + junk.rstrip(b",") + b"]}]}"
    )
    assert len(body) <= 16_000_000
    outcome = peak_of_one_invocation(admin_db_postgres, gzip.compress(body))
    assert outcome["status"] == 200, outcome
    assert outcome["body"]["accepted"] + outcome["body"]["rejected"] == 1
    assert outcome["peak_kb"] / 1024 < FUNCTION_MEMORY_MB, outcome


def test_3_two_huge_finite_powers_in_one_device_hour_do_not_stall_the_batch(api: IngestClient) -> None:
    hour = NOW.replace(minute=0)
    items = [
        *good(3),
        m(hour, device="huge", power=1.7e308),
        m(hour + timedelta(minutes=1), device="huge", power=1.7e308),
    ]
    answer = api.post("measurements", items)
    assert answer.status == 200, answer.body
    assert answer.body["accepted"] + answer.body["rejected"] == 5
    assert api.one("SELECT count(*) FROM fleet.power_measurements WHERE device_id = 'good'") == 3
    # Whatever the store could not take is rejected by index and kept in the quarantine.
    assert len(quarantined(api)) == answer.body["rejected"]
    assert {e["index"] for e in answer.body["errors"]} <= {3, 4}
    assert audit(api)[-1][0] == 200


@pytest.mark.parametrize("key", ["\ud800", "\u0000"], ids=["4-lone-surrogate", "5-nul"])
def test_4_5_an_unstorable_top_level_key_is_400_and_audited(api: IngestClient, key: str) -> None:
    body = json.dumps({"items": good(1), key: 1})  # ensure_ascii: the key travels as an escape
    answer = post_raw(api, body, {"x-batch-type": "measurements", "x-push-cursor": "c"})
    assert answer.status == 400
    assert "unknown top-level keys" in answer.body["message"]
    rows = audit(api)
    assert [r[0] for r in rows] == [400]
    # The refused body is kept as sent, recoverable: the escape stays an escape.
    ((index, reason, payload),) = quarantined(api)
    assert index is None and "unknown keys" in reason
    assert json.loads(payload) == {"items": good(1), key: 1}


@pytest.mark.parametrize(
    "time",
    ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"],
    ids=["6-before-year-1-in-utc", "7-after-year-9999-in-utc"],
)
def test_6_7_times_that_overflow_in_utc_are_rejected_with_a_reason(api: IngestClient, time: str) -> None:
    answer = api.post("measurements", [*good(2), m(time, device="clock-unset")])
    assert answer.status == 200, answer.body
    assert (answer.body["accepted"], answer.body["rejected"]) == (2, 1)
    assert answer.body["errors"][0]["index"] == 2
    assert "time" in answer.body["errors"][0]["reason"]
    ((index, _, payload),) = quarantined(api)
    assert index == 2 and time in payload
    assert audit(api)[-1][:5] == (200, "measurements", "c-1", 2, 1)


def test_8_a_nul_in_the_batch_type_is_400_and_audited_recoverably(api: IngestClient) -> None:
    answer = post_raw(api, json.dumps({"items": good(1)}), {"x-batch-type": "measure\x00ments"})
    assert answer.status == 400
    ((status, batch_type, *_),) = audit(api)
    assert status == 400
    assert json.loads(batch_type) == "measure\x00ments"


def test_9_a_nul_in_the_cursor_is_a_final_answer_and_audited_recoverably(api: IngestClient) -> None:
    answer = post_raw(
        api, json.dumps({"items": good(2)}), {"x-batch-type": "measurements", "x-push-cursor": "cur\x00sor"}
    )
    assert answer.status == 200, answer.body
    assert answer.body["accepted"] == 2
    ((status, _, cursor, *_),) = audit(api)
    assert status == 200
    assert json.loads(cursor) == "cur\x00sor"
    # The ledger gives the client back exactly the cursor it sent.
    assert api.state().body["ledger"]["measurements"]["cursor"] == "cur\x00sor"


# --- a batch the store refuses: found item by item, the rest lands -----------------


@pytest.fixture
def poison_trigger(api: IngestClient) -> None:
    """The store fails on a measurement with power_w = 666 (a data exception), and
    with power_w = 429 as a busy database would (serialization failure)."""
    ddl(
        api,
        """
        CREATE FUNCTION fleet_test_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.power_w = 666 THEN
                RAISE EXCEPTION 'injected: % cannot be stored', NEW.power_w USING ERRCODE = '22003';
            ELSIF NEW.power_w = 429 THEN
                RAISE EXCEPTION 'injected: could not serialize' USING ERRCODE = '40001';
            END IF;
            -- a real data exception, on the time itself: before 1968 this leaves
            -- the range of timestamptz (4713 BC)
            PERFORM NEW.time - interval '6700 years';
            RETURN NEW;
        END $$;
        CREATE TRIGGER poison BEFORE INSERT ON fleet.power_measurements
            FOR EACH ROW EXECUTE FUNCTION fleet_test_poison();
        """,
    )


def test_items_the_store_refuses_are_found_rejected_and_quarantined(api: IngestClient, poison_trigger: None) -> None:
    items = good(10)
    items[3]["power_w"] = 666
    items[8]["power_w"] = 666
    items[6]["time"] = "1900-01-01T00:00:00Z"
    answer = api.post("measurements", items, cursor="after-poison")
    assert answer.status == 200, answer.body
    assert (answer.body["accepted"], answer.body["duplicates"], answer.body["rejected"]) == (7, 0, 3)
    assert [e["index"] for e in answer.body["errors"]] == [3, 6, 8]
    assert "[22003]" in answer.body["errors"][0]["reason"] and "666" in answer.body["errors"][0]["reason"]
    assert "[22008]" in answer.body["errors"][1]["reason"]  # timestamp out of range
    assert api.one("SELECT count(*) FROM fleet.power_measurements") == 7
    stored = quarantined(api)
    assert [(q[0], json.loads(q[2])) for q in stored] == [(3, items[3]), (6, items[6]), (8, items[8])]
    assert audit(api) == [(200, "measurements", "after-poison", 7, 3, None)]
    # Re-delivered: the same final answer, nothing doubled.
    again = api.post("measurements", items)
    assert (again.body["accepted"], again.body["duplicates"], again.body["rejected"]) == (0, 7, 3)


def test_a_store_refusal_mixed_with_invalid_items_keeps_every_index(api: IngestClient, poison_trigger: None) -> None:
    items: list[Any] = good(4)
    items[2]["power_w"] = 666
    items.insert(1, m(NOW, device="x" * 65))  # invalid: rejected before the store
    answer = api.post("measurements", items)
    assert answer.status == 200
    assert [e["index"] for e in answer.body["errors"]] == [1, 3]
    assert answer.body["accepted"] == 3


def test_a_busy_database_in_the_middle_of_a_batch_is_429_and_nothing_is_rejected(
    api: IngestClient, poison_trigger: None
) -> None:
    items = good(6)
    items[1]["power_w"] = 666
    items[4]["power_w"] = 429
    answer = api.post("measurements", items)
    assert answer.status == 429
    assert int(answer.headers["retry-after"]) > 0
    assert api.one("SELECT count(*) FROM fleet.power_measurements") == 0
    assert quarantined(api) == []
    assert [r[0] for r in audit(api)] == [429]


def test_sites_the_store_refuses_are_rejected_and_the_rest_upserted(api: IngestClient) -> None:
    # A real constraint of PostgreSQL's, added for the test.
    ddl(api, "ALTER TABLE fleet.sites ADD CONSTRAINT no_poison CHECK (name <> 'poison')")
    sites = [{"id": "s1", "name": "Plant"}, {"id": "s2", "name": "poison"}, {"id": "s3", "name": "Depot"}]
    answer = api.post("sites", sites)
    assert answer.status == 200
    assert (answer.body["accepted"], answer.body["rejected"]) == (2, 1)
    assert answer.body["errors"][0]["index"] == 1 and "[23514]" in answer.body["errors"][0]["reason"]
    assert api.sql("SELECT id FROM fleet.sites ORDER BY id") == [("s1",), ("s3",)]


def test_a_python_error_while_storing_an_item_rejects_that_item(
    api: IngestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleet.ingest import store as ingest_store

    real = ingest_store.TextArray.of

    def refusing(values: Any) -> Any:
        if "boom" in values:
            raise UnicodeEncodeError("utf-8", "boom", 0, 1, "injected")
        return real(values)

    monkeypatch.setattr(ingest_store.TextArray, "of", refusing)
    answer = api.post("measurements", [*good(3), m(NOW, device="boom")])
    assert answer.status == 200
    assert (answer.body["accepted"], answer.body["rejected"]) == (3, 1)
    assert "UnicodeEncodeError" in answer.body["errors"][0]["reason"]


def test_an_unexpected_error_while_reading_a_body_is_a_final_audited_400(
    api: IngestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleet.ingest.parse import BodyParser

    def broken(*_: Any) -> Any:
        raise ZeroDivisionError("injected")

    monkeypatch.setattr(BodyParser, "_finish", broken)
    answer = api.post("measurements", good(2))
    assert answer.status == 400
    assert "retry" not in answer.body["message"]
    assert [r[0] for r in audit(api)] == [400]
    ((index, reason, payload),) = quarantined(api)
    assert index is None and "ZeroDivisionError" in reason
    assert json.loads(payload) == {"items": good(2)}


# --- what the parser may build: bounded, the rest of the batch lands --------------


def test_an_item_nested_deeper_than_any_parser_goes_is_rejected_alone(api: IngestClient) -> None:
    deep = f'{{"time": "{NOW.isoformat()}", "device_id": "deep", "x": {"[" * 5000 + "]" * 5000}}}'
    body = f'{{"items": [{json.dumps(good(1)[0])}, {deep}, {json.dumps(good(2)[1])}]}}'
    answer = api.post("measurements", body=body)
    assert answer.status == 200, answer.body
    assert (answer.body["accepted"], answer.body["rejected"]) == (2, 1)
    assert answer.body["errors"][0]["index"] == 1
    assert "recursion" in answer.body["errors"][0]["reason"]
    assert quarantined(api)[0][2].startswith('{"time"')


def test_an_item_over_the_value_bound_is_rejected_unparsed(api: IngestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet.ingest import parse

    monkeypatch.setattr(parse, "WHOLE_BODY_VALUES", 1_000)
    big = {"time": NOW.isoformat(), "device_id": "big", "x": [0] * 2_000}
    items = [*good(2), big, *good(3, device="after")]
    answer = api.post("measurements", items)
    assert answer.status == 200, answer.body
    assert (answer.body["accepted"], answer.body["rejected"]) == (5, 1)
    assert answer.body["errors"] == [{"index": 2, "reason": "item: holds more than 1000 JSON values"}]
    assert json.loads(quarantined(api)[0][2]) == big


def test_the_item_limit_holds_when_items_are_split_from_the_bytes(
    api: IngestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleet.ingest import parse

    monkeypatch.setattr(parse, "WHOLE_BODY_VALUES", 10)
    assert api.post("measurements", good(501)).status == 413
    assert api.post("measurements", good(500)).body["accepted"] == 500


@pytest.mark.parametrize(
    "body",
    ['{"items": [1, ]}', '{"items": {}}', '{"rows": []}', '{"items": [], "": 1}', '{"items": [{"a": 1 2}]}', "[]"],
)
def test_the_split_envelope_is_judged_as_the_whole_one(
    api: IngestClient, monkeypatch: pytest.MonkeyPatch, body: str
) -> None:
    from fleet.ingest import parse

    whole = post_raw(api, body, {"x-batch-type": "measurements"})
    monkeypatch.setattr(parse, "WHOLE_BODY_VALUES", 3)  # every body here is over it
    split = post_raw(api, body, {"x-batch-type": "measurements"})
    assert whole.status == split.status == 400
    assert [r[0] for r in audit(api)] == [400, 400]


# --- every header, whatever it holds, leaves an audit row ----------------------------


@pytest.mark.parametrize("header", ["x-batch-type", "x-batch-id", "x-push-cursor", "content-type", "content-encoding"])
@pytest.mark.parametrize("bad", ["a\x00b", "a\ud800b", "x" * 20_000], ids=["nul", "lone-surrogate", "over-long"])
def test_any_header_value_gets_a_final_answer_and_an_audit_row(api: IngestClient, header: str, bad: str) -> None:
    headers = {"x-batch-type": "measurements", header: bad}
    answer = post_raw(api, json.dumps({"items": good(1)}), headers)
    assert answer.status in (200, 400, 415), answer.body
    rows = audit(api)
    assert len(rows) == 1 and rows[0][0] == answer.status
    if header == "x-push-cursor" and len(bad) < 1024:
        assert answer.status == 200
        assert json.loads(rows[0][2]) == bad


# --- the one table: busy or down by SQLSTATE, everything else final ------------------


@pytest.mark.parametrize(
    ("sqlstate", "status"),
    [
        ("08006", 503),  # connection failure
        ("57P01", 503),  # admin shutdown
        ("57P03", 503),  # cannot connect now
        ("53300", 429),  # too many connections
        ("53200", 429),  # out of memory
        ("40001", 429),  # serialization failure
        ("40P01", 429),  # deadlock
        ("55P03", 429),  # lock not available (lock timeout)
        ("22003", 400),  # numeric value out of range: the data's
        ("22021", 400),  # character not in repertoire: the data's
        ("23514", 400),  # check violation: the data's
        ("54000", 400),  # program limit exceeded: psycopg calls it OperationalError
        ("57014", 400),  # cancelled by hand, not by a timeout
    ],
)
def test_database_errors_are_answered_by_their_sqlstate(admin_db_postgres: str, sqlstate: str, status: int) -> None:
    from fleet.ingest.http import refusal_for

    with psycopg.connect(admin_db_postgres) as conn, pytest.raises(psycopg.Error) as raised:
        conn.execute(f"DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '{sqlstate}'; END $$")
    assert raised.value.sqlstate == sqlstate
    assert refusal_for(raised.value).status == status


def test_a_statement_timeout_is_busy(admin_db_postgres: str) -> None:
    from fleet.ingest.http import refusal_for

    with psycopg.connect(admin_db_postgres) as conn:
        conn.execute("SET statement_timeout = '50ms'")
        with pytest.raises(psycopg.errors.QueryCanceled) as raised:
            conn.execute("SELECT pg_sleep(2)")
    answer = refusal_for(raised.value)
    assert (answer.status, answer.retry_after) == (429, 2)


def test_a_batch_with_too_many_refused_items_is_413_and_smaller_batches_land(
    api: IngestClient, poison_trigger: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleet.ingest import store as ingest_store

    monkeypatch.setattr(ingest_store, "MAX_PART_ATTEMPTS", 40)
    items = good(64)
    for i in range(0, 64, 3):
        items[i]["power_w"] = 666
    answer = api.post("measurements", items)
    assert answer.status == 413, answer.body
    assert api.one("SELECT count(*) FROM fleet.power_measurements") == 0
    assert [r[0] for r in audit(api)] == [413]
    # What the push does on a 413: halve and send again, until each half is cheap to search.
    landed = rejected = 0
    for start in range(0, 64, 8):
        part = api.post("measurements", items[start : start + 8])
        assert part.status == 200, part.body
        landed, rejected = landed + part.body["accepted"], rejected + part.body["rejected"]
    assert (landed, rejected) == (42, 22)


def test_a_body_over_the_bound_that_is_not_utf8_is_400(api: IngestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet.ingest import parse

    monkeypatch.setattr(parse, "WHOLE_BODY_VALUES", 3)
    body = json.dumps({"items": good(2)}).encode()[:-3] + b'"\xff"]}'
    answer = post_raw(api, body, {"x-batch-type": "measurements"})
    assert answer.status == 400 and "UTF-8" in answer.body["message"]
    assert [r[0] for r in audit(api)] == [400]


# --- the item splitter agrees with a full parse ---------------------------------------

_json_text = st.text(st.sampled_from(['"', "\\", "[", "]", "{", "}", ",", ":", " ", "a", "\x00", "\ud800", "é"]))
_json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _json_text),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_json_text, inner, max_size=4),
    max_leaves=30,
)


@given(
    items=st.lists(_json_value, max_size=8),
    others=st.dictionaries(_json_text.filter(lambda k: k != "items"), _json_value, max_size=2),
    indent=st.sampled_from([None, 0, 2]),
    first=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_items_split_from_the_bytes_are_the_items_json_reads(
    items: list[Any], others: dict[str, Any], indent: int | None, first: bool
) -> None:
    from fleet.errors import InvalidRequest
    from fleet.ingest.spans import item_spans

    doc = {"items": items, **others} if first else {**others, "items": items}
    body = json.dumps(doc, indent=indent).encode()
    if others:
        with pytest.raises(InvalidRequest, match="unknown top-level keys"):
            item_spans(body, 100)
        return
    spans = item_spans(body, 100)
    assert [json.loads(body[a:b]) for a, b in spans] == items
