"""The push function: response rules, the cursor invariant, leases and recovery.

DynamoDB and Secrets Manager come from moto; the Client database is real
PostgreSQL; the server is the real ingest handler served over local HTTP against
its own real PostgreSQL Admin database (or a scripted server for the rules).
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import gzip
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import ingest
import psycopg
import push
import pytest
from fleet import config
from fleet.observability import metrics
from fleet.push import service as push_service
from fleet.push import source as push_source
from fleet.push.report import Checkpoints
from fleet.push.responses import BACKOFF_CAP_S
from fleet.push.service import PushService
from fleet.push.state import LeaseLost, PushStateStore
from fleet.push.transport import IngestClient, parse_retry_after
from fleet_local.api import serving
from support import (
    INGEST_PATH,
    Clock,
    FakeLambdaContext,
    drain,
    ingest_routes,
    ingest_serving,
    load_event,
    make_push_service,
    one_at_a_time,
    reset_handler_caches,
)


@dataclass
class Admin:
    url: str
    server_url: str
    token: str

    def one(self, query: str, *params: Any) -> Any:
        with psycopg.connect(self.url) as conn:
            return conn.execute(query, params).fetchone()[0]  # type: ignore[index]

    def rows(self) -> set[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            return set(
                conn.execute(
                    "SELECT time, device_id, power_w FROM fleet.power_measurements WHERE customer_id = 'DEV0001'"
                )
            )


@pytest.fixture
def admin(admin_db_postgres: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Admin]:
    with ingest_serving(admin_db_postgres, monkeypatch) as (server_url, token):
        yield Admin(admin_db_postgres, server_url, token)


def client_rows(url: str) -> set[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return set(conn.execute("SELECT time, device_id, power_w FROM monitoring.power_measurements"))


def insert(url: str, count: int, start: datetime | None = None, device: str = "meter-1", offset: int = 0) -> None:
    start = start or datetime(2026, 11, 1, tzinfo=UTC)
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO monitoring.power_measurements (time, device_id, power_w, energy_wh)"
            " SELECT %s + make_interval(secs => g), %s, g, g * 10 FROM generate_series(%s::int, %s::int) g",
            (start, device, offset, offset + count - 1),
        )


# --- end to end against the real ingest --------------------------------------------


def test_push_copies_sites_devices_and_measurements(aws, admin: Admin, client_db: str) -> None:
    with psycopg.connect(client_db) as conn:
        conn.execute("INSERT INTO monitoring.sites (id, name) VALUES ('s1', 'Plant')")
        conn.execute("INSERT INTO monitoring.devices (id, site_id, name) VALUES ('meter-1', 's1', 'Main')")
    insert(client_db, 420)
    clock = Clock()
    service = make_push_service(client_db, aws, admin.server_url, admin.token, clock)
    report = service.tick()
    assert report.resources["sites"].outcome == "pushed"
    # No cap on batches by default: the whole backlog in one tick, 50 rows a batch.
    assert (report.resources["measurements"].rows, report.resources["measurements"].batches) == (420, 9)
    drain(service, clock)
    assert admin.rows() == client_rows(client_db)
    assert admin.one("SELECT count(*) FROM fleet.sites") == 1
    assert admin.one("SELECT count(*) FROM fleet.devices") == 1
    # Unchanged sites are not re-sent within the hour...
    assert service.tick().resources["sites"].outcome == "skipped"
    # ...but are at least once an hour.
    clock.advance(3601)
    assert service.tick().resources["sites"].outcome == "pushed"


def test_the_scheduled_handler_runs_a_tick_with_the_token_from_secrets_manager(
    aws, admin: Admin, client_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    arn = boto3.client("secretsmanager").create_secret(Name="ingest-token", SecretString=admin.token)["ARN"]
    insert(client_db, 30)
    ingest.service()  # the in-process Admin keeps its own database settings
    monkeypatch.setenv("DATABASE_URL", client_db)
    monkeypatch.setenv("INGEST_URL", admin.server_url)
    monkeypatch.setenv("INGEST_TOKEN_SECRET_ARN", arn)
    monkeypatch.setenv("PUSH_STATE_TABLE", "push-state")
    monkeypatch.delenv("INGEST_TOKEN", raising=False)
    config.cached.cache_clear()
    push.service.cache_clear()
    try:
        result = push.handler(load_event("push/scheduled.json"), FakeLambdaContext())
    finally:
        reset_handler_caches()
    assert result["measurements"]["rows"] == 30
    # The admin database is another one: the ingest handler reads its own env,
    # restored when the fixture's monkeypatch undoes DATABASE_URL.
    assert len(admin.rows()) == 30


# --- the cursor invariant ------------------------------------------------------------


def test_many_batches_in_one_transaction_all_arrive(aws, admin: Admin, client_db: str) -> None:
    insert(client_db, 1000)  # one transaction: one received_at, one xid for all
    with psycopg.connect(client_db) as conn:
        assert conn.execute("SELECT count(DISTINCT received_at) FROM monitoring.power_measurements").fetchone() == (1,)
    clock = Clock()
    service = make_push_service(client_db, aws, admin.server_url, admin.token, clock, batch_size=64)
    drain(service, clock)
    assert admin.rows() == client_rows(client_db)
    assert admin.one("SELECT sum(duplicates) FROM fleet.ingest_events") == 0


def test_a_transaction_open_across_a_push_is_not_skipped(aws, admin: Admin, client_db: str) -> None:
    clock = Clock()
    service = make_push_service(client_db, aws, admin.server_url, admin.token, clock, batch_size=25)
    # T1 began before the push and has written: its rows carry an old received_at.
    t1 = psycopg.connect(client_db)
    t1.execute(
        "INSERT INTO monitoring.power_measurements (time, device_id, power_w) VALUES ('2026-10-01T00:00:00Z', 'late', 1)"
    )
    # T0 began even earlier and writes only after the push: an old start time too.
    t0 = psycopg.connect(client_db)
    t0.execute("SELECT 1")
    insert(client_db, 60, device="meter-1")  # committed rows behind T1
    drain(service, clock)
    pushed_before = admin.rows()
    assert all(r[1] != "late" for r in pushed_before)
    t0.execute(
        "INSERT INTO monitoring.power_measurements (time, device_id, power_w) VALUES ('2026-09-01T00:00:00Z', 'early', 2)"
    )
    t0.commit()
    t1.commit()
    t0.close()
    t1.close()
    drain(service, clock)
    assert admin.rows() == client_rows(client_db)
    assert {r[1] for r in admin.rows()} == {"meter-1", "late", "early"}


def test_rows_inserted_while_the_push_reads_all_arrive(aws, admin: Admin, client_db: str) -> None:
    clock = Clock()
    service = make_push_service(client_db, aws, admin.server_url, admin.token, clock, batch_size=40, max_batches=2)
    stop = threading.Event()

    def writer() -> None:
        n = 0
        with psycopg.connect(client_db, autocommit=True) as conn:
            while not stop.is_set() and n < 3000:
                with conn.transaction():
                    for _ in range(7):
                        conn.execute(
                            "INSERT INTO monitoring.power_measurements (time, device_id, power_w)"
                            " VALUES (now() - make_interval(secs => %s), 'live', %s)",
                            (n, n),
                        )
                        n += 1
                time.sleep(0.002)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(25):
            service.tick()
            clock.advance(60)
    finally:
        stop.set()
        thread.join()
    drain(service, clock)
    assert admin.rows() == client_rows(client_db)


def test_failure_after_the_server_committed_resends_as_duplicates(aws, admin: Admin, client_db: str) -> None:
    class CrashAfter2xx(Checkpoints):
        armed = True

        def reached(self, name: str, resource: str) -> None:
            if name == "after_2xx" and resource == "measurements" and self.armed:
                self.armed = False
                raise RuntimeError("simulated crash before the cursor was saved")

    insert(client_db, 30)
    clock = Clock()
    service = make_push_service(
        client_db, aws, admin.server_url, admin.token, clock, batch_size=30, checkpoints=CrashAfter2xx()
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        service.tick()
    assert len(admin.rows()) == 30
    # The lease of the crashed invocation runs out; the next tick re-sends.
    clock.advance(200)
    drain(service, clock)
    assert admin.rows() == client_rows(client_db)
    assert admin.one("SELECT count(*) FROM fleet.power_measurements") == 30
    assert admin.one("SELECT sum(duplicates) FROM fleet.ingest_events WHERE batch_type = 'measurements'") == 30
    # The re-sent batch carried the same batch id as the first delivery.
    assert admin.one("SELECT count(DISTINCT batch_id) FROM fleet.ingest_events WHERE batch_type = 'measurements'") == 1


def test_state_item_deleted_mid_stream_resumes_from_the_ledger(aws, admin: Admin, client_db: str) -> None:
    insert(client_db, 300)
    clock = Clock()
    service = make_push_service(client_db, aws, admin.server_url, admin.token, clock, batch_size=50, max_batches=2)
    service.tick()
    assert len(admin.rows()) == 100
    aws.delete_item(Key={"resource": "measurements"})
    drain(service, clock)
    assert admin.rows() == client_rows(client_db)
    # Resumed after the acknowledged cursor: nothing was sent twice.
    assert admin.one("SELECT sum(duplicates) FROM fleet.ingest_events WHERE batch_type = 'measurements'") == 0


def test_legacy_rows_from_before_the_migration_are_pushed_first(aws, admin: Admin, client_db: str) -> None:
    with psycopg.connect(client_db) as conn:
        conn.execute(
            "INSERT INTO monitoring.power_measurements (time, device_id, power_w, push_xid)"
            " SELECT '2026-01-01T00:00:00Z'::timestamptz + make_interval(mins => g), 'old', g, NULL"
            " FROM generate_series(1, 120) g"
        )
    insert(client_db, 80)
    clock = Clock()
    service = make_push_service(client_db, aws, admin.server_url, admin.token, clock, batch_size=50)
    drain(service, clock)
    assert admin.rows() == client_rows(client_db)


def test_a_read_interrupted_mid_tick_sends_what_it_has_and_the_next_tick_goes_on(
    aws, admin: Admin, client_db: str
) -> None:
    """The Client session ends while a batch is sent (an idle-in-transaction timeout, a
    failover): the tick sends the rows it already has, says why it stopped, and does
    not fail; the next tick reads on from the cursor."""

    class EndClientSessions(Checkpoints):
        armed = True

        def reached(self, name: str, resource: str) -> None:
            if name == "after_send" and resource == "measurements" and self.armed:
                self.armed = False
                with psycopg.connect(client_db, autocommit=True) as conn:
                    conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )

    insert(client_db, 300)
    clock = Clock()
    service = make_push_service(
        client_db,
        aws,
        admin.server_url,
        admin.token,
        clock,
        batch_size=50,
        max_batches=3,
        checkpoints=EndClientSessions(),
    )
    report = service.tick().resources["measurements"]
    assert report.outcome == "pushed" and report.rows == 150
    assert "reading was interrupted" in (report.detail or "")
    drain(service, clock)
    assert admin.rows() == client_rows(client_db)
    assert admin.one("SELECT sum(duplicates) FROM fleet.ingest_events WHERE batch_type = 'measurements'") == 0


# --- response rules, from a scripted server -------------------------------------------


class Script:
    """Answers POSTs from a list of (status, headers, body); records each request."""

    def __init__(
        self,
        answers: list[tuple[int, dict[str, str], dict[str, Any]]],
        only: str | None = "measurements",
        ledger: dict[str, Any] | None = None,
    ):
        self.answers = answers
        self.only = only  # the batch type the scripted answers are for; others get 200
        self.requests: list[dict[str, Any]] = []
        self.ledger = ledger or {}
        self.limits: dict[str, Any] = {}

    def __call__(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        if event["requestContext"]["http"]["method"] == "GET":
            body = {
                "customer_id": "X",
                "ledger": {
                    t: {"cursor": self.ledger.get(t), "batch_id": None, "acknowledged_at": None}
                    for t in ("sites", "devices", "measurements")
                },
                "limits": {
                    "max_body_bytes": 4_000_000,
                    "max_decompressed_bytes": 16_000_000,
                    "max_items": 10_000,
                    **self.limits,
                },
            }
            return {"statusCode": 200, "body": json.dumps(body)}
        import base64

        raw = base64.b64decode(event["body"]) if event["isBase64Encoded"] else event["body"].encode()
        items = json.loads(gzip.decompress(raw))["items"]
        self.requests.append({"type": event["headers"]["x-batch-type"], "items": items, "headers": event["headers"]})
        scripted = self.answers and (self.only is None or self.only == event["headers"]["x-batch-type"])
        status, headers, body = self.answers.pop(0) if scripted else (200, {}, {})
        if status == 200 and not body:
            body = {"accepted": len(items), "duplicates": 0, "rejected": 0, "errors": []}
        return {"statusCode": status, "headers": headers, "body": json.dumps(body)}

    def measurement_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["type"] == "measurements"]


@pytest.fixture
def scripted(aws, client_db: str) -> Iterator[Callable[..., tuple[PushService, Script, Clock]]]:
    servers: list[Any] = []

    def make(
        answers: list[tuple[int, dict[str, str], dict[str, Any]]], only: str | None = "measurements", **kw: Any
    ) -> tuple[PushService, Script, Clock]:
        script = Script(answers, only)
        # One batch in flight unless a test asks for more: the script answers in the
        # order requests arrive, and batches posted together may arrive either way.
        kw.setdefault("in_flight", 1)
        handler = one_at_a_time(script)
        ctx = serving(ingest_routes(handler))
        api = ctx.__enter__()
        servers.append(ctx)
        clock = Clock()
        token = "flt_" + "a" * 30 + "_aaaaaa"
        return make_push_service(client_db, aws, api.url + INGEST_PATH, token, clock, **kw), script, clock

    insert(client_db, 200)
    with psycopg.connect(client_db) as conn:
        conn.execute("INSERT INTO monitoring.sites (id, name) VALUES ('s1', 'Plant')")
    metrics.clear_metrics()
    yield make
    for ctx in servers:
        ctx.__exit__(None, None, None)


def _state(service: PushService, resource: str = "measurements") -> Any:
    return service.state.get(resource)


def test_500_backs_off_one_minute_then_doubles_and_keeps_the_cursor(scripted) -> None:
    service, script, clock = scripted([(500, {}, {"message": "boom"})] * 8, max_batches=1)
    service.tick()
    st = _state(service)
    assert st.failures == 1 and st.cursor is None
    assert st.next_attempt_at - clock.now == pytest.approx(60)  # rng=1.0: the top of the jitter range
    before = len(script.measurement_requests())
    service.tick()  # still in backoff: nothing sent
    assert len(script.measurement_requests()) == before
    clock.advance(61)
    service.tick()
    st = _state(service)
    assert st.failures == 2
    assert st.next_attempt_at - clock.now == pytest.approx(120)
    delays = []
    for _ in range(6):
        clock.advance(st.next_attempt_at - clock.now + 1)
        service.tick()
        st = _state(service)
        delays.append(round(st.next_attempt_at - clock.now))
    assert delays == [240, 480, 960, 1800, 1800, 1800]
    assert st.cursor is None  # eight failures, the cursor never moved
    clock.advance(BACKOFF_CAP_S + 1)
    service.tick()  # the script is out of 500s: the batch lands
    st = _state(service)
    assert st.cursor is not None and st.failures == 0


def test_jitter_stays_between_half_and_all_of_the_delay() -> None:
    from fleet.push.responses import backoff_delay

    assert backoff_delay(1, lambda: 0.0) == 30
    assert backoff_delay(1, lambda: 1.0) == 60
    assert backoff_delay(3, lambda: 0.5) == pytest.approx(180)
    assert backoff_delay(20, lambda: 1.0) == BACKOFF_CAP_S


def test_429_waits_for_retry_after_in_seconds(scripted) -> None:
    service, _, clock = scripted([(429, {"Retry-After": "137"}, {"message": "busy"})])
    service.tick()
    assert _state(service).next_attempt_at - clock.now == pytest.approx(137)


def test_503_waits_for_retry_after_as_an_http_date(scripted) -> None:
    when = datetime.now(UTC) + timedelta(seconds=300)
    service, _, clock = scripted(
        [(503, {"Retry-After": email.utils.format_datetime(when, usegmt=True)}, {"message": "down"})]
    )
    clock.now = time.time()
    service.tick()
    assert _state(service).next_attempt_at - clock.now == pytest.approx(300, abs=2)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


@pytest.mark.parametrize("read_ahead", [True, False])
def test_413_halves_at_once_and_grows_back_after_successes(scripted, read_ahead: bool) -> None:
    service, script, clock = scripted(
        [(413, {}, {"message": "too large"})] * 2, batch_size=40, max_batches=3, read_ahead=read_ahead
    )
    service.tick()
    sizes = [len(r["items"]) for r in script.measurement_requests()]
    assert sizes == [40, 20, 10, 10, 10]  # two halvings in the same tick, then three batches
    assert _state(service).batch_size == 20  # grown once after three successes
    clock.advance(60)
    service.tick()
    assert [len(r["items"]) for r in script.measurement_requests()][5:] == [20, 20, 20]
    assert _state(service).batch_size is None  # back at the configured size
    rows = [i for r in script.measurement_requests()[2:] for i in r["items"]]
    assert len(rows) == len({(i["time"], i["device_id"]) for i in rows})


def test_401_backs_off_at_the_cap_and_raises_the_alarm(scripted) -> None:
    service, _, clock = scripted([(401, {}, {"message": "missing, unknown, expired or revoked token"})] * 10, only=None)
    service.tick()
    st = _state(service, "sites")
    assert st.next_attempt_at - clock.now == pytest.approx(BACKOFF_CAP_S)
    assert "401" in st.last_error
    assert "PushRefused" in metrics.metric_set


@pytest.mark.parametrize("read_ahead", [True, False])
def test_400_for_a_whole_batch_never_moves_the_cursor_past_it(scripted, read_ahead: bool) -> None:
    answers = [(200, {}, {}), (200, {}, {}), (400, {}, {"message": "body is not valid JSON"})]
    service, script, clock = scripted(answers, max_batches=3, read_ahead=read_ahead)
    service.tick()
    st = _state(service)
    sent = script.measurement_requests()
    assert len(sent) == 3
    assert st.cursor == sent[1]["headers"]["x-push-cursor"]  # after the two accepted batches
    assert st.next_attempt_at - clock.now == pytest.approx(BACKOFF_CAP_S)
    assert "PushRefused" in metrics.metric_set
    clock.advance(BACKOFF_CAP_S + 1)
    service.tick()
    assert script.measurement_requests()[3]["items"] == sent[2]["items"]  # sent again, never skipped


def test_a_resource_in_backoff_does_not_block_the_others(scripted) -> None:
    service, _script, clock = scripted([(200, {}, {}), (200, {}, {}), (500, {}, {"message": "boom"})])
    report = service.tick()
    assert report.resources["sites"].outcome == "pushed"
    assert report.resources["measurements"].outcome == "failed"
    clock.advance(10)
    # measurements still in backoff; a changed site is pushed anyway
    with psycopg.connect(_client_url(service)) as conn:
        conn.execute("UPDATE monitoring.sites SET name = 'Renamed'")
    report = service.tick()
    assert report.resources["measurements"].outcome == "backoff"
    assert report.resources["sites"].outcome == "pushed"


def _client_url(service: PushService) -> str:
    with service._connect() as conn:
        return conn.info.dsn


def test_timeouts_are_failures_with_backoff(aws, client_db: str) -> None:
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)
    try:
        insert(client_db, 5)
        clock = Clock()
        service = PushService(
            lambda: psycopg.connect(client_db, autocommit=True),
            PushStateStore(aws),
            IngestClient(f"http://127.0.0.1:{silent.getsockname()[1]}{INGEST_PATH}", "flt_x", 0.5, 0.5),
            clock=clock,
            rng=lambda: 1.0,
        )
        report = service.tick()
    finally:
        silent.close()
    assert report.resources["sites"].outcome == "failed"
    assert "no answer" in report.resources["sites"].detail
    assert _state(service, "sites").next_attempt_at - clock.now == pytest.approx(60)


# --- leases -------------------------------------------------------------------------


def test_two_invocations_at_once_one_pushes_the_other_leaves(scripted) -> None:
    service, script, clock = scripted([])
    holder = PushStateStore(service.state.table)
    for resource in ("sites", "devices", "measurements"):
        assert holder.acquire(resource, "invocation-A", clock.now, 120) is not None
    report = service.tick(owner="invocation-B")
    assert {r.outcome for r in report.resources.values()} == {"leased"}
    assert script.requests == []


def test_a_holder_paused_past_its_lease_cannot_write_its_cursor(aws) -> None:
    store = PushStateStore(aws)
    now = time.time()
    a = store.acquire("measurements", "A", now, 120)
    assert a is not None
    assert store.acquire("measurements", "B", now + 60, 120) is None  # A's lease is live
    b = store.acquire("measurements", "B", now + 200, 120)  # A paused past its lease
    assert b is not None
    b.cursor = "b-cursor"
    store.save(b, "B")
    a.cursor = "a-cursor"
    with pytest.raises(LeaseLost):
        store.save(a, "A")
    assert store.get("measurements").cursor == "b-cursor"


def test_a_stale_version_cannot_overwrite_even_with_the_lease(aws) -> None:
    store = PushStateStore(aws)
    first = store.acquire("measurements", "A", time.time(), 120)
    assert first is not None
    second = store.get("measurements")
    store.save(first, "A")
    with pytest.raises(LeaseLost):
        store.save(second, "A")


@pytest.mark.parametrize("read_ahead", [True, False])
def test_a_tick_reads_no_new_batch_once_its_time_budget_is_used(scripted, read_ahead: bool) -> None:
    """A backlog drains batch after batch (no small cap per tick), until the tick's
    time is used: the batch in hand is sent, no new one is read, the next tick goes on."""
    clocks: list[Clock] = []

    class TenSecondsAnAnswer(Checkpoints):
        def reached(self, name: str, resource: str) -> None:
            if name == "after_send" and resource == "measurements":
                clocks[0].advance(10)

    service, script, clock = scripted(
        [], batch_size=20, max_batches=1000, read_ahead=read_ahead, checkpoints=TenSecondsAnAnswer(), time_budget_s=25
    )
    clocks.append(clock)
    report = service.tick()
    sent = script.measurement_requests()
    # Batches start at 0, 10 and 20 s; the one read at 20 s goes out at 30 s; none is read after.
    assert [len(r["items"]) for r in sent] == [20, 20, 20, 20]
    assert "time budget" in (report.resources["measurements"].detail or "")
    assert _state(service).cursor == sent[-1]["headers"]["x-push-cursor"]
    clock.advance(60)
    service.tick()
    rows = [(i["time"], i["device_id"]) for r in script.measurement_requests() for i in r["items"]]
    assert len(rows) == 160 and len(set(rows)) == 160  # on from where it stopped, nothing twice


@pytest.mark.parametrize("read_ahead", [True, False])
def test_a_backlog_larger_than_one_read_drains_in_one_tick_read_after_read(
    scripted, client_db: str, monkeypatch: pytest.MonkeyPatch, read_ahead: bool
) -> None:
    """No cap by default: a tick reads again from its cursor when a read's rows are
    used up (each read a snapshot of its own), until the backlog is empty; a row
    written between two reads goes out in the same tick."""
    monkeypatch.setattr(push_service, "READ_BATCHES", 2)
    reads: list[int] = []
    written: list[bool] = []
    reader = push_source.MeasurementReader.__init__

    def counted(self: push_source.MeasurementReader, *args: Any) -> None:
        reads.append(len(reads))
        reader(self, *args)

    monkeypatch.setattr(push_source.MeasurementReader, "__init__", counted)

    class WriteOnce(Checkpoints):
        def reached(self, name: str, resource: str) -> None:
            if name == "after_cursor_saved" and resource == "measurements" and len(reads) == 1 and not written:
                written.append(True)
                insert(client_db, 1, start=datetime(2026, 7, 1, tzinfo=UTC))

    service, script, _ = scripted([], batch_size=30, read_ahead=read_ahead, checkpoints=WriteOnce())
    report = service.tick().resources["measurements"]
    sent = [len(r["items"]) for r in script.measurement_requests()]
    assert sum(sent) == 201 and report.rows == 201 and report.outcome == "pushed"
    assert len(reads) == 4  # 60 + 60 + 60 rows in two batches each, then 21
    assert _state(service).cursor == script.measurement_requests()[-1]["headers"]["x-push-cursor"]


def test_an_operators_cap_still_ends_a_tick(scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(push_service, "READ_BATCHES", 2)
    service, script, _ = scripted([], batch_size=30, max_batches=3)
    assert service.tick().resources["measurements"].rows == 90
    assert [len(r["items"]) for r in script.measurement_requests()] == [30, 30, 30]


@pytest.mark.parametrize(("given", "cap"), [(None, None), ("0", None), ("", None), ("7", 7)])
def test_push_max_batches_zero_or_unset_means_no_cap(given: str | None, cap: int | None) -> None:
    env = {
        "DATABASE_URL": "postgresql://x/y",
        "INGEST_URL": "http://127.0.0.1:1/api/fleet/ingest",
        "INGEST_TOKEN": "t",
        "PUSH_STATE_TABLE": "s",
    }
    if given is not None:
        env["PUSH_MAX_BATCHES"] = given
    assert config.load(config.PushConfig, env).max_batches == cap


class Decided(Script):
    """Answers each POST by what it carries (``decide(items, nth)``), concurrently, as
    several Lambda environments would; a decision may first wait some seconds."""

    def __init__(self, decide: Callable[[list[dict[str, Any]], int], tuple[float, int]]) -> None:
        super().__init__([])
        self.decide = decide
        self._lock = threading.Lock()
        self.acknowledged: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        if event["requestContext"]["http"]["method"] == "GET" or event["headers"]["x-batch-type"] != "measurements":
            return super().__call__(event, context)
        items = json.loads(gzip.decompress(base64.b64decode(event["body"])))["items"]
        with self._lock:
            nth = len(self.measurement_requests())
            self.requests.append({"type": "measurements", "items": items, "headers": event["headers"]})
        wait, status = self.decide(items, nth)
        time.sleep(wait)
        if status == 200:
            with self._lock:
                self.acknowledged += items
        body = {"accepted": len(items), "duplicates": 0, "rejected": 0, "errors": []} if status == 200 else {}
        return {"statusCode": status, "body": json.dumps(body)}


@contextlib.contextmanager
def _decided_push(
    aws: Any, client_db: str, decide: Callable[[list[dict[str, Any]], int], tuple[float, int]], **kw: Any
) -> Iterator[tuple[PushService, Decided, Clock]]:
    script = Decided(decide)
    with serving(ingest_routes(script)) as api:
        clock = Clock()
        token = "flt_" + "a" * 30 + "_aaaaaa"
        yield make_push_service(client_db, aws, api.url + INGEST_PATH, token, clock, **kw), script, clock


def test_a_batch_acknowledged_behind_a_failed_one_does_not_move_the_cursor(aws, client_db: str) -> None:
    """Two in flight: the first fails slowly while the second is acknowledged at once.
    The cursor stays before the first; the next tick sends both again."""
    insert(client_db, 200)
    failing = [True]

    def decide(items: list[dict[str, Any]], nth: int) -> tuple[float, int]:
        return (0.5, 500) if failing[0] and items[0]["power_w"] == 0 else (0.0, 200)

    with _decided_push(aws, client_db, decide, batch_size=40, in_flight=2) as (service, script, clock):
        report = service.tick().resources["measurements"]
        assert report.outcome == "failed" and report.rows == 0
        assert len(script.measurement_requests()) == 2  # the second went out while the first was in flight
        assert len(script.acknowledged) == 40  # ... and the server took it
        assert _state(service).cursor is None
        failing[0] = False
        clock.advance(120)
        report = service.tick().resources["measurements"]
    assert report.rows == 200
    sent_after = script.measurement_requests()[2:]
    assert sorted(r["items"][0]["power_w"] for r in sent_after) == [0, 40, 80, 120, 160]
    assert _state(service).cursor == sent_after[-1]["headers"]["x-push-cursor"]


def test_a_413_with_batches_in_flight_sends_their_rows_again_smaller(aws, client_db: str) -> None:
    insert(client_db, 200)
    refused: list[int] = []

    def decide(items: list[dict[str, Any]], nth: int) -> tuple[float, int]:
        if items[0]["power_w"] == 0 and not refused:
            refused.append(nth)
            return 0.3, 413
        return 0.0, 200

    with _decided_push(aws, client_db, decide, batch_size=40, in_flight=2) as (service, script, _clock):
        report = service.tick().resources["measurements"]
    sizes = [len(r["items"]) for r in script.measurement_requests()]
    assert sizes[:2] == [40, 40]  # the second was in flight when the first got its 413
    assert sizes[2:5] == [20, 20, 20]  # then its rows and the later ones at half the size (growing back after)
    assert report.rows == 200
    assert min(i["power_w"] for r in script.measurement_requests()[2:4] for i in r["items"]) == 0  # from the start
    # Every row acknowledged at least once: the one acknowledged behind the 413 again.
    assert {i["power_w"] for i in script.acknowledged} == set(range(200))
    assert _state(service).cursor == script.measurement_requests()[-1]["headers"]["x-push-cursor"]


def test_a_429_with_a_short_retry_after_is_waited_out_within_the_tick(scripted) -> None:
    """A server shedding load says when to come back; a backlog goes on in the same
    tick after that wait, not a schedule interval later."""
    sleeps: list[float] = []
    service, script, _ = scripted(
        [(429, {"Retry-After": "2"}, {"message": "busy"})], batch_size=50, sleep=sleeps.append, time_budget_s=40
    )
    report = service.tick().resources["measurements"]
    assert sleeps == [pytest.approx(2.0)]
    assert (report.outcome, report.rows, report.shed) == ("pushed", 200, 1)
    assert [len(r["items"]) for r in script.measurement_requests()] == [50] * 5  # the shed one again, then on


def test_a_429_that_asks_for_longer_ends_the_tick(scripted) -> None:
    sleeps: list[float] = []
    service, _, clock = scripted([(429, {"Retry-After": "30"}, {"message": "busy"})], sleep=sleeps.append)
    report = service.tick().resources["measurements"]
    assert sleeps == [] and report.outcome == "failed"
    assert _state(service).next_attempt_at - clock.now == pytest.approx(30)


def test_no_more_batches_in_flight_than_the_server_advertises(aws, client_db: str) -> None:
    insert(client_db, 200)
    at_once = [0, 0]  # now, most
    lock = threading.Lock()

    def decide(items: list[dict[str, Any]], nth: int) -> tuple[float, int]:
        with lock:
            at_once[0] += 1
            at_once[1] = max(at_once)
        time.sleep(0.05)
        with lock:
            at_once[0] -= 1
        return 0.0, 200

    with _decided_push(aws, client_db, decide, batch_size=20, in_flight=3) as (service, script, _):
        script.limits = {"max_in_flight": 1}
        assert service.tick().resources["measurements"].rows == 200
    assert at_once[1] == 1
