"""``fleet status``: its rows and late figures count measurement rows only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from fleet import customers
from fleet_local.status import fleet_status


def test_rows_and_late_count_measurements_only(admin_db_postgres: str) -> None:
    with psycopg.connect(admin_db_postgres, autocommit=True) as conn:
        customers.create(conn, "DEV0001", "Dev")
        conn.execute(
            "INSERT INTO fleet.ingest_events (customer_id, batch_type, accepted, status, min_time)"
            " VALUES ('DEV0001', 'measurements', 40, 200, now() - interval '2 days'),"
            "        ('DEV0001', 'measurements', 60, 200, now()),"
            "        ('DEV0001', 'sites', 7, 200, NULL),"
            "        ('DEV0001', 'devices', 9, 200, NULL),"
            "        ('DEV0001', 'digests', 11, 200, now() - interval '2 days')"
        )
        conn.execute(
            "INSERT INTO fleet.ingest_events (customer_id, batch_type, accepted, status, received_at)"
            " VALUES ('DEV0001', 'measurements', 500, 200, now() - interval '3 hours'),"
            "        ('DEV0001', 'sites', 3, 200, now() - interval '3 hours')"
        )
        (row,) = fleet_status(conn)
    assert (row["rows_1h"], row["rows_1d"], row["late_1d"]) == (100, 600, 40)


@pytest.mark.parametrize(
    ("at", "change"),
    [
        # Europe/Berlin springs forward at 01:00 UTC on 29 March 2026 (a 23-hour
        # calendar day) and falls back at 01:00 UTC on 25 October 2026 (25 hours).
        (datetime(2026, 3, 29, 12, 0, tzinfo=UTC), "spring forward"),
        (datetime(2026, 10, 25, 12, 0, tzinfo=UTC), "fall back"),
    ],
    ids=["spring-forward", "fall-back"],
)
def test_the_day_window_is_24_hours_across_a_daylight_saving_change(
    admin_db_postgres: str, at: datetime, change: str
) -> None:
    with psycopg.connect(admin_db_postgres, autocommit=True) as conn:
        customers.create(conn, "DEV0001", "Dev")
        conn.execute("SET TIME ZONE 'Europe/Berlin'")
        events = [
            (at - timedelta(hours=23, minutes=30), 10, 200),  # inside 24 h
            (at - timedelta(hours=24, minutes=30), 1000, 200),  # outside 24 h
            (at - timedelta(hours=23, minutes=30), 0, 413),
            (at - timedelta(hours=24, minutes=30), 0, 413),
        ]
        for received_at, accepted, status in events:
            conn.execute(
                "INSERT INTO fleet.ingest_events (customer_id, batch_type, accepted, status, received_at, min_time)"
                " VALUES ('DEV0001', 'measurements', %s, %s, %s, %s)",
                (accepted, status, received_at, received_at),
            )
        (row,) = fleet_status(conn, at=at)
    assert (row["rows_1d"], row["refused_1d"]) == (10, 1), f"{change}: {row}"
