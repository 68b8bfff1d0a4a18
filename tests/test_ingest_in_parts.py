"""A large batch of measurements is written while it is parsed, in parts: every answer,
row, hour, audit row and quarantined item is the one the same batch gets taken whole.

Each case posts the same body twice through the real handler, as two customers: in
parts (``PART_BYTES`` small, so a few items make a part) and whole (``PART_BYTES``
larger than any body), and compares everything the two leave behind."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import ingest
import psycopg
import pytest
from fleet.errors import Overloaded
from fleet.ingest import service as ingest_service
from fleet.ingest.codec import envelope_validator, envelopes, part_cuts
from fleet.ingest.service import IngestRequest
from fleet.ingest.store import IngestStore
from fleet.models import BatchType
from hourly_reference import hourly
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ingest import NOW, Answer, IngestClient, _client, m, new_customer

PART = 600  # bytes: five or six of these items a part
WHOLE = 10**9


@pytest.fixture
def api(admin_db: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[IngestClient]:
    yield from _client(admin_db, monkeypatch)


@pytest.fixture
def in_parts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the batches written in parts (each entry: the parts it had)."""
    taken: list[int] = []
    original = IngestStore.write_parts

    def counting(self: IngestStore, conn: psycopg.Connection, audit: Any, parts: Any, sha: bytes) -> Any:
        seen: list[int] = []

        def counted() -> Iterator[Any]:
            for part in parts:
                seen.append(len(part))
                yield part

        outcome = original(self, conn, audit, counted(), sha)
        taken.append(len(seen))
        return outcome

    monkeypatch.setattr(IngestStore, "write_parts", counting)
    return taken


def compact(items: list[Any]) -> str:
    """The body as the push writes it."""
    return json.dumps({"items": items}, separators=(",", ":"))


def readings(n: int, devices: int = 3, start: datetime = NOW - timedelta(hours=6)) -> list[dict[str, Any]]:
    """Register readings every 2 minutes, devices interleaved, as a portal's rows come."""
    return [
        m(start + timedelta(minutes=2 * (i // devices)), device=f"meter-{i % devices}", energy_wh=1000.0 + 7.5 * i)
        for i in range(n)
    ]


def left_behind(api: IngestClient, customer: str) -> dict[str, Any]:
    """What a batch leaves in the database for one customer."""
    return {
        "rows": api.sql(
            "SELECT time, device_id, power_w, energy_wh FROM fleet.power_measurements WHERE customer_id = %s"
            " ORDER BY device_id, time",
            customer,
        ),
        "hours": api.sql(
            "SELECT device_id, bucket, sample_count, round(energy_wh::numeric, 6) FROM fleet.hourly_per_device"
            " WHERE customer_id = %s ORDER BY device_id, bucket",
            customer,
        ),
        "audit": api.sql(
            "SELECT status, batch_type, accepted, duplicates, rejected, client_cursor, min_time, max_time, error"
            " FROM fleet.ingest_events WHERE customer_id = %s ORDER BY id",
            customer,
        ),
        "quarantine": api.sql(
            "SELECT item_index, reason, payload FROM fleet.quarantine WHERE customer_id = %s ORDER BY id", customer
        ),
    }


def both_ways(
    api: IngestClient, monkeypatch: pytest.MonkeyPatch, bodies: list[str]
) -> tuple[list[Answer], list[Answer], dict[str, Any], dict[str, Any]]:
    """The bodies posted in parts as DEV0001 and whole as WHOLE01; answers and rows of each."""
    whole_token = new_customer(api, "WHOLE01")
    monkeypatch.setattr(ingest_service, "PART_BYTES", PART)
    parted = [api.post("measurements", body=b, cursor="c-1") for b in bodies]
    monkeypatch.setattr(ingest_service, "PART_BYTES", WHOLE)
    whole = [api.post("measurements", body=b, cursor="c-1", token=whole_token) for b in bodies]
    return parted, whole, left_behind(api, "DEV0001"), left_behind(api, "WHOLE01")


def assert_same(
    api: IngestClient, monkeypatch: pytest.MonkeyPatch, bodies: list[str]
) -> tuple[list[Answer], dict[str, Any]]:
    parted, whole, in_parts_left, whole_left = both_ways(api, monkeypatch, bodies)
    assert [(a.status, a.body) for a in parted] == [(a.status, a.body) for a in whole]
    assert in_parts_left == whole_left
    return parted, in_parts_left


def assert_hours_are_the_reference(items: list[dict[str, Any]], left: dict[str, Any]) -> None:
    """Hours that span parts are whole: the register's rise, boundary to boundary."""
    for device in sorted({i["device_id"] for i in items}):
        mine = [(datetime.fromisoformat(i["time"]), i["energy_wh"]) for i in items if i["device_id"] == device]
        expected = {h: x.energy_wh for h, x in hourly(mine).items() if x.energy_wh is not None}
        got = {b: float(e) for d, b, _, e in left["hours"] if d == device and e is not None}
        assert got.keys() == expected.keys(), device
        assert all(abs(got[h] - expected[h]) < 1e-3 for h in got), device


def test_a_large_batch_in_parts_leaves_what_the_whole_does(
    api: IngestClient, monkeypatch: pytest.MonkeyPatch, in_parts: list[int]
) -> None:
    items = readings(300)
    answers, left = assert_same(api, monkeypatch, [compact(items)])
    assert answers[0].body == {"accepted": 300, "duplicates": 0, "rejected": 0, "errors": []}
    assert len(in_parts) == 1 and in_parts[0] >= 20, in_parts  # it was written in parts
    assert len(left["rows"]) == 300
    assert_hours_are_the_reference(items, left)


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda items: items[250].update(device_id="x" * 65), id="an-invalid-item-in-a-late-part"),
        pytest.param(lambda items: items[180].update(power_w="12"), id="a-number-as-a-string"),
        pytest.param(lambda items: items[200].update(time="9999-12-31T23:30:00-01:00"), id="a-time-past-9999-in-utc"),
        pytest.param(
            lambda items: items[299].update(time=(datetime.now(UTC) + timedelta(days=3)).isoformat()),
            id="a-time-in-the-future",
        ),
        pytest.param(lambda items: items.__setitem__(290, dict(items[10])), id="a-repeat-across-parts"),
        pytest.param(lambda items: items[120].update(device_id="a},{b"), id="the-cut-sequence-in-a-string"),
        pytest.param(lambda items: items[60].update(device_id="items"), id="items-as-a-value"),
        pytest.param(lambda items: items[70].update(device_id='q\\"},{"x'), id="escapes"),
        pytest.param(lambda items: items[40].update(extra={"nested": [{}, {}]}), id="nested-objects-ignored"),
    ],
)
def test_anything_but_valid_items_gets_the_answer_of_the_whole(
    api: IngestClient, monkeypatch: pytest.MonkeyPatch, spoil: Callable[[list[Any]], None]
) -> None:
    items = readings(300)
    spoil(items)
    answers, left = assert_same(api, monkeypatch, [compact(items)])
    assert answers[0].status == 200
    assert answers[0].body["accepted"] + answers[0].body["duplicates"] + answers[0].body["rejected"] == 300
    assert len(left["audit"]) == 1  # one audit row: the attempt in parts left nothing


def test_more_items_than_the_limit_over_all_parts_is_413(
    api: IngestClient, monkeypatch: pytest.MonkeyPatch, in_parts: list[int]
) -> None:
    answers, left = assert_same(api, monkeypatch, [compact(readings(501))])  # MAX_ITEMS is 500
    assert answers[0].status == 413
    assert left["rows"] == [] and in_parts == []


def test_rows_the_database_refuses_in_a_late_part_are_rejected_alone(
    api: IngestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    with psycopg.connect(api.url, autocommit=True) as conn:
        conn.execute(
            """
            CREATE FUNCTION fleet_test_poison() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.power_w = 666 THEN
                    RAISE EXCEPTION 'injected: % cannot be stored', NEW.power_w USING ERRCODE = '22003';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER poison BEFORE INSERT ON fleet.power_measurements
                FOR EACH ROW EXECUTE FUNCTION fleet_test_poison();
            """
        )
    items = readings(300)
    items[260]["power_w"] = 666
    answers, left = assert_same(api, monkeypatch, [compact(items)])
    assert (answers[0].status, answers[0].body["accepted"], answers[0].body["rejected"]) == (200, 299, 1)
    assert [e["index"] for e in answers[0].body["errors"]] == [260]
    assert [q[0] for q in left["quarantine"]] == [260]


def test_readings_in_any_order_over_parts_and_batches_give_the_same_hours(
    api: IngestClient, monkeypatch: pytest.MonkeyPatch, in_parts: list[int]
) -> None:
    items = readings(600)
    random.Random(5).shuffle(items)
    bodies = [compact(items[i : i + 200]) for i in range(0, 600, 200)]
    answers, left = assert_same(api, monkeypatch, bodies)
    assert [a.body["accepted"] for a in answers] == [200, 200, 200]
    assert len(in_parts) == 3
    assert_hours_are_the_reference(items, left)


def test_a_redelivered_batch_in_parts_is_all_duplicates(api: IngestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    body = compact(readings(300))
    answers, _ = assert_same(api, monkeypatch, [body, body])
    assert answers[1].body == {"accepted": 0, "duplicates": 300, "rejected": 0, "errors": []}


def test_concurrent_batches_in_parts_of_one_customer_all_land(
    api: IngestClient, monkeypatch: pytest.MonkeyPatch, in_parts: list[int]
) -> None:
    """Batches in flight at once (the push's read-ahead) sharing device-hours: each
    part takes its locks in the same order, so they wait for each other, never fail.
    Through the service (the HTTP resolver holds one request at a time, as a Lambda
    instance does)."""
    monkeypatch.setattr(ingest_service, "PART_BYTES", PART)
    items = readings(1200, devices=4)
    bodies = [compact(items[i : i + 300]).encode() for i in range(0, 1200, 300)]
    service = ingest.service()
    answers: dict[int, Any] = {}

    def post(k: int) -> None:
        headers = {"x-customer-token": api.token, "x-batch-type": "measurements", "content-type": "application/json"}
        for _ in range(200):
            try:
                answers[k] = service.ingest(IngestRequest(headers, bodies[k]))
                return
            except Overloaded:  # retried after a moment, as the push does
                time.sleep(0.02)

    threads = [threading.Thread(target=post, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [(answers[k].status, answers[k].body["accepted"]) for k in range(4)] == [(200, 300)] * 4
    assert len(in_parts) == 4
    assert api.one("SELECT count(*) FROM fleet.power_measurements") == 1200
    assert api.one("SELECT sum(sample_count) FROM fleet.hourly_per_device") == 1200
    assert_hours_are_the_reference(items, left_behind(api, "DEV0001"))


# --- the cuts themselves, without a database ----------------------------------------

_ENVELOPE = envelope_validator(BatchType.MEASUREMENTS, 10_000)

_TEXT = st.lists(
    st.sampled_from(['"', "\\", "}", "{", ",", "[", "]", ":", "a", '"items"', "items", " "]), max_size=8
).map("".join)
_ITEM = st.fixed_dictionaries(
    {"time": st.just("2026-04-01T10:00:00Z"), "device_id": _TEXT.filter(lambda s: 0 < len(s) <= 64)},
    optional={
        "power_w": st.floats(allow_nan=False, allow_infinity=False),
        "x": st.recursive(_TEXT, lambda inner: st.lists(inner) | st.dictionaries(_TEXT, inner)),
    },
)


@settings(max_examples=300, deadline=None)
@given(items=st.lists(_ITEM, min_size=2, max_size=30), part_bytes=st.integers(min_value=1, max_value=200))
def test_parts_that_all_validate_hold_exactly_the_items_of_the_whole(items: list[Any], part_bytes: int) -> None:
    body = compact(items).encode()
    cuts = part_cuts(body, part_bytes)
    if cuts is None:
        return
    parts = list(envelopes(body, cuts))
    inner = [p[len(b'{"items":[') :] for p in parts]
    assert b",".join([*(i[:-2] for i in inner[:-1]), inner[-1]]) == body[len(b'{"items":[') :]
    try:
        got = [item for part in parts for item in _ENVELOPE.validate_json(part)["items"]]
    except ValueError:
        return  # a part that does not validate sends the body the whole way
    assert got == _ENVELOPE.validate_json(body)["items"]


def test_the_push_form_is_cut_between_items() -> None:
    body = b'{"items":[{"a":1},{"a":2},{"a":3}]}'
    cuts = part_cuts(body, 8)
    assert cuts == [16, 24]
    assert list(envelopes(body, cuts)) == [b'{"items":[{"a":1}]}', b'{"items":[{"a":2}]}', b'{"items":[{"a":3}]}']


@pytest.mark.parametrize(
    "body",
    [
        b'{"items": [{"a":1},{"a":2},{"a":3}]}',  # not the push's form
        b'{"items":[{"a":1},{"a":2}],"items":[{"a":3}]}',  # a second "items" key
        b'{"items":[{"a":"\\u0069"},{"a":2},{"a":3}]}',  # an escape
        b'{"items":[{"a":1},{"a":2},{"a":3}]} ',  # not ending with ]}
        b'{"items":[{"a":1},{"a":"' + b"x" * 40 + b'"},{"a":3}]}',  # a part over twice the size
    ],
)
def test_bodies_not_in_the_push_form_are_never_cut(body: bytes) -> None:
    assert part_cuts(body, 8) is None
