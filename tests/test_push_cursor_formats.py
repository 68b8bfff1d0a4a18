"""The push's cursor carries its format version: every format the push ever wrote is
read, and a cursor it cannot read (from its own state or from the server's ledger)
falls back to the ledger, then to the start, loudly, and never stalls the push.

Against the real ingest over local HTTP and a real Client database (test_push's
fixtures); DynamoDB from moto."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fleet.observability import metrics
from fleet.push.cursor import START, XID_START, Cursor, UnreadableCursor
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
