"""The digest of a device-day: what both sides of reconciliation compute, defined once.

A digest says what a database holds for one device on one UTC day: the number of
rows and an order-independent hash of them, computed in SQL on each side (the portal
for the push, ``fleet.power_measurements`` for the Admin) so that no rows travel to
compare them.

Per row, the hash is the MD5 of the row's values in their binary wire form, the form
the Admin stores them in: the time as ``timestamptz_send`` (microseconds since 2000,
whatever the session's time zone), each metric as a presence byte and its float8
(``float8send``: -0 and 0 differ, as they do once stored), then the device id's
UTF-8. Fixed-width fields first and the one text last, so no two rows share their
bytes. No text format (DateStyle, extra_float_digits) can change it.

A day's hash is the sum, modulo 2**64, of each half of the row hashes: sums do not
depend on the order of the rows, and unlike XOR two equal rows do not cancel out.
Written ``v1:<sum of the first halves>:<sum of the second halves>`` in decimal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time

from fleet.models import MEASUREMENT_FIELDS

DIGEST_VERSION = "v1"
EMPTY_HASH = f"{DIGEST_VERSION}:0:0"

_MODULUS = "18446744073709551616"  # 2**64


@dataclass(frozen=True)
class RowColumns:
    """The SQL expressions of one measurement row's fields, as the ingest would
    receive them: the time as a timestamptz, the device id as text, the metrics as
    float8. Only identifiers of the schema go in (never client input)."""

    time: str = "time"
    device_id: str = "device_id"
    metrics: Sequence[str] = MEASUREMENT_FIELDS


ADMIN_COLUMNS = RowColumns("m.time", "m.device_id", tuple(f"m.{name}" for name in MEASUREMENT_FIELDS))


def row_hash_sql(cols: RowColumns) -> str:
    """The expression of one row's MD5 (hex text of 128 bits)."""
    metrics = " || ".join(
        f"coalesce('\\x01'::bytea || float8send(({m})::float8), '\\x00'::bytea)" for m in cols.metrics
    )
    return (
        f"md5(timestamptz_send(({cols.time})::timestamptz) || {metrics}"
        f" || convert_to(({cols.device_id})::text, 'UTF8'))"
    )


def digest_sql(hash_column: str) -> str:
    """The aggregates ``count`` and ``hash`` (the module's text form) over rows
    whose row hash is in ``hash_column``; 0 and EMPTY_HASH over no rows."""

    def half(start: int) -> str:
        part = f"('x' || substr({hash_column}, {start}, 16))::bit(64)::bigint"
        return f"mod(mod(coalesce(sum({part}), 0), {_MODULUS}) + {_MODULUS}, {_MODULUS})::text"

    return f"count(*) AS count, '{DIGEST_VERSION}:' || {half(1)} || ':' || {half(17)} AS hash"


def outcome_sql(portal_count: str, portal_hash: str, admin_count: str, admin_hash: str) -> str:
    """What one comparison found, over the named columns: ``matched``, ``missing``
    (the Admin holds fewer rows), ``extra`` (it holds more) or ``differs`` (as many
    rows, with other keys or values)."""
    return (
        f"CASE WHEN {admin_count} < {portal_count} THEN 'missing'"
        f" WHEN {admin_count} > {portal_count} THEN 'extra'"
        f" WHEN {admin_hash} = {portal_hash} THEN 'matched' ELSE 'differs' END"
    )


# What a push re-sends: the Admin lacks rows (or holds as many with some other), and
# re-delivery is harmless. Rows the Admin holds and the portal does not are reported.
HEALABLE = frozenset({"missing", "differs"})


def day_bounds(day: date) -> tuple[datetime, datetime]:
    """A UTC day's first and last microsecond, both inclusive: the day after
    9999-12-31 is not a datetime, and meters with unset clocks write such days."""
    return datetime.combine(day, time.min, UTC), datetime.combine(day, time.max, UTC)
