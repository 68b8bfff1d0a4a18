"""Sites and devices: their descriptions upserted, a newer version never overwritten
by an older one delivered late, an unchanged one not rewritten (and not counted)."""

from __future__ import annotations

from collections.abc import Sequence

import psycopg

from fleet.models import Device, Site


def upsert_sites(conn: psycopg.Connection, customer_id: str, items: Sequence[Site]) -> tuple[int, int]:
    if not items:
        return 0, 0
    rows = sorted(items, key=lambda s: s["id"])
    row = conn.execute(
        """
        WITH up AS (
            INSERT INTO fleet.sites AS s (customer_id, id, name, timezone, latitude, longitude, updated_at)
            SELECT %s, * FROM unnest(%b::text[], %b::text[], %b::text[], %b::float8[], %b::float8[],
                                     %b::timestamptz[])
            ON CONFLICT (customer_id, id) DO UPDATE SET
                name = excluded.name, timezone = excluded.timezone, latitude = excluded.latitude,
                longitude = excluded.longitude, updated_at = excluded.updated_at, received_at = now()
            WHERE (s.name, s.timezone, s.latitude, s.longitude, s.updated_at)
                  IS DISTINCT FROM (excluded.name, excluded.timezone, excluded.latitude,
                                    excluded.longitude, excluded.updated_at)
              -- an older version re-delivered late never overwrites a newer one
              AND (s.updated_at IS NULL OR excluded.updated_at IS NULL OR excluded.updated_at >= s.updated_at)
            RETURNING 1
        )
        SELECT count(*) FROM up
        """,
        (
            customer_id,
            [s["id"] for s in rows],
            [s["name"] for s in rows],
            [s.get("timezone") for s in rows],
            [s.get("latitude") for s in rows],
            [s.get("longitude") for s in rows],
            [s.get("updated_at") for s in rows],
        ),
    ).fetchone()
    accepted = int(row[0]) if row else 0
    return accepted, len(rows) - accepted


def upsert_devices(conn: psycopg.Connection, customer_id: str, items: Sequence[Device]) -> tuple[int, int]:
    if not items:
        return 0, 0
    rows = sorted(items, key=lambda d: d["id"])
    row = conn.execute(
        """
        WITH up AS (
            INSERT INTO fleet.devices AS d (customer_id, id, site_id, name, model, firmware_version, updated_at)
            SELECT %s, * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[],
                                     %b::timestamptz[])
            ON CONFLICT (customer_id, id) DO UPDATE SET
                site_id = excluded.site_id, name = excluded.name, model = excluded.model,
                firmware_version = excluded.firmware_version, updated_at = excluded.updated_at,
                received_at = now()
            WHERE (d.site_id, d.name, d.model, d.firmware_version, d.updated_at)
                  IS DISTINCT FROM (excluded.site_id, excluded.name, excluded.model,
                                    excluded.firmware_version, excluded.updated_at)
              AND (d.updated_at IS NULL OR excluded.updated_at IS NULL OR excluded.updated_at >= d.updated_at)
            RETURNING 1
        )
        SELECT count(*) FROM up
        """,
        (
            customer_id,
            [d["id"] for d in rows],
            [d["site_id"] for d in rows],
            [d["name"] for d in rows],
            [d.get("model") for d in rows],
            [d.get("firmware_version") for d in rows],
            [d.get("updated_at") for d in rows],
        ),
    ).fetchone()
    accepted = int(row[0]) if row else 0
    return accepted, len(rows) - accepted
