"""Hourly energy (shared DESIGN.md, ``energy_wh``): both profiles' ``fleet.hourly_per_device``
held to one reference computed in Python from the raw readings (tests/hourly_reference.py),
with the readings sent through the ingest API in order, reversed and shuffled."""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fleet import customers
from fleet.schema.bootstrap import maintain
from hourly_reference import Hour, hour_of, hourly, total_rise
from test_ingest import IngestClient, _client, m

Readings = list[tuple[datetime, float | None]]
NOW_HOUR = hour_of(datetime.now(UTC))


@pytest.fixture
def api(admin_db: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[IngestClient]:
    yield from _client(admin_db, monkeypatch)


# --- the readings ----------------------------------------------------------------------


def steady(start: datetime) -> Readings:
    """Every 15 minutes at a steady 1,000 W: the register rises 250 Wh a reading."""
    return [(start + timedelta(minutes=15 * i), 1_000_000.0 + 250.0 * i) for i in range(96)]


def irregular(start: datetime, seed: int = 3) -> Readings:
    rng = random.Random(seed)
    t, v, out = start, 5_000.0, []
    for _ in range(60):
        t += timedelta(seconds=rng.randint(20, 3000))
        v += rng.uniform(0, 400)
        out.append((t, round(v, 3)))
    return out


def gaps(start: datetime) -> Readings:
    """Readings, a gap of five hours, readings, a gap of three days, readings."""
    out: Readings = []
    v = 100.0
    for block_start, count in ((start, 12), (start + timedelta(hours=8), 6), (start + timedelta(days=3, hours=12), 8)):
        for i in range(count):
            v += 75.0
            out.append((block_start + timedelta(minutes=10 * i + 3), v))
    return out


def resets(start: datetime) -> Readings:
    """A meter replaced mid-hour (restarts from zero), and a drop across a boundary."""
    values = [900_000.0, 900_200.0, 900_400.0, 150.0, 350.0, 600.0, 800.0, 20.0, 240.0, 480.0]
    minutes = [5, 20, 35, 40, 50, 70, 115, 125, 150, 175]
    return [(start + timedelta(minutes=mi), v) for mi, v in zip(minutes, values, strict=True)]


def null_registers(start: datetime) -> Readings:
    """NULL registers: an hour holding only NULLs between two that have values, and
    NULL-only hours before the first and after the last value."""
    out: Readings = [(start + timedelta(minutes=10), None), (start + timedelta(minutes=40), None)]
    out += [(start + timedelta(hours=1, minutes=mi), 2_000.0 + mi * 10) for mi in (5, 25, 45)]
    out += [(start + timedelta(hours=1, minutes=55), None)]
    out += [(start + timedelta(hours=2, minutes=mi), None) for mi in (10, 30)]
    out += [(start + timedelta(hours=3, minutes=mi), 3_000.0 + mi * 10) for mi in (15, 50)]
    out += [(start + timedelta(hours=4, minutes=20), None)]
    return out


def on_boundaries(start: datetime) -> Readings:
    """Readings exactly on hour boundaries, and some between."""
    out: Readings = []
    v = 10.0
    for i in range(8):
        v += 100.0
        out.append((start + timedelta(hours=i), v))
        if i % 2:
            v += 30.0
            out.append((start + timedelta(hours=i, minutes=30), v))
    return out


def scenarios() -> dict[str, Readings]:
    recent = NOW_HOUR - timedelta(days=6)  # inside the refresh policy's window
    old = NOW_HOUR - timedelta(days=70)  # outside it: queued by the ingest (timescale)
    return {
        "steady": steady(recent + timedelta(minutes=7)),
        "irregular": irregular(recent),
        "gaps": gaps(recent),
        "resets": resets(recent),
        "nulls": null_registers(recent),
        "boundary": on_boundaries(recent),
        "old-steady": steady(old + timedelta(minutes=2)),
        "old-gaps": gaps(old),
    }


# --- sending and reading -----------------------------------------------------------------


def items_of(readings: dict[str, Readings]) -> list[dict[str, Any]]:
    out = []
    for device, rows in readings.items():
        for i, (t, v) in enumerate(rows):
            out.append(m(t, device=device, power=1_000.0 + i, energy_wh=v))
    return sorted(out, key=lambda item: (item["time"], item["device_id"]))


def orders(items: list[dict[str, Any]]) -> dict[str, list[list[dict[str, Any]]]]:
    """The same items as batches: in order, reversed, and shuffled over several batches."""
    shuffled = list(items)
    random.Random(11).shuffle(shuffled)
    return {
        "in-order": [items[i : i + 200] for i in range(0, len(items), 200)],
        "reversed": [items[::-1][i : i + 90] for i in range(0, len(items), 90)],
        "shuffled": [shuffled[i : i + 37] for i in range(0, len(items), 37)],
    }


def send_as(api: IngestClient, customer: str, batches: list[list[dict[str, Any]]]) -> None:
    with psycopg.connect(api.url, autocommit=True) as conn:
        token = customers.create(conn, customer, customer).token
    for batch in batches:
        answer = api.post("measurements", batch, token=token)
        assert answer.status == 200, answer.body
        assert answer.body["rejected"] == 0, answer.body


def view(url: str, customer: str) -> dict[str, dict[datetime, Hour]]:
    out: dict[str, dict[datetime, Hour]] = {}
    with psycopg.connect(url) as conn:
        for device, bucket, count, energy in conn.execute(
            "SELECT device_id, bucket, sample_count, energy_wh FROM fleet.hourly_per_device"
            " WHERE customer_id = %s ORDER BY device_id, bucket",
            (customer,),
        ):
            out.setdefault(device, {})[bucket] = Hour(count, energy)
    return out


def assert_matches_reference(got: dict[datetime, Hour], readings: Readings, what: str) -> None:
    want = hourly(readings)
    assert sorted(got) == sorted(want), f"{what}: hours differ"
    for bucket, hour in want.items():
        seen = got[bucket]
        assert seen.sample_count == hour.sample_count, f"{what} {bucket}: {seen} != {hour}"
        if hour.energy_wh is None:
            assert seen.energy_wh is None, f"{what} {bucket}: {seen} != {hour}"
        else:
            assert seen.energy_wh == pytest.approx(hour.energy_wh, abs=0.1), f"{what} {bucket}: {seen} != {hour}"


def check_all(url: str, readings: dict[str, Readings], customer_ids: list[str]) -> None:
    seen = {c: view(url, c) for c in customer_ids}
    for customer in customer_ids:
        for device, rows in readings.items():
            assert_matches_reference(seen[customer].get(device, {}), rows, f"{customer}/{device}")
    # The orders agree with each other to the last bit, not only to the reference.
    first = seen[customer_ids[0]]
    for customer in customer_ids[1:]:
        for device in readings:
            a, b = first[device], seen[customer][device]
            assert {k: (v.sample_count, round(v.energy_wh or 0, 6)) for k, v in a.items()} == {
                k: (v.sample_count, round(v.energy_wh or 0, 6)) for k, v in b.items()
            }, f"{customer}/{device} differs from {customer_ids[0]}"


# --- the definition, both profiles ------------------------------------------------------------


def test_the_reference_itself_adds_up_and_splits_steady_readings_evenly() -> None:
    rows = steady(datetime(2026, 3, 1, 0, 7, tzinfo=UTC))
    hours = hourly(rows)
    whole = [h for b, h in hours.items() if b > hour_of(rows[0][0]) and b < hour_of(rows[-1][0])]
    assert {round(h.energy_wh or 0, 6) for h in whole} == {1000.0}
    assert sum(h.energy_wh or 0 for h in hours.values()) == pytest.approx(total_rise(rows))
    assert total_rise(rows) == 95 * 250.0


def test_hours_match_the_reference_in_order_reversed_and_shuffled(api: IngestClient, admin_profile: str) -> None:
    readings = scenarios()
    items = items_of(readings)
    names = []
    for name, batches in orders(items).items():
        customer = f"C-{name}"
        send_as(api, customer, batches)
        names.append(customer)
    check_all(api.url, readings, names)
    report = maintain(api.url)
    if admin_profile == "timescale":
        assert report["ranges_refreshed"] > 0  # the 70-day-old rows were queued
    assert report["refresh_queue_remaining"] == 0
    check_all(api.url, readings, names)
    if admin_profile == "timescale":
        # Materialised as the refresh policy would, up to its end offset: the same hours.
        with psycopg.connect(api.url, autocommit=True) as conn:
            conn.execute(
                "CALL refresh_continuous_aggregate('fleet.hourly_state', NULL,"
                " time_bucket(INTERVAL '1 hour', now() - INTERVAL '1 hour'))"
            )
        check_all(api.url, readings, names)


def test_hours_add_up_to_the_register_rise_over_any_span(api: IngestClient) -> None:
    readings = scenarios()
    send_as(api, "C-sum", orders(items_of(readings))["shuffled"])
    got = view(api.url, "C-sum")
    for device, rows in readings.items():
        energies = [h.energy_wh or 0.0 for _, h in sorted(got[device].items())]
        assert sum(energies) == pytest.approx(total_rise(rows), abs=0.1), device
        assert min(energies) >= 0, device
    # 60 days of steady 15-minute readings: every hour 1,000 Wh, as the register says.
    start = NOW_HOUR - timedelta(days=62) + timedelta(minutes=7)
    rows = [(start + timedelta(minutes=15 * i), 1_000_000.0 + 250.0 * i) for i in range(60 * 96)]
    send_as(api, "C-60d", [items_of({"m": rows})[i : i + 500] for i in range(0, len(rows), 500)])
    maintain(api.url)
    got = view(api.url, "C-60d")["m"]
    assert sum(h.energy_wh or 0 for h in got.values()) == pytest.approx(total_rise(rows), abs=0.1)
    inner = [h.energy_wh for b, h in got.items() if hour_of(rows[0][0]) < b < hour_of(rows[-1][0])]
    assert inner and all(e == pytest.approx(1000.0, abs=1e-6) for e in inner)


def test_a_meter_replaced_mid_hour_counts_from_zero(api: IngestClient) -> None:
    hour = NOW_HOUR - timedelta(days=2)
    rows = [(hour + timedelta(minutes=10), 820_000.0), (hour + timedelta(minutes=20), 820_100.0)]
    rows += [(hour + timedelta(minutes=30), 50.0), (hour + timedelta(minutes=50), 150.0)]
    send_as(api, "C-swap", [items_of({"m": rows})])
    got = view(api.url, "C-swap")["m"]
    assert got[hour].energy_wh == pytest.approx(100 + 50 + 100)


def test_extreme_finite_values_never_fail_the_batch(api: IngestClient) -> None:
    hour = NOW_HOUR - timedelta(days=1)
    big, tiny = sys.float_info.max, 5e-324
    items = [
        m(hour + timedelta(minutes=1), device="huge", power=1.7e308, energy_wh=-big),
        m(hour + timedelta(minutes=2), device="huge", power=1.7e308, energy_wh=big),
        m(hour + timedelta(minutes=3), device="huge", power=big, energy_wh=-big),
        m(hour + timedelta(minutes=4), device="huge", power=big, energy_wh=big),
        m(hour + timedelta(minutes=1), device="tiny", power=tiny, energy_wh=tiny),
        m(hour + timedelta(minutes=2), device="tiny", power=-tiny, energy_wh=2 * tiny),
        m(hour + timedelta(hours=3), device="tiny", power=tiny, energy_wh=3 * tiny),
    ]
    first = api.post("measurements", items[:2])
    assert first.status == 200 and first.body["accepted"] == 2, first.body
    # More rows into the same hours, in and out of order: merged and recomputed.
    again = api.post("measurements", [items[3], items[2], *items[4:]])
    assert again.status == 200 and again.body["accepted"] == 5, again.body
    rows = api.sql(
        "SELECT device_id, bucket, sample_count, avg_power_w, max_power_w, energy_wh FROM fleet.hourly_per_device"
        " ORDER BY device_id, bucket"
    )
    huge = [r for r in rows if r[0] == "huge"]
    assert huge == [("huge", hour, 4, pytest.approx(1.7e308 / 2 + big / 2, rel=1e-9), big, big)]
    tiny_rows = [r for r in rows if r[0] == "tiny"]
    assert [r[2] for r in tiny_rows] == [2, 0, 0, 1]
    assert all(r[5] is not None and 0 <= r[5] < 1e-300 for r in tiny_rows)


# --- late rows and the real-time view (timescale) --------------------------------------------


def _hour_count(api: IngestClient, device: str, hour: datetime) -> int:
    rows = api.sql(
        "SELECT sample_count FROM fleet.hourly_per_device WHERE device_id = %s AND bucket = %s", device, hour
    )
    return int(rows[0][0]) if rows else 0


def test_a_row_in_the_current_hour_is_seen_at_once_before_and_after_maintenance(
    api: IngestClient, admin_profile: str
) -> None:
    from fleet.schema.profiles import ProfileSettings, apply_profile

    with psycopg.connect(api.url, autocommit=True) as conn:
        apply_profile(conn, admin_profile, ProfileSettings())  # type: ignore[arg-type]
    now = datetime.now(UTC)
    hour = hour_of(now)

    def at(share: float) -> datetime:  # a time between the hour's start and now
        return hour + (now - hour) * share

    assert api.post("measurements", [m(at(0.2), device="live")]).body["accepted"] == 1
    assert _hour_count(api, "live", hour) == 1
    # A replay reaching from 40 days back to now queues a range that ends after now.
    replay = [m(now - timedelta(days=40) + timedelta(minutes=i), device="replay") for i in range(5)]
    replay.append(m(at(0.4), device="replay"))
    assert api.post("measurements", replay).body["accepted"] == 6
    maintain(api.url)
    assert _hour_count(api, "live", hour) == 1
    assert _hour_count(api, "replay", hour) == 1
    assert api.post("measurements", [m(at(0.6), device="live")]).body["accepted"] == 1
    assert _hour_count(api, "live", hour) == 2
    maintain(api.url)
    assert _hour_count(api, "live", hour) == 2
    old = api.sql(
        "SELECT sum(sample_count) FROM fleet.hourly_per_device WHERE device_id = 'replay' AND bucket < %s",
        now - timedelta(days=30),
    )
    assert old == [(5,)]


def wait_for(check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)
