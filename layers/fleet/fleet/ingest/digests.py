"""Data access for reconciliation on the Admin side: a `digests` batch compared with
the Admin's own digest of the same device-days, the outcome recorded in
``fleet.reconciliation``, and what ``fleet status`` shows of it.

One statement per day of the batch computes the Admin's digests of the devices asked,
its day bound when it is planned (a lateral read per device-day, its day known only
at run time, opened every partition or chunk for each; bench/README.md has the
figures); one more records the outcomes, the portal's and the Admin's digests
travelling as arrays, and returns the device-days that differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import psycopg

from fleet.reconcile import ADMIN_COLUMNS, EMPTY_HASH, day_bounds, digest_sql, outcome_sql, row_hash_sql

# The Admin's digests of one day, of the devices asked: one read of the day's range
# of the measurement key, its bounds known when the statement is planned (so only
# that day's partition or chunks are opened; in the columnstore, only the segments of
# this customer's devices).
_ADMIN_DAY = f"""
SELECT device_id, {digest_sql("r.h")}
FROM (SELECT m.device_id, {row_hash_sql(ADMIN_COLUMNS)} AS h
      FROM fleet.power_measurements m
      WHERE m.time >= %(start)s AND m.time <= %(last)s
        AND m.customer_id = %(customer)s AND m.device_id = ANY(%(devices)s::text[])) r
GROUP BY device_id
"""

_RECORD = f"""
WITH compared AS (
    SELECT p.*, {outcome_sql("p.portal_count", "p.portal_hash", "p.admin_count", "p.admin_hash")} AS outcome
    FROM unnest(%(devices)s::text[], %(days)s::date[], %(counts)s::bigint[], %(hashes)s::text[],
                %(admin_counts)s::bigint[], %(admin_hashes)s::text[])
        AS p(device_id, day, portal_count, portal_hash, admin_count, admin_hash)
), recorded AS (
    INSERT INTO fleet.reconciliation AS r (customer_id, device_id, day, portal_count, portal_hash,
                                           admin_count, admin_hash, outcome, checked_at, mismatch_since)
    SELECT %(customer)s, device_id, day, portal_count, portal_hash, admin_count, admin_hash, outcome, now(),
           CASE WHEN outcome = 'matched' THEN NULL ELSE now() END
    FROM compared
    ON CONFLICT (customer_id, device_id, day) DO UPDATE SET
        portal_count = excluded.portal_count, portal_hash = excluded.portal_hash,
        admin_count = excluded.admin_count, admin_hash = excluded.admin_hash,
        outcome = excluded.outcome, checked_at = excluded.checked_at,
        mismatch_since = CASE WHEN excluded.outcome = 'matched' THEN NULL
                              ELSE coalesce(r.mismatch_since, excluded.checked_at) END
    RETURNING 1
)
SELECT device_id, day, outcome, portal_count, admin_count, (SELECT count(*) FROM recorded)
FROM compared
WHERE outcome <> 'matched'
ORDER BY day, device_id
"""


@dataclass
class Comparison:
    compared: int
    differ: list[dict[str, Any]] = field(default_factory=list)


def compare_digests(conn: psycopg.Connection, customer_id: str, items: Sequence[Any]) -> Comparison:
    """Compare the portal's digests (items unique by device and day) with the
    Admin's, record each outcome, and return the device-days that differ."""
    if not items:
        return Comparison(0)
    by_day: dict[date, list[str]] = {}
    for d in items:
        by_day.setdefault(d["day"], []).append(d["device_id"])
    admin: dict[tuple[str, date], tuple[int, str]] = {}
    for day, devices in by_day.items():
        start, last = day_bounds(day)
        params = {"start": start, "last": last, "customer": customer_id, "devices": devices}
        for device, count, hash_text in conn.execute(_ADMIN_DAY, params).fetchall():
            admin[(device, day)] = (int(count), hash_text)
    theirs = [admin.get((d["device_id"], d["day"]), (0, EMPTY_HASH)) for d in items]
    rows = conn.execute(
        _RECORD,
        {
            "customer": customer_id,
            "devices": [d["device_id"] for d in items],
            "days": [d["day"] for d in items],
            "counts": [d["count"] for d in items],
            "hashes": [d["hash"] for d in items],
            "admin_counts": [t[0] for t in theirs],
            "admin_hashes": [t[1] for t in theirs],
        },
    ).fetchall()
    differ = [
        {
            "device_id": device,
            "day": day.isoformat(),
            "outcome": outcome,
            "portal_count": int(portal),
            "admin_count": int(admin),
        }
        for device, day, outcome, portal, admin, _ in rows
    ]
    return Comparison(len(items), differ)


# Per customer: the newest day that matched before the oldest open mismatch (every
# device-day checked up to it matched), and the open mismatches; from the indexes on
# (customer_id, day).
_SUMMARY = """
SELECT c.id,
       (SELECT max(m.day) FROM fleet.reconciliation m
         WHERE m.customer_id = c.id AND m.outcome = 'matched'
           AND m.day < coalesce(o.oldest, 'infinity'::date)) AS verified_through,
       o.open,
       (SELECT json_agg(json_build_object('device_id', x.device_id, 'day', x.day, 'outcome', x.outcome,
                                          'portal_count', x.portal_count, 'admin_count', x.admin_count,
                                          'since', x.mismatch_since) ORDER BY x.day, x.device_id)
          FROM (SELECT * FROM fleet.reconciliation r WHERE r.customer_id = c.id AND r.outcome <> 'matched'
                ORDER BY r.day, r.device_id LIMIT %(shown)s) x) AS mismatches
FROM fleet.customers c
CROSS JOIN LATERAL (
    SELECT min(r.day) AS oldest, count(*) AS open FROM fleet.reconciliation r
    WHERE r.customer_id = c.id AND r.outcome <> 'matched'
) o
ORDER BY c.id
"""


@dataclass
class Verification:
    customer_id: str
    verified_through: date | None
    open: int
    mismatches: list[dict[str, Any]]


def verification(conn: psycopg.Connection, shown: int = 5) -> dict[str, Verification]:
    """Per customer: "verified through" and the oldest ``shown`` open mismatches."""
    out: dict[str, Verification] = {}
    for customer, through, open_count, mismatches in conn.execute(_SUMMARY, {"shown": shown}):
        out[customer] = Verification(customer, through, int(open_count), mismatches or [])
    return out


def add_verification(conn: psycopg.Connection, rows: list[dict[str, Any]], shown: int = 5) -> None:
    """``verified_through`` and ``mismatches`` (the oldest ``shown`` open ones, and how
    many are open) into each customer's row of ``fleet status``."""
    summary = verification(conn, shown)
    for row in rows:
        v = summary.get(row["id"])
        row["verified_through"] = v.verified_through if v else None
        row["open_mismatches"] = v.open if v else 0
        row["mismatches"] = v.mismatches if v else []


def verification_lines(rows: list[dict[str, Any]]) -> list[str]:
    """What ``fleet status`` prints of reconciliation, below its table."""
    lines = []
    for r in rows:
        through, open_count = r.get("verified_through"), r.get("open_mismatches", 0)
        if through is None and not open_count:
            continue
        day = through.isoformat() if through else "-"
        lines.append(f"{r['id']:<12} verified through {day}; open mismatches: {open_count}")
        for m in r.get("mismatches", []):
            lines.append(
                f"{'':<12}   {m['day']} {m['device_id']}: {m['outcome']}"
                f" (portal {m['portal_count']} rows, admin {m['admin_count']})"
            )
    return ["", "reconciliation", *lines] if lines else ["", "reconciliation: no digests yet"]
