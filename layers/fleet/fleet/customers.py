"""Customer administration: one domain module behind two doors (the ``fleet
customers`` command line, and the CustomerAdminFunction invoked through IAM).

A token is returned once, when it is issued; only its SHA-256 is stored.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg

from fleet import tokens
from fleet.errors import CustomerError, CustomerExists, CustomerNotFound

CUSTOMER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_ROTATION_GRACE = timedelta(days=7)


@dataclass
class Issued:
    customer_id: str
    token: str
    token_hint: str
    expires_at: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["expires_at"] = self.expires_at.isoformat() if self.expires_at else None
        return out


def _require(conn: psycopg.Connection, customer_id: str) -> None:
    row = conn.execute("SELECT 1 FROM fleet.customers WHERE id = %s", (customer_id,)).fetchone()
    if row is None:
        raise CustomerNotFound(f"no customer {customer_id!r}")


def _issue(conn: psycopg.Connection, customer_id: str) -> Issued:
    token = tokens.generate()
    conn.execute(
        "INSERT INTO fleet.customer_tokens (token_sha256, customer_id, token_hint) VALUES (%s, %s, %s)",
        (tokens.digest(token), customer_id, tokens.hint(token)),
    )
    return Issued(customer_id, token, tokens.hint(token))


def create(conn: psycopg.Connection, customer_id: str, name: str) -> Issued:
    if not CUSTOMER_ID_RE.match(customer_id):
        raise CustomerError("customer id: 1-64 characters of letters, digits, '_', '.', '-'")
    if not name.strip() or len(name) > 200:
        raise CustomerError("name: 1-200 characters")
    with conn.transaction():
        inserted = conn.execute(
            "INSERT INTO fleet.customers (id, name) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING RETURNING id",
            (customer_id, name.strip()),
        ).fetchone()
        if inserted is None:
            raise CustomerExists(f"customer {customer_id!r} exists already")
        return _issue(conn, customer_id)


def rotate_token(conn: psycopg.Connection, customer_id: str, grace: timedelta = DEFAULT_ROTATION_GRACE) -> Issued:
    """A new token; the current ones keep working until ``grace`` from now."""
    with conn.transaction():
        _require(conn, customer_id)
        # In seconds: an interval in days is added in the session's time zone, and
        # across a daylight-saving change "7 days" would be 167 or 169 hours.
        seconds = grace.total_seconds()
        conn.execute(
            "UPDATE fleet.customer_tokens SET expires_at = now() + make_interval(secs => %s)"
            " WHERE customer_id = %s AND revoked_at IS NULL"
            " AND (expires_at IS NULL OR expires_at > now() + make_interval(secs => %s))",
            (seconds, customer_id, seconds),
        )
        issued = _issue(conn, customer_id)
        return issued


def revoke_tokens(conn: psycopg.Connection, customer_id: str, *, keep_newest: bool = False) -> int:
    """Revoke the customer's live tokens at once (all, or all but the newest)."""
    with conn.transaction():
        _require(conn, customer_id)
        cur = conn.execute(
            "UPDATE fleet.customer_tokens SET revoked_at = now()"
            " WHERE customer_id = %s AND revoked_at IS NULL"
            " AND (NOT %s OR token_sha256 <> (SELECT token_sha256 FROM fleet.customer_tokens"
            "      WHERE customer_id = %s AND revoked_at IS NULL ORDER BY created_at DESC LIMIT 1))",
            (customer_id, keep_newest, customer_id),
        )
        return cur.rowcount


def set_status(conn: psycopg.Connection, customer_id: str, status: str) -> None:
    if status not in ("active", "disabled"):
        raise CustomerError("status is active or disabled")
    with conn.transaction():
        _require(conn, customer_id)
        conn.execute("UPDATE fleet.customers SET status = %s WHERE id = %s", (status, customer_id))


def list_customers(conn: psycopg.Connection) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT c.id, c.name, c.status, c.created_at, c.first_seen_at, c.last_seen_at,"
        " count(t.*) FILTER (WHERE t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now()))"
        " FROM fleet.customers c LEFT JOIN fleet.customer_tokens t ON t.customer_id = c.id"
        " GROUP BY c.id ORDER BY c.id"
    ).fetchall()
    keys = ("id", "name", "status", "created_at", "first_seen_at", "last_seen_at", "live_tokens")
    return [
        {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in zip(keys, row, strict=True)} for row in rows
    ]
