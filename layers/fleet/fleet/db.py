"""Database connections: where the conninfo comes from, one connection reused
across invocations, and the mapping of driver errors to domain errors.

Settings keep RDS Proxy from pinning the session: no server-side prepared
statements (``prepare_threshold=None``), no session ``SET`` (timeouts are set per
transaction with ``set_config(..., true)``), no temporary tables, no session locks.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import psycopg

from fleet.errors import ConfigurationError, DatabaseBusy, DatabaseUnavailable
from fleet.observability import logger

# Errors that say the database is busy or down, never something in the data, by
# SQLSTATE: the class (two characters) or the exact code. Busy: retry soon (429);
# unavailable: retry later (503). Every other error is the data's or a request's.
_BUSY_CLASSES = {"53"}  # insufficient resources: too many connections, out of memory, disk full
_BUSY_CODES = {"40001", "40P01", "55P03"}  # serialization failure, deadlock, lock timeout
_UNAVAILABLE_CLASSES = {"08"}  # connection exception
_UNAVAILABLE_CODES = {"57P01", "57P02", "57P03", "57P04", "57P05"}  # shutdown, crash, cannot connect now
_QUERY_CANCELED = "57014"  # busy when a timeout cancelled it (not a cancel asked for by hand)


def conninfo_from_secret(secret: dict[str, Any]) -> str:
    """Build a URL from an RDS/Aurora Secrets Manager secret (engine JSON format)."""
    try:
        user = quote(str(secret["username"]), safe="")
        password = quote(str(secret["password"]), safe="")
        host = str(secret["host"])
        port = int(secret.get("port", 5432))
        dbname = quote(str(secret.get("dbname") or secret.get("dbName") or "postgres"), safe="")
    except (KeyError, TypeError, ValueError) as exc:
        # Never echo the secret's content.
        raise ConfigurationError(
            "the database secret must be JSON with username, password, host (port, dbname optional)"
        ) from exc
    return f"postgresql://{user}:{password}@{host}:{port}/{dbname}?sslmode=prefer"


def resolve_conninfo(database_url: str | None, secret_arn: str | None) -> str:
    """``DATABASE_URL`` wins; otherwise the Secrets Manager secret (cached)."""
    if database_url:
        return database_url
    if secret_arn:
        from aws_lambda_powertools.utilities import parameters

        raw = parameters.get_secret(secret_arn, max_age=300)
        try:
            secret = json.loads(raw if isinstance(raw, str) else bytes(raw).decode())
        except ValueError as exc:
            raise ConfigurationError("the database secret is not JSON") from exc
        return conninfo_from_secret(secret)
    raise ConfigurationError("set DATABASE_URL or DB_SECRET_ARN")


def connect(conninfo: str, *, autocommit: bool = True, connect_timeout: int = 5) -> psycopg.Connection:
    try:
        return psycopg.connect(
            conninfo,
            autocommit=autocommit,
            prepare_threshold=None,
            connect_timeout=connect_timeout,
            application_name="fleet-pipeline",
        )
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(describe(exc)) from exc


def describe(exc: BaseException) -> str:
    """A one-line description of a driver error, without the conninfo (password)."""
    sqlstate = getattr(exc, "sqlstate", None)
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    # libpq messages name host and port but never the password; keep them short.
    return f"{type(exc).__name__}{f' [{sqlstate}]' if sqlstate else ''}: {text[:300]}"


def classify(exc: psycopg.Error) -> Exception:
    """Map a driver error to DatabaseBusy / DatabaseUnavailable, or return it as is
    (an error of the data or of the statement: the caller decides, never "retry").

    By SQLSTATE only, not by psycopg's class: psycopg files data-caused states such as
    54000 (a program limit) under OperationalError too. An error without a SQLSTATE
    comes from the client library (the connection is gone, or never was)."""
    sqlstate = exc.sqlstate or ""
    if not sqlstate:
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
            return DatabaseUnavailable(describe(exc))
        return exc
    if sqlstate[:2] in _BUSY_CLASSES or sqlstate in _BUSY_CODES:
        return DatabaseBusy(describe(exc))
    if sqlstate == _QUERY_CANCELED and "timeout" in (exc.diag.message_primary or ""):
        return DatabaseBusy(describe(exc))
    if sqlstate[:2] in _UNAVAILABLE_CLASSES or sqlstate in _UNAVAILABLE_CODES:
        return DatabaseUnavailable(describe(exc))
    return exc


class ConnectionHolder:
    """One connection reused across invocations of a warm Lambda, reconnecting
    when it has dropped. Per thread, so a local multi-threaded server can share
    one service (a Lambda instance runs one request at a time)."""

    def __init__(self, conninfo_factory: Callable[[], str]) -> None:
        self._factory = conninfo_factory
        self._local = threading.local()

    def get(self) -> psycopg.Connection:
        conn: psycopg.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self.discard()
        conn = connect(self._factory())
        self._local.conn = conn
        return conn

    def discard(self) -> None:
        conn: psycopg.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
        self._local.conn = None

    def run(self, work: Callable[[psycopg.Connection], Any], *, retry_once: bool = True) -> Any:
        """Run ``work`` on a healthy connection; a connection found dead is replaced
        and the work retried once (it is one transaction, so a retry is safe)."""
        attempts = 2 if retry_once else 1
        for attempt in range(attempts):
            conn = self.get()
            try:
                return work(conn)
            except psycopg.Error as exc:
                mapped = classify(exc)
                if conn.broken or conn.closed:
                    self.discard()
                    if attempt + 1 < attempts:
                        logger.warning("database connection lost; reconnecting", extra={"error": describe(exc)})
                        continue
                if mapped is exc:
                    raise
                raise mapped from exc
        raise AssertionError("unreachable")
