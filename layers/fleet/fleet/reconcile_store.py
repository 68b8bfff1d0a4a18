"""Data access for reconciliation on the Admin side: a `digests` batch compared with
the Admin's own digest of the same device-days, the outcome recorded in
``fleet.reconciliation``, and what ``fleet status`` shows of it.

One statement per batch: the portal's digests travel as arrays, the Admin's are
computed per device-day by a lateral read of that customer's, device's and day's
rows (the measurement key's time range, with the customer and device checked in the
same index; partitions and chunks outside the day are never opened), compared,
upserted, and the device-days that differ come back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import psycopg

from fleet.reconcile import ADMIN_COLUMNS, digest_sql, outcome_sql, row_hash_sql

_COMPARE = f"""
WITH portal AS (
    SELECT * FROM unnest(%(devices)s::text[], %(days)s::date[], %(counts)s::bigint[], %(hashes)s::text[])
        AS p(device_id, day, portal_count, portal_hash)
), compared AS (
    SELECT p.*, a.count AS admin_count, a.hash AS admin_hash,
           {outcome_sql("p.portal_count", "p.portal_hash", "a.count", "a.hash")} AS outcome
    FROM portal p
    CROSS JOIN LATERAL (
        SELECT {digest_sql("r.h")}
        FROM (SELECT {row_hash_sql(ADMIN_COLUMNS)} AS h
              FROM fleet.power_measurements m
              WHERE m.time >= p.day::timestamp AT TIME ZONE 'UTC'
                AND m.time < (p.day + 1)::timestamp AT TIME ZONE 'UTC'
                AND m.customer_id = %(customer)s AND m.device_id = p.device_id) r
    ) a
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
    rows = conn.execute(
        _COMPARE,
        {
            "customer": customer_id,
            "devices": [d["device_id"] for d in items],
            "days": [d["day"] for d in items],
            "counts": [d["count"] for d in items],
            "hashes": [d["hash"] for d in items],
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
