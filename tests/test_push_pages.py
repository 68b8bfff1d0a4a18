"""The push's pages: the JSON of the fast path is exactly what PostgreSQL's own JSON
functions write for the same rows, and a page the fast path cannot vouch for is
written value by value, exactly as well, whatever the values hold.

The oracle is ``json_build_object`` over the same rows, computed here in SQL,
independently of the code under test.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from fleet.push import source as push_source
from fleet.push.codec import TEXT_SETTINGS, MeasurementPage
from fleet.push.cursor import START, XID_START, Cursor

COLUMNS = "time, device_id, power_w, voltage_v, current_a, energy_wh, power_factor, frequency_hz"


def _oracle(conn: psycopg.Connection, phase: str, limit: int, after: Cursor) -> list[Any]:
    order = "time, device_id" if phase == "legacy" else "push_xid, time, device_id"
    where = "push_xid IS NULL" if phase == "legacy" else "push_xid IS NOT NULL"
    key = "(time, device_id)" if phase == "legacy" else "(push_xid, time, device_id)"
    bound = "(%(time)s::timestamptz, %(device)s)" if phase == "legacy" else "(%(xid)s::xid8, %(time)s, %(device)s)"
    row = conn.execute(
        f"SELECT json_agg(j) FROM (SELECT json_build_object('time', time, 'device_id', device_id,"
        " 'power_w', power_w, 'voltage_v', voltage_v, 'current_a', current_a, 'energy_wh', energy_wh,"
        " 'power_factor', power_factor, 'frequency_hz', frequency_hz) AS j"
        f" FROM monitoring.power_measurements WHERE {where} AND {key} > {bound}"
        f" ORDER BY {order} LIMIT %(limit)s) page",
        {"xid": str(after.xid), "time": after.time, "device": after.device, "limit": limit},
    ).fetchone()
    assert row is not None
    return row[0] or []  # json comes back decoded


def _write(conn: psycopg.Connection, rows: list[tuple[Any, ...]]) -> None:
    """One transaction: one push_xid, so the rows make one page of their own."""
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(f"INSERT INTO monitoring.power_measurements ({COLUMNS}) VALUES ({', '.join(['%s'] * 8)})", rows)


def _row(time: str, device: str, *metrics: Any) -> tuple[Any, ...]:
    values = list(metrics) + [None] * (6 - len(metrics))
    return (time, device, *values)


PLAIN = [
    _row("2026-11-01T00:00:00Z", "meter-1", 101.37, 230.1, 1.61, 1000001.5, 0.91, 50.01),
    _row("2026-11-01T00:00:00.5Z", "meter 2", 1e300, 1e-7, -0.0, 123456789012345678, 0.1 + 0.2, 49.99),
    _row("2026-11-01T00:00:01.000001+02:00", "Zähler-3", None, 230.0, None, 5.0),  # NULLs, another offset
    _row("2026-11-01T00:00:02Z", "メーター4", 1.0),
    _row("2026-11-01T00:00:03Z", "a\u2028b\u0085c"),  # line breaks JSON leaves alone (and splitlines would not)
    _row("1999-01-01T00:00:00Z", "old:ONE", 7.25),  # capitals in a device id, no NULL among them
    _row("0999-06-30T23:59:59.999999Z", "INV-9", 3.5, None),
]

# Each needs something only PostgreSQL's JSON writes right, or a word the fast path
# would take for a value.
SLOW = {
    "quote": [_row("2026-11-02T00:00:00Z", 'meter "7"', 1.0)],
    "backslash": [_row("2026-11-02T00:00:00Z", "meter\\7", 1.0)],
    "tab and newline": [_row("2026-11-02T00:00:00Z", "meter\t7\n", 1.0)],
    "control character": [_row("2026-11-02T00:00:00Z", "meter\x017", 1.0)],
    "device named None": [_row("2026-11-02T00:00:00Z", "None", None)],
    "device named NaN": [_row("2026-11-02T00:00:00Z", "x:NaN", 2.0)],
    "device named Infinity": [_row("2026-11-02T00:00:00Z", "Infinity", 2.0)],
    "BC timestamp": [_row("0044-03-15T00:00:00Z BC", "meter-1", 1.0)],
    "infinite timestamp": [_row("infinity", "meter-1", 1.0)],
}

# Values the fast path writes itself, as PostgreSQL does: quoted.
NOT_FINITE = [
    _row("2026-11-03T00:00:00Z", "meter-1", float("nan"), float("inf"), float("-inf"), None, 1.0),
]


def _page_and_oracle(url: str, rows: list[tuple[Any, ...]]) -> tuple[MeasurementPage, list[Any]]:
    """Write ``rows`` as the only rows of a fresh transaction and read them as one page."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM monitoring.power_measurements")
        _write(conn, rows)
        page = push_source.read_measurements(conn, XID_START, len(rows))
        return page, _oracle(conn, "xid", len(rows), XID_START)


def test_the_fast_path_writes_what_postgresql_writes(client_db: str) -> None:
    page, oracle = _page_and_oracle(client_db, PLAIN)
    assert page.count == len(PLAIN)
    assert page.vouched  # the fast path ran
    assert json.loads(page.body()) == {"items": oracle}


def test_nan_and_infinity_are_written_as_postgresql_writes_them(client_db: str) -> None:
    page, oracle = _page_and_oracle(client_db, NOT_FINITE)
    assert page.vouched
    item = json.loads(page.body())["items"][0]
    assert item == oracle[0]
    assert (item["power_w"], item["voltage_v"], item["current_a"]) == ("NaN", "Infinity", "-Infinity")


@pytest.mark.parametrize("case", sorted(SLOW))
def test_values_the_fast_path_cannot_vouch_for_are_written_exactly(client_db: str, case: str) -> None:
    rows = PLAIN[:2] + SLOW[case]
    page, oracle = _page_and_oracle(client_db, rows)
    assert page.count == len(rows)
    assert not page.vouched
    assert json.loads(page.body()) == {"items": oracle}


def _allow_null_keys(url: str) -> None:
    """As a portal table older than the migration may."""
    with psycopg.connect(url, autocommit=True) as conn:
        for column in ("time", "device_id"):
            conn.execute(f"ALTER TABLE monitoring.power_measurements ALTER COLUMN {column} DROP NOT NULL")


NULL_KEYS = [_row("2026-11-04T00:00:00Z", None, 1.0), _row(None, "meter-9", 2.0)]  # type: ignore[arg-type]


def test_a_null_time_or_device_is_written_as_null(client_db: str) -> None:
    """The row goes to the server, which rejects it with a reason, rather than being
    dropped here."""
    _allow_null_keys(client_db)
    page, oracle = _page_and_oracle(client_db, [*PLAIN[:2], *NULL_KEYS])
    assert not page.vouched
    items = json.loads(page.body())["items"]
    assert items == oracle
    assert [(i["time"], i["device_id"]) for i in items[-2:]] == [("2026-11-04T00:00:00+00:00", None), (None, "meter-9")]


@pytest.mark.parametrize("ends_on", ["null device", "null time"])
def test_reading_on_from_a_row_without_a_key_goes_on_after_it(client_db: str, ends_on: str) -> None:
    """A page that ends on a row with a NULL time or device id: the next read goes on
    with the next transaction's rows, skipping none, and (no keyed row shares the
    NULL-keyed rows' times here) sending none of the earlier rows again."""
    _allow_null_keys(client_db)
    with psycopg.connect(client_db, autocommit=True) as conn:
        _write(conn, PLAIN[:2])
        _write(conn, [PLAIN[2], *NULL_KEYS])  # NULLs sort last: PLAIN[2], null device, null time
        _write(conn, PLAIN[3:5])
        every = [(i["time"], i["device_id"]) for i in _oracle(conn, "xid", 100, XID_START)]
        size = 4 if ends_on == "null device" else 5
        with push_source.MeasurementReader(conn, XID_START, 100) as reader:
            page = reader.page(size)
        assert None in _keys([page])[-1]
        with push_source.MeasurementReader(conn, page.cursor, 100) as reader:
            after = reader.page(100)
        assert _keys([after]) == every[5:]  # the next transaction's rows, none again


def test_the_cursor_is_the_key_of_the_last_row(client_db: str) -> None:
    with psycopg.connect(client_db, autocommit=True) as conn:
        _write(conn, PLAIN)
        first = push_source.read_measurements(conn, XID_START, 3)
        rest = push_source.read_measurements(conn, first.cursor, 100)
        last = conn.execute(
            "SELECT push_xid::text, time, device_id FROM monitoring.power_measurements"
            " ORDER BY push_xid, time, device_id OFFSET 2 LIMIT 1"
        ).fetchone()
        assert last is not None
        assert (str(first.cursor.xid), first.cursor.device) == (last[0], last[2])
        assert conn.execute("SELECT %s::timestamptz = %s", (first.cursor.time, last[1])).fetchone() == (True,)
        both = json.loads(first.body())["items"] + json.loads(rest.body())["items"]
        assert both == _oracle(conn, "xid", 100, XID_START)  # nothing skipped, nothing twice


def test_legacy_rows_and_newer_rows_share_a_page_in_order(client_db: str) -> None:
    with psycopg.connect(client_db, autocommit=True) as conn:
        _write(conn, PLAIN[:4])
        conn.execute("UPDATE monitoring.power_measurements SET push_xid = NULL")  # as before the migration
        _write(conn, PLAIN[4:] + SLOW["quote"])
        page = push_source.read_measurements(conn, START, 100)
        assert not page.vouched  # the quote
        expected = _oracle(conn, "legacy", 100, START) + _oracle(conn, "xid", 100, XID_START)
        assert json.loads(page.body())["items"] == expected
        assert page.cursor.phase == "xid"


def test_a_session_with_other_formats_still_gets_rfc_3339_and_exact_floats(client_db: str) -> None:
    """A role's own DateStyle, TimeZone or extra_float_digits must not leak into the body."""
    with psycopg.connect(client_db, autocommit=True) as conn:
        _write(conn, PLAIN)
        conn.execute("SET DateStyle = 'SQL, DMY'")
        conn.execute("SET TimeZone = 'America/St_Johns'")
        conn.execute("SET extra_float_digits = -3")
        page = push_source.read_measurements(conn, XID_START, 100)
        items = json.loads(page.body())["items"]
        conn.execute("RESET ALL")
        assert items == _oracle(conn, "xid", 100, XID_START)
        by_device = {item["device_id"]: item for item in items}
        assert by_device["meter-1"]["time"] == "2026-11-01T00:00:00+00:00"
        assert by_device["Zähler-3"]["time"] == "2026-10-31T22:00:01.000001+00:00"
        assert by_device["meter 2"]["voltage_v"] == 1e-7 and by_device["meter 2"]["power_factor"] == 0.30000000000000004


def test_a_session_already_in_utc_and_iso_is_left_as_it_is(client_db: str) -> None:
    """Nothing is set where nothing differs: a changed TimeZone or DateStyle is
    reported to the client, and a pooling proxy may pin the connection for it."""
    with psycopg.connect(client_db, autocommit=True) as conn:
        _write(conn, PLAIN)
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute("SET DateStyle = 'ISO, DMY'")
        with conn.transaction():
            conn.execute(TEXT_SETTINGS)
            changed = conn.execute(
                "SELECT current_setting('TimeZone'), current_setting('DateStyle'), current_setting('extra_float_digits')"
            ).fetchone()
        assert changed == ("UTC", "ISO, DMY", "1")
        conn.execute("SET TimeZone = 'Asia/Kolkata'")
        with conn.transaction():
            conn.execute(TEXT_SETTINGS)
            assert conn.execute("SELECT current_setting('TimeZone')").fetchone() == ("UTC",)
        assert conn.execute("SELECT current_setting('TimeZone')").fetchone() == (
            "Asia/Kolkata",
        )  # for the transaction only
        items = json.loads(push_source.read_measurements(conn, XID_START, 100).body())["items"]
        conn.execute("SET TimeZone = 'UTC'")  # the oracle's own text follows the session's zone
        assert items == _oracle(conn, "xid", 100, XID_START)


# --- the reader: one snapshot, streamed, handed out in pages ---------------------------


def _keys(pages: list[MeasurementPage]) -> list[tuple[str, str]]:
    return [(item["time"], item["device_id"]) for page in pages for item in json.loads(page.body())["items"]]


def _all_pages(reader: push_source.MeasurementReader, size: int) -> list[MeasurementPage]:
    pages = []
    while (page := reader.page(size)).count:
        pages.append(page)
    return pages


def test_a_reader_hands_out_every_row_once_in_order_across_pages_and_phases(client_db: str) -> None:
    with psycopg.connect(client_db, autocommit=True) as conn:
        _write(conn, PLAIN[:5])
        conn.execute("UPDATE monitoring.power_measurements SET push_xid = NULL")  # as before the migration
        _write(conn, PLAIN[5:])
        _write(conn, NOT_FINITE)
        with push_source.MeasurementReader(conn, START, 100) as reader:
            pages = _all_pages(reader, 3)
        expected = _oracle(conn, "legacy", 100, START) + _oracle(conn, "xid", 100, XID_START)
        assert [p.count for p in pages] == [3, 3, 2]  # the legacy tail and the newer rows share a page
        assert [item for p in pages for item in json.loads(p.body())["items"]] == expected
        # Each page's cursor is the key of its last row: a new reader from it goes on
        # with the row after (none after the last).
        for page, following in zip(pages, [*pages[1:], None], strict=True):
            with push_source.MeasurementReader(conn, page.cursor, 1) as reader:
                after = reader.page(1)
            assert _keys([after]) == (_keys([following])[:1] if following else [])


def test_a_reader_reads_one_snapshot(client_db: str) -> None:
    """Rows committed while a tick reads are the next tick's, as the horizon says."""
    with psycopg.connect(client_db, autocommit=True) as conn, psycopg.connect(client_db, autocommit=True) as writer:
        _write(conn, PLAIN)
        with push_source.MeasurementReader(conn, XID_START, 100) as reader:
            first = reader.page(2)
            _write(writer, [_row("2026-11-05T00:00:00Z", "meter-new", 1.0)])
            rest = _all_pages(reader, 100)
        assert first.count + sum(p.count for p in rest) == len(PLAIN)
        with push_source.MeasurementReader(conn, rest[-1].cursor, 100) as reader:
            assert _keys([reader.page(100)]) == [("2026-11-05T00:00:00+00:00", "meter-new")]


def test_rows_handed_back_are_handed_out_again_first(client_db: str) -> None:
    with psycopg.connect(client_db, autocommit=True) as conn:
        _write(conn, PLAIN)
        with push_source.MeasurementReader(conn, XID_START, 100) as reader:
            taken = [reader.page(3), reader.page(3)]
            reader.give_back(taken[0].rows + taken[1].rows)  # as after a 413
            smaller = reader.page(2)
            reader.give_back(smaller.rows)  # a 413 again: before the rows still waiting
            again = _all_pages(reader, 2)
        assert [p.count for p in again] == [2, 2, 2, 1]
        assert _keys(again) == [(i["time"], i["device_id"]) for i in _oracle(conn, "xid", 100, XID_START)]
        assert again[2].cursor == taken[1].cursor  # the sixth row's key, as before


def test_max_rows_bounds_what_a_reader_reads(client_db: str) -> None:
    with psycopg.connect(client_db, autocommit=True) as conn:
        _write(conn, PLAIN)
        with push_source.MeasurementReader(conn, XID_START, 5) as reader:
            assert [reader.page(3).count, reader.page(3).count, reader.page(3).count] == [3, 2, 0]


@pytest.mark.parametrize(("max_rows", "taken", "cancels"), [(7, 7, 0), (4, 4, 0), (100, 4, 1)])
def test_a_statement_is_cancelled_only_when_rows_it_may_return_are_left(
    client_db: str, monkeypatch: pytest.MonkeyPatch, max_rows: int, taken: int, cancels: int
) -> None:
    """A tick that took every row its statement may return reads the statement's end;
    only one that stops early (a failed batch, the time budget) asks the server to
    stop, which takes a connection of its own."""
    requests: list[int] = []
    cancel = psycopg.Connection.cancel_safe
    monkeypatch.setattr(psycopg.Connection, "cancel_safe", lambda self, **kw: (requests.append(1), cancel(self, **kw)))
    with psycopg.connect(client_db, autocommit=True) as conn:
        _write(conn, PLAIN)
        with push_source.MeasurementReader(conn, XID_START, max_rows) as reader:
            assert reader.page(taken).count == taken
        assert len(requests) == cancels
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection is ready for the next statement


def _terminate(url: str, pid: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


@pytest.mark.parametrize("rows", [7, 100_000])
def test_a_read_interrupted_once_rows_were_handed_out_ends_there(client_db: str, rows: int) -> None:
    """Its session ended (a lost connection, an idle-in-transaction timeout) after the
    statement had sent everything (7 rows), or while it still ran (100,000 rows, more
    than the sockets hold): the rows already received are handed out, in order, and
    the reader ends without raising."""
    with psycopg.connect(client_db, autocommit=True, options="-c TimeZone=UTC") as conn:
        if rows == len(PLAIN):
            _write(conn, PLAIN)
        else:
            conn.execute(
                "INSERT INTO monitoring.power_measurements (time, device_id, power_w)"
                " SELECT '2026-01-01T00:00:00Z'::timestamptz + make_interval(secs => g), 'meter-1', g"
                " FROM generate_series(1, %s) g",
                (rows,),
            )
        expected = [
            (t.replace(" ", "T") + ":00", d)
            for t, d in conn.execute(
                "SELECT time::text, device_id FROM monitoring.power_measurements ORDER BY push_xid, time, device_id"
            )
        ]
    with psycopg.connect(client_db, autocommit=True) as conn:
        with push_source.MeasurementReader(conn, XID_START, rows) as reader:
            pages = [reader.page(3)]
            _terminate(client_db, conn.info.backend_pid)
            pages += _all_pages(reader, 5000)
        assert isinstance(reader.interrupted_by, psycopg.OperationalError)
        handed = _keys(pages)
        assert handed == expected[: len(handed)]
        if rows == len(PLAIN):
            assert len(handed) == rows
        else:
            assert len(handed) < rows  # ended while the statement ran


def test_a_read_that_fails_before_any_row_raises(client_db: str) -> None:
    with psycopg.connect(client_db, autocommit=True) as conn:
        _write(conn, PLAIN)
        with (  # noqa: PT012 - the failure is the read's
            pytest.raises(psycopg.OperationalError),
            push_source.MeasurementReader(conn, XID_START, 100) as reader,
        ):
            _terminate(client_db, conn.info.backend_pid)
            reader.page(3)
