"""``fleet status``: its rows and late figures count measurement rows only."""

from __future__ import annotations

import psycopg
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
