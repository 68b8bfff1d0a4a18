"""Test session harness: one real PostgreSQL for the whole session.

A throwaway cluster is started (initdb into a temp dir, a free port on 127.0.0.1,
fsync off) unless ``DATABASE_URL`` names a server to use instead. Each test gets
its own database cloned from a migrated template, which is cheap. The report header
and the closing summary say which database profiles the run covered.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from fleet.schema.files import Profile, Role
from fleet.schema.migrate import migrate
from fleet.schema.runner import timescaledb_offered
from fleet_local.cluster import LocalCluster, timescaledb_installed
from psycopg import sql

TIMESCALE_MISSING = (
    "TimescaleDB is not installed on this PostgreSQL server: the timescale profile is NOT covered by this run"
)


@dataclass
class PgServer:
    """The session's server: where it is, what it offers, and fresh databases."""

    base_url: str
    version: str
    has_timescale: bool
    cluster: LocalCluster | None = None
    _counter: itertools.count = field(default_factory=itertools.count)
    _templates: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, dbname: str) -> str:
        info = psycopg.conninfo.conninfo_to_dict(self.base_url)
        info["dbname"] = dbname
        return psycopg.conninfo.make_conninfo(**info)

    def admin_connect(self) -> psycopg.Connection:
        return psycopg.connect(self.base_url, autocommit=True)

    def create_database(self, template: str | None = None, prefix: str = "t") -> str:
        name = f"fleet_{prefix}_{os.getpid()}_{next(self._counter)}"
        with self.admin_connect() as conn:
            stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template:
                stmt += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
            conn.execute(stmt)
        return name

    def drop_database(self, name: str) -> None:
        with self.admin_connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def template(self, role: Role, profile: Profile) -> str:
        """A migrated database to clone, made once per session."""
        key = f"{role}_{profile}"
        with self._lock:
            if key not in self._templates:
                name = self.create_database(prefix=f"tmpl_{key}")
                with psycopg.connect(self.url(name), autocommit=True) as conn:
                    migrate(conn, role, profile)
                with self.admin_connect() as conn:
                    conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
                self._templates[key] = name
            return self._templates[key]

    def drop_templates(self) -> None:
        for name in self._templates.values():
            with contextlib.suppress(psycopg.Error), self.admin_connect() as conn:
                conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(name)))
            with contextlib.suppress(psycopg.Error):
                self.drop_database(name)


_SERVER: PgServer | None = None
_SKIPPED_FOR_TIMESCALE = 0


def _start_server() -> PgServer:
    external = os.environ.get("DATABASE_URL")
    cluster = None
    if external:
        base_url = external
    else:
        cluster = LocalCluster().start()
        base_url = cluster.url("postgres")
    with psycopg.connect(base_url, autocommit=True) as conn:
        version = conn.execute("SELECT version()").fetchone()[0]  # type: ignore[index]
        has_ts = timescaledb_offered(conn)
    return PgServer(base_url=base_url, version=version, has_timescale=has_ts, cluster=cluster)


def _interrupted(signum: int, _frame: object) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second one cannot cut the clean-up short
    raise KeyboardInterrupt(signal.Signals(signum).name)


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM ends the session as Ctrl-C does: the fixtures unwind, and the
    session's cluster is stopped and removed. (After a SIGKILL, which nothing
    here sees, the cluster's own guard stops it: fleet_local.cluster.)"""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupted)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--minutes",
        type=float,
        default=0.0,
        help="soak mode of the reliability load test: run it this many minutes (0: the short CI form)",
    )


def pytest_report_header(config: pytest.Config) -> list[str]:
    where = "DATABASE_URL" if os.environ.get("DATABASE_URL") else "a throwaway cluster"
    from fleet_local.cluster import find_bindir

    installed = "unknown"
    with contextlib.suppress(Exception):
        installed = "yes" if timescaledb_installed(find_bindir()) else "no"
    return [f"database: {where}; TimescaleDB installed for the local server binaries: {installed}"]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    global _SERVER
    server = _start_server()
    _SERVER = server
    yield server
    server.drop_templates()
    if server.cluster is not None:
        server.cluster.stop()


def _fresh(pg_server: PgServer, template: str | None, prefix: str) -> Iterator[str]:
    name = pg_server.create_database(template=template, prefix=prefix)
    yield pg_server.url(name)
    pg_server.drop_database(name)


@pytest.fixture
def empty_db(pg_server: PgServer) -> Iterator[str]:
    """A new, empty database: its URL."""
    yield from _fresh(pg_server, None, "empty")


@pytest.fixture
def client_db(pg_server: PgServer) -> Iterator[str]:
    """A migrated Client (portal) database."""
    yield from _fresh(pg_server, pg_server.template("client", "postgres"), "client")


def require_timescale(pg_server: PgServer) -> None:
    global _SKIPPED_FOR_TIMESCALE
    if not pg_server.has_timescale:
        _SKIPPED_FOR_TIMESCALE += 1
        pytest.skip(TIMESCALE_MISSING)


@pytest.fixture
def admin_db_postgres(pg_server: PgServer) -> Iterator[str]:
    """A migrated Admin database in the postgres (Aurora) profile."""
    yield from _fresh(pg_server, pg_server.template("admin", "postgres"), "adminpg")


@pytest.fixture
def admin_db_timescale(pg_server: PgServer) -> Iterator[str]:
    """A migrated Admin database in the timescale profile (skipped, loudly, without it)."""
    require_timescale(pg_server)
    yield from _fresh(pg_server, pg_server.template("admin", "timescale"), "admints")


@pytest.fixture
def timescale_required(pg_server: PgServer) -> None:
    """Skip (loudly, and counted in the summary) where TimescaleDB is not installed."""
    require_timescale(pg_server)


@pytest.fixture(params=["postgres", "timescale"])
def admin_profile(request: pytest.FixtureRequest, pg_server: PgServer) -> str:
    if request.param == "timescale":
        require_timescale(pg_server)
    return str(request.param)


@pytest.fixture
def admin_db(pg_server: PgServer, admin_profile: str) -> Iterator[str]:
    """A migrated Admin database, once per profile."""
    yield from _fresh(pg_server, pg_server.template("admin", admin_profile), f"admin{admin_profile[:2]}")  # type: ignore[arg-type]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    _summarise_dates(terminalreporter)
    server = _SERVER
    if server is None:
        return
    terminalreporter.section("database profiles covered")
    terminalreporter.write_line(f"server: {server.version}")
    terminalreporter.write_line("postgres (Aurora) profile: covered")
    if server.has_timescale:
        terminalreporter.write_line("timescale profile: covered (TimescaleDB present)")
    else:
        terminalreporter.write_line(
            f"timescale profile: NOT COVERED - {_SKIPPED_FOR_TIMESCALE} tests skipped because "
            "TimescaleDB is not installed on this server",
            red=True,
            bold=True,
        )


def _summarise_dates(terminalreporter: pytest.TerminalReporter) -> None:
    """Which dates the run's clock stood at: faked inside an any-day run, and the
    any-day runs an ordinary session made."""
    import test_any_day

    faked = os.environ.get(test_any_day.MOMENT_ENV)
    if faked:
        terminalreporter.section("clock")
        terminalreporter.write_line(f"faked by libfaketime to {faked} (TZ={os.environ.get('TZ', 'unset')})")
    if test_any_day.RAN:
        terminalreporter.section("calendar tests at hard dates")
        for line in test_any_day.RAN:
            terminalreporter.write_line(line)


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """AWS from moto for the test (credentials that reach nothing real), with the push's
    state table created: the table is what the fixture gives."""
    import boto3
    from moto import mock_aws

    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        yield boto3.resource("dynamodb", region_name="eu-west-1").create_table(
            TableName="push-state",
            KeySchema=[{"AttributeName": "resource", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "resource", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
