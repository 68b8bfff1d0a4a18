"""Data access for the ingest: token lookup, the batch write, the audit trail,
the quarantine and the ledger. Every statement is parameterised; rows travel as
arrays through ``unnest`` (one round trip per batch, no server-side prepared
statements, no temporary tables: nothing that pins an RDS Proxy session). Arrays go in
binary format (fleet.ingest.arrays for the measurements' columns), which PostgreSQL reads
without parsing: faster, by the benchmark, than text arrays or handing it the JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import psycopg

from fleet.db import classify
from fleet.errors import BatchTooLarge, DatabaseUnavailable
from fleet.ingest.arrays import Float8Array, TextArray, TimestamptzArray
from fleet.ingest.descriptions import upsert_devices, upsert_sites
from fleet.ingest.digests import compare_digests
from fleet.ingest.records import AuditRecord, TokenOwner, WriteOutcome, recovered, storable
from fleet.models import MEASUREMENT_FIELDS, BatchType, Device, Measurement, Site

# Halving costs about 2k log2(n) statements for k refused items of n; past this many
# the request is answered 413 (the client halves its batch, and each half is cheaper
# to search) rather than running into the function's timeout.
MAX_PART_ATTEMPTS = 512  # a header value; API Gateway refuses larger headers anyway


def find_token_owner(conn: psycopg.Connection, token_sha256: bytes) -> TokenOwner | None:
    """The customer of a live token (not revoked, not expired), by its hash."""
    row = conn.execute(
        "SELECT c.id, c.status FROM fleet.customer_tokens t"
        " JOIN fleet.customers c ON c.id = t.customer_id"
        " WHERE t.token_sha256 = %s AND t.revoked_at IS NULL"
        " AND (t.expires_at IS NULL OR t.expires_at > now())",
        (token_sha256,),
    ).fetchone()
    return TokenOwner(row[0], row[1]) if row else None


def _timeouts(conn: psycopg.Connection, statement_timeout_ms: int) -> None:
    # Transaction-local: set_config(..., true) ends with the transaction, so the
    # pooled session is left as it was.
    conn.execute(
        "SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true)",
        (f"{statement_timeout_ms}ms", f"{max(statement_timeout_ms // 2, 1)}ms"),
    )


class IngestStore:
    """Writes one batch per transaction on a connection it is handed."""

    def __init__(self, statement_timeout_ms: int = 20_000, refresh_window: timedelta = timedelta(days=30)):
        self.statement_timeout_ms = statement_timeout_ms
        self.refresh_window = refresh_window
        self._has_rollup: bool | None = None

    def has_rollup(self, conn: psycopg.Connection) -> bool:
        """postgres profile: the hourly state is a table the ingest keeps (in the
        timescale profile it is the continuous aggregate; before the upgrade of
        007_hourly_state.postgres.sql, the table fleet.hourly_rollup).

        A property of the database, asked once per store (one store, one database)."""
        if self._has_rollup is None:
            row = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_class WHERE relkind = 'r'"
                " AND oid IN (to_regclass('fleet.hourly_state'), to_regclass('fleet.hourly_rollup')))"
            ).fetchone()
            self._has_rollup = bool(row and row[0])
        return self._has_rollup

    def write_batch(
        self,
        conn: psycopg.Connection,
        audit: AuditRecord,
        batch_type: BatchType,
        items: Sequence[Site | Device | Measurement],
        valid_total: int,
        token_sha256: bytes,
    ) -> WriteOutcome:
        """Rows, rollup, quarantine, audit row and last-seen, in one transaction.

        ``items`` are unique by key; ``valid_total`` counts the valid items the
        client sent, so repeats inside the batch are counted as duplicates.

        Pipelined: BEGIN, the timeouts and the insert reach the server in one round
        trip, the audit row in a second, the quarantine, the last-seen updates and
        COMMIT in a third (seven round trips before). The statements and their order
        are the same; only the waiting between them is gone."""
        with conn.pipeline(), conn.transaction():
            _timeouts(conn, self.statement_timeout_ms)
            outcome = self._rows(conn, audit.customer_id, batch_type, items)
            self._close_batch(conn, audit, outcome, valid_total - outcome.accepted, token_sha256)
        return outcome

    def write_parts(
        self,
        conn: psycopg.Connection,
        audit: AuditRecord,
        parts: Iterable[Sequence[Measurement]],
        token_sha256: bytes,
    ) -> WriteOutcome:
        """Measurements whose every item is valid, in one transaction as ``write_batch``
        writes them, handed over in parts: each part's insert is sent to the server as
        soon as the part is parsed, and the server inserts it while the next part is
        parsed. ``parts`` is consumed inside the transaction; whatever it raises rolls
        the transaction back and reaches the caller."""
        with conn.pipeline(), conn.transaction():
            _timeouts(conn, self.statement_timeout_ms)
            sent = [(len(part), self._send_measurements(conn, audit.customer_id, part)) for part in parts]
            total = WriteOutcome(0, 0)
            for count, cursor in sent:
                total = total.plus(_inserted(cursor, count))
            if total.accepted and not self.has_rollup(conn):
                assert total.min_time is not None and total.max_time is not None
                self._queue_stale_range(conn, total.min_time, total.max_time)
            self._close_batch(conn, audit, total, total.duplicates, token_sha256)
        return total

    def write_in_parts(
        self,
        conn: psycopg.Connection,
        audit: AuditRecord,
        batch_type: BatchType,
        items: Sequence[Site | Device | Measurement],
        valid_total: int,
        token_sha256: bytes,
        refuse: Callable[[list[tuple[int, str]]], None],
    ) -> WriteOutcome:
        """The batch again, after ``write_batch`` failed for a reason that is not a busy
        or unavailable database: halves under savepoints, down to the items that fail
        on their own, in one transaction with the audit row.

        ``refuse`` is handed (position in ``items``, reason) of each item the database
        refused, before the audit row is written, so the caller can add them to it. A
        busy or unavailable database on the way still fails the whole (429/503): nothing
        is refused for it. With k bad items of n this costs about 2k log2(n) statements;
        past ``MAX_PART_ATTEMPTS`` the whole is refused with a 413 (send smaller batches)."""
        failed: list[tuple[int, str]] = []
        with conn.transaction():
            _timeouts(conn, self.statement_timeout_ms)
            outcome = self._halving(conn, audit.customer_id, batch_type, items, failed)
            refuse(failed)
            self._close_batch(conn, audit, outcome, valid_total - outcome.accepted - len(failed), token_sha256)
        return outcome

    def _halving(
        self,
        conn: psycopg.Connection,
        customer_id: str,
        batch_type: BatchType,
        items: Sequence[Site | Device | Measurement],
        failed: list[tuple[int, str]],
    ) -> WriteOutcome:
        total = WriteOutcome(0, 0)
        todo = [(0, len(items))]
        attempts = 0
        while todo:
            lo, hi = todo.pop()
            attempts += 1
            if attempts > MAX_PART_ATTEMPTS:
                raise BatchTooLarge(
                    f"the database refused more items of this batch than it can look for in one request;"
                    f" send it in smaller batches ({len(failed)} refused in the first part)"
                )
            try:
                with conn.transaction():  # a savepoint
                    part = self._rows(conn, customer_id, batch_type, items[lo:hi])
            except Exception as exc:  # noqa: BLE001 - anything the data caused, judged below
                _raise_unless_the_data(conn, exc)
                if hi - lo == 1:
                    failed.append((lo, _refusal_reason(exc)))
                else:
                    mid = (lo + hi) // 2
                    todo += [(mid, hi), (lo, mid)]  # the first half first: items keep their order
                continue
            total = total.plus(part)
        failed.sort()
        return total

    def _rows(
        self,
        conn: psycopg.Connection,
        customer_id: str,
        batch_type: BatchType,
        items: Sequence[Site | Device | Measurement],
    ) -> WriteOutcome:
        if batch_type is BatchType.MEASUREMENTS:
            return self._measurements(conn, customer_id, items)  # type: ignore[arg-type]
        if batch_type is BatchType.DIGESTS:
            compared = compare_digests(conn, customer_id, items)
            return WriteOutcome(compared.compared, 0, differ=compared.differ)
        if batch_type is BatchType.SITES:
            return WriteOutcome(*upsert_sites(conn, customer_id, items))  # type: ignore[arg-type]
        return WriteOutcome(*upsert_devices(conn, customer_id, items))  # type: ignore[arg-type]

    def _close_batch(
        self, conn: psycopg.Connection, audit: AuditRecord, outcome: WriteOutcome, duplicates: int, token_sha256: bytes
    ) -> None:
        """The batch's outcome into its audit row, written with the last-seen updates."""
        audit.accepted, audit.duplicates = outcome.accepted, duplicates
        audit.min_time, audit.max_time = outcome.min_time, outcome.max_time
        _insert_audit(conn, audit)
        conn.execute(
            "UPDATE fleet.customers SET first_seen_at = coalesce(first_seen_at, now()),"
            " last_seen_at = now() WHERE id = %s",
            (audit.customer_id,),
        )
        conn.execute(
            "UPDATE fleet.customer_tokens SET last_used_at = now() WHERE token_sha256 = %s"
            " AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
            (token_sha256,),
        )

    def _measurements(self, conn: psycopg.Connection, customer_id: str, items: Sequence[Measurement]) -> WriteOutcome:
        """One call of fleet.insert_measurements (sql/admin/005_*, 007_*): columns as arrays."""
        if not items:
            return WriteOutcome(0, 0)
        outcome = _inserted(self._send_measurements(conn, customer_id, items), len(items))
        if outcome.accepted and not self.has_rollup(conn):
            assert outcome.min_time is not None and outcome.max_time is not None
            self._queue_stale_range(conn, outcome.min_time, outcome.max_time)
        return outcome

    def _send_measurements(
        self, conn: psycopg.Connection, customer_id: str, items: Sequence[Measurement]
    ) -> psycopg.Cursor[Any]:
        """The call, sent; its row (accepted, min_time, max_time) is read by ``_inserted``."""
        return conn.execute(
            "SELECT accepted, min_time, max_time FROM fleet.insert_measurements("
            "%s, %b::timestamptz[], %b::text[], %b::float8[], %b::float8[], %b::float8[], %b::float8[],"
            " %b::float8[], %b::float8[])",
            (
                customer_id,
                TimestamptzArray.of([m["time"] for m in items]),
                TextArray.of([m["device_id"] for m in items]),
                *(Float8Array.of([m.get(name) for m in items]) for name in MEASUREMENT_FIELDS),  # type: ignore[misc]
            ),
        )

    def _queue_stale_range(self, conn: psycopg.Connection, min_time: datetime, max_time: datetime) -> None:
        # TimescaleDB: rows older than the refresh policy's window are never
        # materialised by it; record their range for the maintenance refresh.
        conn.execute(
            "INSERT INTO fleet.hourly_refresh_queue (range_start, range_end)"
            " SELECT date_trunc('hour', %(min)s::timestamptz, 'UTC'),"
            "        date_trunc('hour', %(max)s::timestamptz, 'UTC') + interval '1 hour'"
            " WHERE %(min)s::timestamptz < now() - %(window)s::interval",
            {"min": min_time, "max": max_time, "window": self.refresh_window},
        )

    def record_refusal(self, conn: psycopg.Connection, audit: AuditRecord) -> None:
        """The audit row (and quarantined body) of a batch refused after authentication."""
        with conn.transaction():
            _timeouts(conn, self.statement_timeout_ms)
            _insert_audit(conn, audit)


def _inserted(cursor: psycopg.Cursor[Any], count: int) -> WriteOutcome:
    row = cursor.fetchone()
    assert row is not None
    accepted = int(row[0])
    return WriteOutcome(accepted, count - accepted, row[1], row[2])


def _raise_unless_the_data(conn: psycopg.Connection, exc: Exception) -> None:
    """Re-raise what says the database is busy or gone: no item is to blame for it."""
    if isinstance(exc, psycopg.Error):
        mapped = classify(exc)
        if mapped is not exc:
            raise mapped from exc
        if conn.broken or conn.closed:
            raise DatabaseUnavailable("the connection was lost while writing a batch") from exc


def _refusal_reason(exc: Exception) -> str:
    if isinstance(exc, psycopg.Error):
        return f"the database refused the item: [{exc.sqlstate}] {exc.diag.message_primary or type(exc).__name__}"
    return f"the item could not be stored: {type(exc).__name__}: {str(exc)[:200]}"


def _insert_audit(conn: psycopg.Connection, a: AuditRecord) -> int:
    row = conn.execute(
        "INSERT INTO fleet.ingest_events (customer_id, batch_type, batch_id, accepted, duplicates,"
        " rejected, bytes, decompressed_bytes, client_cursor, min_time, max_time, duration_ms,"
        " status, error) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (
            a.customer_id,
            storable(a.batch_type),
            a.batch_id,
            a.accepted,
            a.duplicates,
            a.rejected,
            a.bytes,
            a.decompressed_bytes,
            storable(a.client_cursor),
            a.min_time,
            a.max_time,
            a.duration_ms,
            a.status,
            storable(a.error, 1000),
        ),
    ).fetchone()
    assert row is not None
    event_id = int(row[0])
    if a.rejects:
        conn.execute(
            "INSERT INTO fleet.quarantine (ingest_event_id, customer_id, batch_type, item_index,"
            " reason, payload)"
            " SELECT %s, %s, %s, i, r, p FROM unnest(%s::int[], %b::text[], %b::text[]) AS u(i, r, p)",
            (
                event_id,
                a.customer_id,
                storable(a.batch_type),
                [r.index for r in a.rejects],
                # Binary: psycopg's text arrays escape each element with a regex.
                TextArray.of([storable(r.reason, 2000) for r in a.rejects]),
                TextArray.of_large([storable(r.payload, None) or "" for r in a.rejects]),
            ),
        )
    return event_id


# The acknowledged cursors the ledger lists besides the last: batches in flight at once
# are acknowledged in any order, so the last audit row need not hold the furthest
# cursor; the client, which knows its cursors' order, picks from these.
LEDGER_RECENT = 8


def ledger(conn: psycopg.Connection, customer_id: str) -> dict[str, dict[str, Any]]:
    """Per batch type, the last cursor the server acknowledged for this customer, and
    the ``LEDGER_RECENT`` last acknowledged, the last first."""
    out: dict[str, dict[str, Any]] = {}
    for batch_type in BatchType:
        rows = conn.execute(
            "SELECT client_cursor, batch_id, received_at FROM fleet.ingest_events"
            " WHERE customer_id = %s AND batch_type = %s AND status = 200"
            " ORDER BY id DESC LIMIT %s",
            (customer_id, batch_type.value, LEDGER_RECENT),
        ).fetchall()
        row = rows[0] if rows else None
        out[batch_type.value] = {
            "cursor": recovered(row[0]) if row else None,
            "batch_id": str(row[1]) if row and row[1] else None,
            "acknowledged_at": row[2].isoformat() if row else None,
            "recent": [recovered(r[0]) for r in rows],
        }
    return out
