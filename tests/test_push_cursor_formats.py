"""The push's cursor carries its format version: every format the push ever wrote is
read, and a cursor it cannot read (from its own state or from the server's ledger)
falls back to the ledger, then to the start, loudly, and never stalls the push.

Against the real ingest over local HTTP and a real Client database (test_push's
fixtures); DynamoDB from moto."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from fleet.ingest.store import ledger
from fleet.observability import metrics
from fleet.push.cursor import START, XID_START, Cursor, UnreadableCursor, furthest
from support import Clock, drain, make_push_service
from test_push import Admin, client_rows, insert
from test_push import admin as admin  # a fixture (the "as" re-exports it)

# --- the formats ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cursor"),
    [
        # Format 1, as the first push wrote it (the byte layout is kept for ever).
        ('{"v":1,"p":"legacy","x":"0","t":"-infinity","d":""}', START),
        ('{"v":1,"p":"xid","x":"0","t":"-infinity","d":""}', XID_START),
        (
            '{"v":1,"p":"xid","x":"9007199254740993","t":"2026-11-27 10:00:00.123456+00","d":"meter \\"7\\""}',
            Cursor("xid", 9007199254740993, "2026-11-27 10:00:00.123456+00", 'meter "7"'),
        ),
        ("", START),
        (None, START),
    ],
)
def test_every_format_the_push_ever_wrote_is_read(text: str | None, cursor: Cursor) -> None:
    assert Cursor.decode(text) == cursor


def test_the_current_format_carries_its_version_and_reads_back() -> None:
    cursor = Cursor("xid", 42, "2026-11-27 10:00:00+00", "d\u00e9vice")
    assert f'"v":{Cursor.FORMAT}' in cursor.encode()
    assert Cursor.decode(cursor.encode()) == cursor


@pytest.mark.parametrize(
    "text",
    [
        "cur\x00sor",
        "not json",
        "[1]",
        '{"v":2,"p":"xid","x":"1","t":"-infinity","d":""}',  # a format from a later version
        '{"p":"xid","x":"1","t":"-infinity","d":""}',
        '{"v":1,"p":"sideways","x":"1","t":"-infinity","d":""}',
        '{"v":1,"p":"xid","x":"-1","t":"-infinity","d":""}',
        '{"v":1,"p":"xid","x":"1","t":"yesterday; DROP TABLE x","d":""}',
        '{"v":1,"p":"xid","x":"1","t":"-infinity","d":"a\\u0000b"}',
    ],
)
def test_a_cursor_in_no_known_format_is_unreadable_not_the_start(text: str) -> None:
    with pytest.raises(UnreadableCursor):
        Cursor.decode(text)


# --- never stuck: the ledger, then the start ------------------------------------------


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the metrics added from here on (the in-process ingest flushes the
    shared metric set after each request, so the set itself cannot be read)."""
    names: list[str] = []
    real: Callable[..., None] = metrics.add_metric

    def add_metric(*, name: str, **rest: Any) -> None:
        names.append(name)
        real(name=name, **rest)

    monkeypatch.setattr(metrics, "add_metric", add_metric)
    return names


def _damage_state(table: Any, text: str) -> None:
    table.update_item(
        Key={"resource": "measurements"},
        UpdateExpression="SET #c = :c",
        ExpressionAttributeNames={"#c": "cursor"},
        ExpressionAttributeValues={":c": text},
    )


def _sent_again(server: Admin) -> int:
    return int(server.one("SELECT sum(duplicates) FROM fleet.ingest_events WHERE batch_type = 'measurements'"))


@pytest.mark.parametrize("damage", ["cur\x00sor", '{"v":99}'], ids=["damaged", "unknown-format"])
def test_an_unreadable_state_cursor_resumes_from_the_ledger_loudly(
    aws: Any, admin: Admin, client_db: str, damage: str, counted: list[str]
) -> None:
    insert(client_db, 300)
    clock = Clock()
    service = make_push_service(client_db, aws, admin.server_url, admin.token, clock, batch_size=50, max_batches=2)
    service.tick()
    assert len(admin.rows()) == 100
    _damage_state(aws, damage)
    service.tick()
    assert "PushCursorUnreadable" in counted
    assert "PushCursorReset" not in counted
    drain(service, clock)
    assert admin.rows() == client_rows(client_db)
    assert _sent_again(admin) == 0  # resumed where the server had acknowledged


def test_an_unreadable_cursor_in_the_ledger_too_starts_over_and_loses_nothing(
    aws: Any, admin: Admin, client_db: str, counted: list[str]
) -> None:
    insert(client_db, 300)
    clock = Clock()
    service = make_push_service(client_db, aws, admin.server_url, admin.token, clock, batch_size=50, max_batches=2)
    service.tick()
    with_rows = len(admin.rows())
    admin.one("UPDATE fleet.ingest_events SET client_cursor = '{\"v\":99}' RETURNING 1")
    _damage_state(aws, "garbage")
    service.tick()
    assert {"PushCursorUnreadable", "PushCursorReset"} <= set(counted)
    drain(service, clock)
    assert admin.rows() == client_rows(client_db)
    assert _sent_again(admin) == with_rows  # from the start: sent again, harmlessly


def test_a_lost_state_with_an_unreadable_ledger_cursor_starts_over(
    aws: Any, admin: Admin, client_db: str, counted: list[str]
) -> None:
    insert(client_db, 120)
    clock = Clock()
    service = make_push_service(client_db, aws, admin.server_url, admin.token, clock, batch_size=50, max_batches=1)
    service.tick()
    admin.one("UPDATE fleet.ingest_events SET client_cursor = 'cur\u00e7or of another age' RETURNING 1")
    aws.delete_item(Key={"resource": "measurements"})
    drain(service, clock)
    assert "PushCursorReset" in counted
    assert admin.rows() == client_rows(client_db)


# --- the ledger's recent cursors: batches acknowledged out of order ---------------------


def _c(phase: str, xid: int, time: str, device: str = "m") -> str:
    return Cursor(phase, xid, time, device).encode()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("recent", "expected"),
    [
        # The last acknowledged is not the furthest: two batches in flight came back swapped.
        ([_c("xid", 7, "2026-04-01 10:00:00+00"), _c("xid", 9, "2026-04-01 09:00:00+00")], 1),
        ([_c("xid", 9, "2026-04-01 10:00:00+00"), _c("xid", 7, "2026-04-01 11:00:00+00")], 0),
        # The same transaction: by time, offsets taken into account.
        ([_c("xid", 9, "2026-04-01 12:00:00+02"), _c("xid", 9, "2026-04-01 11:00:00+00")], 1),
        # Every xid cursor is past every legacy one.
        ([_c("legacy", 0, "2026-04-01 10:00:00+00"), _c("xid", 1, "-infinity")], 1),
        ([_c("legacy", 0, "infinity"), _c("legacy", 0, "2026-04-01 10:00:00+00")], 0),
        # A tie: the ledger's order decides (its last).
        ([_c("xid", 9, "2026-04-01 10:00:00+00", "b"), _c("xid", 9, "2026-04-01 10:00:00+00", "a")], 0),
        # One that cannot be read or placed: the ledger's last, to be judged as before.
        ([_c("xid", 5, "2026-04-01 10:00:00+00"), "cur\x00sor", _c("xid", 9, "2026-04-01 10:00:00+00")], 0),
        ([_c("xid", 5, "2026-04-01 10:00:00+00"), _c("xid", 9, "0044-03-15 10:00:00+00 BC")], 0),
    ],
)
def test_the_furthest_of_the_recent_cursors_is_taken(recent: list[str], expected: int) -> None:
    assert furthest(recent) == recent[expected]


def test_no_recent_cursor_is_none() -> None:
    assert furthest([]) is None


def test_batches_acknowledged_out_of_order_resume_from_the_furthest(aws: Any, admin: Admin, client_db: str) -> None:
    """Two batches in flight at once whose audit rows came in the other order (the
    later batch's row first): the ledger's last is the earlier cursor, and the push,
    its state lost, resumes from the furthest of the recent ones: nothing is sent twice."""
    insert(client_db, 300)
    clock = Clock()
    service = make_push_service(client_db, aws, admin.server_url, admin.token, clock, batch_size=50, max_batches=2)
    service.tick()
    assert len(admin.rows()) == 100
    with psycopg.connect(admin.url, autocommit=True) as conn:
        (first, first_cursor), (second, second_cursor) = conn.execute(
            "SELECT id, client_cursor FROM fleet.ingest_events WHERE batch_type = 'measurements' ORDER BY id"
        ).fetchall()
        conn.execute(
            "UPDATE fleet.ingest_events SET client_cursor = CASE id WHEN %s THEN %s ELSE %s END WHERE id IN (%s, %s)",
            (first, second_cursor, first_cursor, first, second),
        )
        entry = ledger(conn, "DEV0001")["measurements"]
    assert entry["cursor"] == first_cursor  # the last row holds the earlier cursor
    assert entry["recent"] == [first_cursor, second_cursor]
    aws.delete_item(Key={"resource": "measurements"})
    drain(service, clock)
    assert admin.rows() == client_rows(client_db)
    assert _sent_again(admin) == 0
