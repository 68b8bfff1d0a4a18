"""The binary array encoders of the ingest: what PostgreSQL reads back from them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
from fleet.ingest.arrays import Float8Array, TextArray, TimestamptzArray


def _read(pg_server: Any, query: str, value: bytes) -> list[object]:
    with psycopg.connect(pg_server.base_url) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        row = conn.execute(query, (value,)).fetchone()
        assert row is not None
        return row[0]


def test_text_arrays_hold_repeats_nulls_and_any_text(pg_server: Any) -> None:
    values = ["meter-1", "Zähler 2", "meter-1", None, "", "メーター", "meter-1", None, 'a\tb\\c"d']
    assert _read(pg_server, "SELECT %b::text[]", TextArray.of(values)) == values
    assert _read(pg_server, "SELECT %b::text[]", TextArray.of([])) == []


def test_float8_arrays_with_and_without_nulls(pg_server: Any) -> None:
    full = [0.0, -0.0, 1e300, 5e-324, 0.1 + 0.2, -7.25]
    assert _read(pg_server, "SELECT %b::float8[]", Float8Array.of(full)) == full
    holes = [1.5, None, 2.5, None]
    assert _read(pg_server, "SELECT %b::float8[]", Float8Array.of(holes)) == holes


def test_timestamptz_arrays_keep_the_instant_whatever_the_offset(pg_server: Any) -> None:
    plus_two = timezone(timedelta(hours=2))
    values = [
        datetime(2026, 11, 27, 5, 0, 0, 123456, tzinfo=UTC),
        datetime(2026, 11, 27, 7, 0, 0, tzinfo=plus_two),  # 05:00 UTC
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # before PostgreSQL's epoch
        datetime(2000, 1, 1, tzinfo=UTC),  # on it
    ]
    got = _read(pg_server, "SELECT %b::timestamptz[]", TimestamptzArray.of(values))
    assert got == values
