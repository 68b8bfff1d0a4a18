"""Reconciliation end to end: the real push (digests, healing) against the real
ingest over local HTTP, a real Client database and a real Admin database of each
profile; DynamoDB from moto.

The portal holds three meters over four UTC days (a reading every 15 minutes); the
push's clock stands a few days after them, so every day is inside the re-check
horizon.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest
import urllib3
from contract import check_response
from fleet.push import digests as module
from fleet.push.digest_queries import DigestQueries
from fleet.push.digest_state import DigestSettings
from fleet.push.digests import DigestPush
from fleet.push.mapping import parse_mapping
from fleet.push.service import PushService
from fleet.push.source import PortalSource
from fleet.push.state import PushStateStore
from fleet.push.transport import IngestClient
from fleet.schema.migrate import migrate
from fleet_local.status import fleet_status, render
from support import INGEST_PATH, Clock, ingest_serving, make_push_service
from test_portal_mapping import EF_CORE_MAPPING, EF_CORE_SCHEMA

DEVICES = ("meter-1", "meter-2", "meter-3")
FIRST_DAY = date(2026, 11, 2)
DAYS = 4
PER_DAY = 96


@dataclass
class Admin:
    url: str
    server_url: str
    token: str

    def execute(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def rows(self) -> set[tuple[Any, ...]]:
        return set(self.execute("SELECT time, device_id, power_w, energy_wh FROM fleet.power_measurements"))

    def last_event(self) -> int:
        return int(self.execute("SELECT coalesce(max(id), 0) FROM fleet.ingest_events")[0][0])

    def measurements_sent_since(self, event_id: int) -> tuple[int, int]:
        """(accepted, accepted + duplicates) of the measurement batches after an event."""
        row = self.execute(
            "SELECT coalesce(sum(accepted), 0), coalesce(sum(accepted + duplicates), 0) FROM fleet.ingest_events"
            " WHERE id > %s AND batch_type = 'measurements' AND status = 200",
            event_id,
        )[0]
        return int(row[0]), int(row[1])

    def outcome(self, device: str, day: date) -> tuple[str, datetime] | None:
        rows = self.execute(
            "SELECT outcome, checked_at FROM fleet.reconciliation WHERE customer_id = 'DEV0001'"
            " AND device_id = %s AND day = %s",
            device,
            day,
        )
        return rows[0] if rows else None


@pytest.fixture
def admin(admin_db: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Admin]:
    with ingest_serving(admin_db, monkeypatch) as (server_url, token):
        yield Admin(admin_db, server_url, token)


def _day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def fill_portal(url: str) -> None:
    """The meters' readings, on a portal that has its own index on the time (the one
    the check's notice proposes): reconciliation reads its days by it."""
    with psycopg.connect(url) as conn:
        conn.execute("CREATE INDEX power_measurements_time_idx ON monitoring.power_measurements (time)")
        for device in DEVICES:
            conn.execute(
                "INSERT INTO monitoring.power_measurements (time, device_id, power_w, energy_wh, voltage_v)"
                " SELECT %s + g * interval '15 minutes', %s, mod(g, 50) * 1.5, g * 10.25, CASE WHEN mod(g, 7) = 0"
                " THEN NULL ELSE 230.1 END FROM generate_series(0, %s) g",
                (_day_start(FIRST_DAY), device, DAYS * PER_DAY - 1),
            )


def portal_rows(url: str) -> set[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return set(conn.execute("SELECT time, device_id, power_w, energy_wh FROM monitoring.power_measurements"))


def service_for(client_db: str, table: Any, admin: Admin, clock: Clock, **settings: Any) -> PushService:
    settings.setdefault("horizon_days", 10)
    settings.setdefault("period_s", 300.0)
    settings.setdefault("alarm_ticks", 3)
    digests = DigestPush(
        PushStateStore(table),
        IngestClient(admin.server_url, admin.token, 2.0, 10.0),
        DigestSettings(**settings),
        clock,
        lambda: 1.0,
        120,
    )
    return make_push_service(client_db, table, admin.server_url, admin.token, clock, batch_size=500, digests=digests)


def ticks(service: PushService, clock: Clock, n: int) -> list[dict[str, Any]]:
    reports = []
    for _ in range(n):
        reports.append(service.tick().as_dict())
        clock.advance(60)
    return reports


def verified(admin: Admin) -> dict[str, int]:
    return dict(
        (o, int(n)) for o, n in admin.execute("SELECT outcome, count(*) FROM fleet.reconciliation GROUP BY outcome")
    )


@pytest.fixture
def synced(aws: Any, admin: Admin, client_db: str) -> tuple[PushService, Clock]:
    """Every row pushed and every device-day digested and matched."""
    fill_portal(client_db)
    clock = Clock()
    clock.now = _day_start(FIRST_DAY + timedelta(days=DAYS + 2)).timestamp()
    service = service_for(client_db, aws, admin, clock)
    reports = ticks(service, clock, 8)
    assert reports[0]["digests"]["outcome"] == "pushed"
    assert admin.rows() == portal_rows(client_db)
    assert verified(admin) == {"matched": len(DEVICES) * DAYS}
    return service, clock


def test_the_digests_of_an_exact_copy_all_match_on_both_profiles(synced, admin: Admin) -> None:
    # The portal's digest and the Admin's, computed apart, agree row for row.
    rows = admin.execute("SELECT portal_count, portal_hash, admin_count, admin_hash FROM fleet.reconciliation")
    assert all(r[0] == r[2] == PER_DAY and r[1] == r[3] and r[1] != "v1:0:0" for r in rows)
    assert len({r[1] for r in rows}) == len(rows)  # other rows, other hashes


def test_rows_deleted_from_one_device_day_on_the_admin_are_healed_with_nothing_else_resent(
    synced, admin: Admin, client_db: str
) -> None:
    service, clock = synced
    day = FIRST_DAY + timedelta(days=1)
    admin.execute(
        "DELETE FROM fleet.power_measurements WHERE device_id = 'meter-2' AND time >= %s AND time < %s"
        " AND extract(minute FROM time) = 0",
        _day_start(day),
        _day_start(day + timedelta(days=1)),
    )
    before = admin.last_event()
    healed_after = None
    for n in range(12):
        ticks(service, clock, 1)
        if admin.rows() == portal_rows(client_db) and (admin.outcome("meter-2", day) or ("",))[0] == "matched":
            healed_after = n + 1
            break
    assert healed_after is not None and healed_after <= 10, "not healed within the ticks"
    accepted, sent = admin.measurements_sent_since(before)
    assert accepted == 24  # the rows deleted (one an hour)...
    assert sent == PER_DAY  # ...and the rest of that device-day only, as duplicates
    assert verified(admin) == {"matched": len(DEVICES) * DAYS}


def test_a_whole_day_deleted_for_every_device_is_healed(synced, admin: Admin, client_db: str) -> None:
    service, clock = synced
    day = FIRST_DAY + timedelta(days=2)
    admin.execute(
        "DELETE FROM fleet.power_measurements WHERE time >= %s AND time < %s",
        _day_start(day),
        _day_start(day + timedelta(days=1)),
    )
    before = admin.last_event()
    for _ in range(12):
        ticks(service, clock, 1)
        if admin.rows() == portal_rows(client_db) and verified(admin) == {"matched": len(DEVICES) * DAYS}:
            break
    assert admin.rows() == portal_rows(client_db)
    assert admin.measurements_sent_since(before) == (len(DEVICES) * PER_DAY, len(DEVICES) * PER_DAY)
    assert verified(admin) == {"matched": len(DEVICES) * DAYS}


def test_an_extra_row_on_the_admin_is_reported_and_kept(synced, admin: Admin) -> None:
    service, clock = synced
    day = FIRST_DAY + timedelta(days=3)
    extra = _day_start(day) + timedelta(minutes=7)
    admin.execute(
        "INSERT INTO fleet.power_measurements (time, customer_id, device_id, power_w) VALUES (%s, 'DEV0001', 'meter-1', 1)",
        extra,
    )
    before = admin.last_event()
    reports = ticks(service, clock, 12)
    found = admin.outcome("meter-1", day)
    assert found is not None and found[0] == "extra"
    assert admin.execute("SELECT portal_count, admin_count FROM fleet.reconciliation WHERE outcome = 'extra'") == [
        (PER_DAY, PER_DAY + 1)
    ]
    assert admin.execute("SELECT count(*) FROM fleet.power_measurements WHERE time = %s", extra) == [(1,)]
    assert admin.measurements_sent_since(before) == (0, 0)  # nothing re-sent for it
    assert any(r["digests"]["outcome"] == "pushed" for r in reports)
    # Seen: fleet status names it, and the day before it is the last verified.
    with psycopg.connect(admin.url) as conn:
        rows = fleet_status(conn)
    assert rows[0]["verified_through"] == day - timedelta(days=1)
    assert rows[0]["open_mismatches"] == 1
    text = render(rows, datetime.now(UTC))
    assert f"verified through {(day - timedelta(days=1)).isoformat()}" in text
    assert f"{day.isoformat()} meter-1: extra (portal {PER_DAY} rows, admin {PER_DAY + 1})" in text


def test_a_mismatch_left_unhealed_counts_for_the_alarm_after_the_configured_ticks(synced, admin: Admin) -> None:
    service, clock = synced
    digests = service.digests
    assert digests is not None
    day = FIRST_DAY + timedelta(days=3)
    admin.execute(
        "INSERT INTO fleet.power_measurements (time, customer_id, device_id) VALUES (%s, 'DEV0001', 'meter-3')",
        _day_start(day) + timedelta(minutes=1),
    )
    seen: list[float] = []
    original = module.metrics.add_metric

    def record(name: str, unit: str, value: float) -> None:
        if name == "ReconcileUnhealed":
            seen.append(value)
        original(name=name, unit=unit, value=value)

    module.metrics.add_metric = record  # type: ignore[method-assign]
    try:
        ticks(service, clock, 14)
    finally:
        module.metrics.add_metric = original  # type: ignore[method-assign]
    assert seen and seen[0] == 0
    assert seen[-1] == 1


def test_a_back_fill_into_an_old_day_is_verified_again(aws: Any, admin: Admin, client_db: str) -> None:
    fill_portal(client_db)
    clock = Clock()
    clock.now = _day_start(FIRST_DAY + timedelta(days=DAYS + 2)).timestamp()
    # A long period: the rolling re-check does not come back during the test.
    service = service_for(client_db, aws, admin, clock, period_s=86_400.0)
    ticks(service, clock, 3)
    day = FIRST_DAY
    first = admin.outcome("meter-3", day)
    neighbour = admin.outcome("meter-1", day)
    assert first is not None and first[0] == "matched"
    with psycopg.connect(client_db) as conn:
        conn.execute(
            "INSERT INTO monitoring.power_measurements (time, device_id, power_w) VALUES (%s, 'meter-3', 42.5)",
            (_day_start(day) + timedelta(minutes=3),),
        )
    reports = ticks(service, clock, 2)
    assert reports[0]["measurements"]["rows"] == 1
    again = admin.outcome("meter-3", day)
    assert again is not None and again[0] == "matched" and again[1] > first[1]
    assert admin.execute(
        "SELECT portal_count FROM fleet.reconciliation WHERE device_id = 'meter-3' AND day = %s", day
    ) == [(PER_DAY + 1,)]
    # The other device-days of that day were not digested again.
    assert admin.outcome("meter-1", day) == neighbour


# --- the digests batch type, as the contract defines it ------------------------------


def _post_digests(admin: Admin, items: Any, token: str | None = None) -> tuple[int, dict[str, Any]]:
    body = json.dumps({"items": items}).encode()
    headers = {"X-Customer-Token": token or admin.token, "X-Batch-Type": "digests", "Content-Type": "application/json"}
    resp = urllib3.request("POST", admin.server_url, body=body, headers=headers, retries=False)
    doc = json.loads(resp.data)
    check_response("POST", INGEST_PATH, resp.status, dict(resp.headers), doc)
    return resp.status, doc


def test_a_digests_batch_is_compared_recorded_audited_and_answered_by_the_contract(admin: Admin) -> None:
    day = date(2026, 11, 5)
    admin.execute(
        "INSERT INTO fleet.power_measurements (time, customer_id, device_id, power_w) VALUES (%s, 'DEV0001', 'm1', 1)",
        _day_start(day),
    )
    items = [
        {"device_id": "m1", "day": day.isoformat(), "count": 2, "hash": "v1:1:2"},  # the Admin holds one
        {"device_id": "m2", "day": day.isoformat(), "count": 0, "hash": "v1:0:0"},  # both hold none
        {"device_id": "m3", "day": "2026-11-31", "count": 1, "hash": "v1:1:1"},  # no such day
        {"device_id": "m4", "day": day.isoformat(), "count": -1, "hash": "sha1:x"},
        {"device_id": "m5", "day": day.isoformat(), "count": 1, "hash": f"v1:{2**64 - 1}:{2**64}"},  # over mod 2**64
        {"device_id": "m6", "day": "9999-12-31", "count": 0, "hash": "v1:0:0"},  # an unset clock's last day
    ]
    status, body = _post_digests(admin, items)
    assert status == 200
    assert body["accepted"] == 3 and body["rejected"] == 3
    assert [e["index"] for e in body["errors"]] == [2, 3, 4]
    assert "2**64" in body["errors"][2]["reason"]
    assert body["differ"] == [
        {"device_id": "m1", "day": day.isoformat(), "outcome": "missing", "portal_count": 2, "admin_count": 1}
    ]
    # Sent again: the same answer, the same rows (one per device-day), a second audit row.
    assert _post_digests(admin, items)[1]["differ"] == body["differ"]
    assert admin.execute("SELECT device_id, outcome FROM fleet.reconciliation ORDER BY 1") == [
        ("m1", "missing"),
        ("m2", "matched"),
        ("m6", "matched"),
    ]
    assert admin.execute(
        "SELECT count(*), sum(accepted), sum(rejected) FROM fleet.ingest_events WHERE batch_type = 'digests'"
    ) == [(2, 6, 6)]
    assert admin.execute("SELECT count(*) FROM fleet.quarantine WHERE batch_type = 'digests'") == [(6,)]
    # Nothing was deleted, and a stranger is refused.
    assert admin.execute("SELECT count(*) FROM fleet.power_measurements") == [(1,)]
    assert _post_digests(admin, items, token="flt_wrong")[0] == 401


def test_a_portal_row_written_with_a_null_cursor_column_is_found_and_sent(synced, admin: Admin, client_db: str) -> None:
    # Behind the cursor for ever (the legacy phase is long past): the push alone
    # would never send it; the rolling re-check finds its day short of a row.
    service, clock = synced
    at = _day_start(FIRST_DAY) + timedelta(minutes=5)
    with psycopg.connect(client_db) as conn:
        conn.execute(
            "INSERT INTO monitoring.power_measurements (time, device_id, power_w, push_xid)"
            " VALUES (%s, 'meter-2', 7.5, NULL)",
            (at,),
        )
    before = admin.last_event()
    for _ in range(12):
        ticks(service, clock, 1)
        if admin.execute("SELECT count(*) FROM fleet.power_measurements WHERE time = %s", at) == [(1,)]:
            break
    assert admin.rows() == portal_rows(client_db)
    assert admin.measurements_sent_since(before) == (1, PER_DAY + 1)
    ticks(service, clock, 1)
    assert admin.outcome("meter-2", FIRST_DAY)[0] == "matched"  # type: ignore[index]


def test_a_digests_failure_backs_off_on_its_own_and_the_measurements_go_on(
    synced, admin: Admin, client_db: str
) -> None:
    service, clock = synced
    admin.execute("ALTER TABLE fleet.reconciliation RENAME TO reconciliation_away")
    with psycopg.connect(client_db) as conn:
        conn.execute(
            "INSERT INTO monitoring.power_measurements (time, device_id, power_w) VALUES (%s, 'meter-1', 1)",
            (_day_start(FIRST_DAY + timedelta(days=DAYS)),),
        )
    failed_at = clock.now
    (first,) = ticks(service, clock, 1)
    assert first["digests"]["outcome"] == "failed" and "503" in first["digests"]["detail"]
    assert first["measurements"]["rows"] == 1
    assert admin.rows() == portal_rows(client_db)
    doc = json.loads(service.state.table.get_item(Key={"resource": "digests"})["Item"]["reconcile"])
    assert doc["failures"] == 1
    assert doc["next_attempt_at"] == pytest.approx(failed_at + 30, abs=5)  # the 503's Retry-After
    # Once the Admin answers again, the day that changed meanwhile is digested.
    admin.execute("ALTER TABLE fleet.reconciliation_away RENAME TO reconciliation")
    clock.advance(120)
    ticks(service, clock, 2)
    assert admin.outcome("meter-1", FIRST_DAY + timedelta(days=DAYS))[0] == "matched"  # type: ignore[index]


# --- a portal named its own way, through the source mapping ---------------------------

# EF Core's naming (tests/test_portal_mapping.py), with its `timestamp` columns read as
# local times in Berlin: the UTC days of the digests are not the portal's own days.
EF_MAPPING = parse_mapping(json.dumps({**EF_CORE_MAPPING, "time_zone": "Europe/Berlin"}))
_EF_INSERT = (
    'INSERT INTO monitoring."PowerMeasurements" ("Time", "DeviceId", "PowerW", "VoltageV", "CurrentA",'
    ' "EnergyKwh", "PowerFactor", "FrequencyHz") SELECT timezone(\'Europe/Berlin\', %s + g * interval \'15 minutes\'),'
    " d, mod(g, 50) * 1.1 + 0.1, CASE WHEN mod(g, 7) = 0 THEN NULL ELSE 230.1 END, 5.37, d * 100 + g * 0.010251,"
    " 0.91, 50.01 FROM generate_series(%s::int, %s::int) g, (VALUES (1), (2)) v(d)"
)


def _ef_portal(url: str) -> None:
    """Two meters over DAYS UTC days: the first day's rows written before the client
    bootstrap (no cursor column yet: the legacy phase), the others after it."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(EF_CORE_SCHEMA)
        conn.execute('INSERT INTO monitoring."Sites" ("Name", "UpdatedAt") VALUES (\'Plant\', \'2026-10-01 08:00:00\')')
        conn.execute(
            'INSERT INTO monitoring."Devices" ("SiteId", "Name", "UpdatedAt")'
            " VALUES (1, 'Main', '2026-10-03 00:00:00'), (1, 'Aux', '2026-10-04 00:00:00')"
        )
        conn.execute(_EF_INSERT, (_day_start(FIRST_DAY), 0, PER_DAY - 1))
        migrate(conn, "client", mapping=EF_MAPPING)
        conn.execute(_EF_INSERT, (_day_start(FIRST_DAY), PER_DAY, DAYS * PER_DAY - 1))


def test_a_mapped_portal_digests_as_stored_and_a_deleted_device_day_is_healed(
    aws: Any, admin: Admin, empty_db: str
) -> None:
    _ef_portal(empty_db)
    clock = Clock()
    clock.now = _day_start(FIRST_DAY + timedelta(days=DAYS + 2)).timestamp()
    digests = DigestPush(
        PushStateStore(aws),
        IngestClient(admin.server_url, admin.token, 2.0, 10.0),
        DigestSettings(horizon_days=10, period_s=300.0, alarm_ticks=3),
        clock,
        lambda: 1.0,
        120,
    )
    service = make_push_service(
        empty_db,
        aws,
        admin.server_url,
        admin.token,
        clock,
        batch_size=500,
        digests=digests,
        source=PortalSource(EF_MAPPING),
    )
    reports = ticks(service, clock, 8)
    assert all(r[k]["outcome"] != "failed" for r in reports for k in r), reports
    stored = admin.rows()
    assert len(stored) == 2 * DAYS * PER_DAY
    # kWh as Wh, reals as the portal shows them, Berlin's times as UTC: the portal's
    # digests and the Admin's of what the ingest stored agree, day by UTC day.
    assert verified(admin) == {"matched": 2 * DAYS}
    assert admin.execute("SELECT DISTINCT portal_count FROM fleet.reconciliation") == [(PER_DAY,)]
    # One device-day deleted on the Admin (of the rows pushed first, before the cursor
    # column) and half of another: found, and only they are re-sent.
    legacy_day, day = FIRST_DAY, FIRST_DAY + timedelta(days=2)
    admin.execute(
        "DELETE FROM fleet.power_measurements WHERE device_id = '2' AND time >= %s AND time < %s",
        _day_start(legacy_day),
        _day_start(legacy_day + timedelta(days=1)),
    )
    admin.execute(
        "DELETE FROM fleet.power_measurements WHERE device_id = '1' AND time >= %s AND time < %s"
        " AND extract(minute FROM time) IN (0, 15)",
        _day_start(day),
        _day_start(day + timedelta(days=1)),
    )
    assert len(admin.rows()) == len(stored) - PER_DAY - PER_DAY // 2
    before = admin.last_event()
    seen: set[str] = set()
    for _ in range(12):
        ticks(service, clock, 1)
        for device, when in (("2", legacy_day), ("1", day)):
            found = admin.outcome(device, when)
            if found is not None:
                seen.add(found[0])
        if admin.rows() == stored and verified(admin) == {"matched": 2 * DAYS}:
            break
    assert "missing" in seen
    assert admin.rows() == stored
    assert verified(admin) == {"matched": 2 * DAYS}
    assert admin.measurements_sent_since(before) == (PER_DAY + PER_DAY // 2, 2 * PER_DAY)


def test_the_digests_read_a_mapped_day_by_the_portals_own_device_time_index(empty_db: str) -> None:
    # EF Core's portal has its own index on ("DeviceId", "Time") (integer ids, local
    # times): the day's rows are read a device at a time by it, on the columns as they
    # are; the rows from before the cursor column by the cursor's index.
    _ef_portal(empty_db)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(_EF_INSERT, (_day_start(FIRST_DAY), DAYS * PER_DAY, 100 * PER_DAY))  # a few months more
        conn.execute('ANALYZE monitoring."PowerMeasurements"')
        queries = DigestQueries(PortalSource(EF_MAPPING).table(conn, "measurements"), conn)
        assert queries.days_by == "device"
        assert [r[0] for r in conn.execute(queries.devices)] == ["1", "2"]
        params = {
            "start": _day_start(FIRST_DAY),
            "last": _day_start(FIRST_DAY + timedelta(days=1)) - timedelta(microseconds=1),
            "cx": str(2**40),
            "ct": "infinity",
            "cd": "",
            "devices": ["1", "2"],
        }
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + queries.digest[("xid", True)], params))
        assert "Seq Scan" not in plan, plan
        assert "PowerMeasurements_push_cursor_idx" in plan, plan  # the legacy rows
        # The devices and the day's bounds on the columns as they are (local times,
        # a day wider), in the index's condition...
        assert 'Index Scan on "IX_PowerMeasurements_DeviceId_Time"' in plan, plan
        own = "Index Cond: ((\"DeviceId\" = ANY ('{1,2}'::integer[])) AND (\"Time\" >= '2026-11-01 01:00:00'::timestamp"
        assert own in plan, plan
        # ...and the UTC day exactly on the expression sent.
        assert "(timezone('Europe/Berlin'::text, \"Time\") >= '2026-11-02 00:00:00+00'" in plan, plan


# --- what reconciliation reads a day by: the portal's own index, or nothing -------------


def test_a_portal_with_its_own_time_index_has_its_days_read_by_it(client_db: str) -> None:
    fill_portal(client_db)  # the portal's own index on (time)
    with psycopg.connect(client_db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO monitoring.power_measurements (time, device_id, power_w)"
            " SELECT %s - g * interval '1 minute', 'meter-' || mod(g, 20), g FROM generate_series(1, 200000) g",
            (_day_start(FIRST_DAY),),
        )
        conn.execute("ANALYZE monitoring.power_measurements")
        queries = DigestQueries(PortalSource().table(conn, "measurements"), conn)
        assert queries.days_by == "time"
        params = {
            "start": _day_start(FIRST_DAY),
            "last": _day_start(FIRST_DAY + timedelta(days=1)) - timedelta(microseconds=1),
            "cx": str(2**40),
            "ct": "infinity",
            "cd": "",
        }
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + queries.digest[("xid", False)], params))
    assert "Seq Scan" not in plan, plan
    assert "power_measurements_time_idx" in plan, plan  # every device of the day, one range
    assert "Index Cond: ((\"time\" >= '2026-11-02 00:00:00+00'" in plan, plan


def test_without_a_usable_index_reconciliation_is_off_and_says_what_to_create(
    aws: Any, admin: Admin, client_db: str
) -> None:
    fill_portal(client_db)
    with psycopg.connect(client_db, autocommit=True) as conn:
        conn.execute("DROP INDEX monitoring.power_measurements_time_idx")  # a portal without one
    clock = Clock()
    clock.now = _day_start(FIRST_DAY + timedelta(days=DAYS + 2)).timestamp()
    service = service_for(client_db, aws, admin, clock)
    seen: list[str] = []
    original = module.metrics.add_metric

    def record(name: str, unit: str, value: float) -> None:
        seen.append(name)
        original(name=name, unit=unit, value=value)

    module.metrics.add_metric = record  # type: ignore[method-assign]
    try:
        reports = ticks(service, clock, 3)
    finally:
        module.metrics.add_metric = original  # type: ignore[method-assign]
    # The measurements go on; the digests say why they wait, and what to create.
    assert admin.rows() == portal_rows(client_db)
    statement = 'CREATE INDEX CONCURRENTLY ON "monitoring"."power_measurements" ("time")'
    for report in reports:
        assert report["digests"]["outcome"] == "skipped"
        assert "reconciliation is off" in report["digests"]["detail"] and statement in report["digests"]["detail"]
    assert "ReconcileOff" in seen and "ReconcileDeviceDaysChecked" not in seen
    assert verified(admin) == {}
    assert admin.execute("SELECT count(*) FROM fleet.ingest_events WHERE batch_type = 'digests'") == [(0,)]
    # The operator creates it as written: every device-day is digested and matches.
    with psycopg.connect(client_db, autocommit=True) as conn:
        conn.execute(statement)
    ticks(service, clock, 8)
    assert verified(admin) == {"matched": len(DEVICES) * DAYS}


def test_rows_the_ingest_refuses_for_a_whitespace_id_are_not_digested(aws: Any, admin: Admin, client_db: str) -> None:
    """Readings of a meter whose id is only whitespace (an ASCII space, an ideographic
    space) are rejected by the ingest: the portal's digests leave them out, as they
    leave out what the Admin never stores, so their days match instead of staying
    'missing' for ever."""
    fill_portal(client_db)
    with psycopg.connect(client_db) as conn:
        for device in (" ", "\u3000", "\t\u00a0"):
            conn.execute(
                "INSERT INTO monitoring.power_measurements (time, device_id, power_w, energy_wh)"
                " VALUES (%s, %s, 1.0, 2.0)",
                (_day_start(FIRST_DAY) + timedelta(minutes=1), device),
            )
    clock = Clock()
    clock.now = _day_start(FIRST_DAY + timedelta(days=DAYS + 2)).timestamp()
    ticks(service_for(client_db, aws, admin, clock), clock, 8)
    assert verified(admin) == {"matched": len(DEVICES) * DAYS}
    # Sent, and rejected with a reason (once by the push, and not again by the healing).
    assert admin.execute("SELECT count(*) FROM fleet.quarantine") == [(3,)], admin.execute(
        "SELECT e.id, e.batch_type, e.accepted, e.rejected, q.reason FROM fleet.quarantine q"
        " JOIN fleet.ingest_events e ON e.id = q.ingest_event_id"
    )


_AROUND_WHITE_SPACE = [chr(c) for c in (*range(0x09, 0x0E), 0x1C, 0x1F, 0x20, 0x85, 0xA0, 0x1680, 0x180E)] + [
    chr(c) for c in (*range(0x2000, 0x200C), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000, 0xFEFF, 0x61)
]


def test_the_push_and_postgresql_judge_an_id_of_one_character_as_the_ingest_does(empty_db: str) -> None:
    """The portal's digests leave out what the ingest refuses; all three must agree
    on which one-character ids are only whitespace (Python's and PostgreSQL's own
    notions of a space differ from Unicode's White_Space, and from each other)."""
    from fleet.models import WHITE_SPACE, ClientId, is_client_id
    from pydantic import TypeAdapter, ValidationError

    adapter = TypeAdapter(ClientId)

    def ingest_takes(c: str) -> bool:
        try:
            adapter.validate_python(c)
        except ValidationError:
            return False
        return True

    with psycopg.connect(empty_db) as conn:
        for c in _AROUND_WHITE_SPACE:
            in_sql = conn.execute(f"SELECT %s ~ '[^{WHITE_SPACE}]'", (c,)).fetchone()[0]  # type: ignore[index]
            assert ingest_takes(c) == is_client_id(c) == in_sql, hex(ord(c))
