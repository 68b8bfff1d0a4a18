"""The ingest sheds load per customer (429 with Retry-After) before the database
suffers, fairly: a backfill of many customers never starves another's live rows."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest
from fleet import customers, db
from fleet.errors import Overloaded
from fleet.ingest.admission import Admission
from test_ingest import IngestClient, _client


@pytest.fixture
def api(admin_db: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[IngestClient]:
    monkeypatch.setenv("INGEST_MAX_IN_FLIGHT_PER_CUSTOMER", "1")
    monkeypatch.setenv("INGEST_MAX_IN_FLIGHT", "4")
    yield from _client(admin_db, monkeypatch)


def _admission(url: str, per_customer: int, total: int, lease_ms: int = 30_000, fresh_ms: int = 10_000) -> Admission:
    return Admission(db.ConnectionHolder(lambda: url), per_customer, total, lease_ms, 1, fresh_ms)


def _customers(url: str, *names: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for name in names:
            customers.create(conn, name, name)


def test_a_customer_past_its_batches_in_flight_gets_429_and_the_others_do_not(admin_db: str) -> None:
    _customers(admin_db, "A", "B")
    admission = _admission(admin_db, per_customer=2, total=10)
    with admission.slot("A"), admission.slot("A"):
        with pytest.raises(Overloaded) as refused, admission.slot("A"):
            pass
        assert refused.value.retry_after == 1
        with admission.slot("B"):  # another customer is not held up by A
            pass
    with admission.slot("A"):  # tickets handed back
        pass


def test_the_total_keeps_room_for_customers_sending_live_data(admin_db: str) -> None:
    names = [f"C{i}" for i in range(6)]
    _customers(admin_db, *names)
    admission = _admission(admin_db, per_customer=2, total=4)  # a quarter kept: one more
    held = [admission.slot(n) for n in ("C0", "C0", "C1", "C1")]
    for slot in held:
        slot.__enter__()
    try:
        # C0 has batches in flight, and the server its total.
        with pytest.raises(Overloaded), admission.slot("C0"):
            pass
        # C2 was admitted nothing lately (live data): the room kept, which is one batch.
        with admission.slot("C2"), pytest.raises(Overloaded), admission.slot("C3"):
            pass
        # C4 has nothing in flight but was admitted a moment ago (a backfill between
        # two batches): no room kept for it.
        with admission.slot("C4"):
            pass
        with pytest.raises(Overloaded), admission.slot("C4"):
            pass
    finally:
        for slot in held:
            slot.__exit__(None, None, None)


def test_a_ticket_never_handed_back_ends_with_its_lease(admin_db: str) -> None:
    _customers(admin_db, "A")
    admission = _admission(admin_db, per_customer=1, total=10, lease_ms=300)
    abandoned = admission.slot("A")
    abandoned.__enter__()  # a crashed invocation never hands it back
    with pytest.raises(Overloaded), admission.slot("A"):
        pass
    time.sleep(0.4)
    with admission.slot("A"):
        pass
    del abandoned


def test_a_shed_batch_is_answered_429_with_retry_after_and_audited(api: IngestClient) -> None:
    held = _admission(api.url, per_customer=1, total=4).slot("DEV0001")
    held.__enter__()  # another invocation is writing this customer's batch
    try:
        answer = api.post("measurements", [{"time": "2026-06-01T00:00:00Z", "device_id": "m1", "power_w": 1.0}])
    finally:
        held.__exit__(None, None, None)
    assert answer.status == 429
    assert answer.headers["retry-after"] == "1"
    with psycopg.connect(api.url) as conn:
        assert conn.execute("SELECT count(*) FROM fleet.power_measurements").fetchone() == (0,)
        assert conn.execute("SELECT status FROM fleet.ingest_events").fetchall() == [(429,)]
    again = api.post("measurements", [{"time": "2026-06-01T00:00:00Z", "device_id": "m1", "power_w": 1.0}])
    assert (again.status, again.body["accepted"]) == (200, 1)


def test_the_ledger_answer_advertises_the_batches_in_flight_per_customer(api: IngestClient) -> None:
    assert api.state().body["limits"]["max_in_flight"] == 1
