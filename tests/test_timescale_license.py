"""An Apache-2-only TimescaleDB (``timescaledb.license = 'apache'``) has no
continuous aggregates and no columnstore policies: the auto profile takes the
postgres profile there and says why, and ``--profile timescale`` is refused at
once, naming the license, before anything is applied."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from fleet.errors import ProfileError
from fleet.schema.bootstrap import bootstrap
from fleet.schema.runner import TimescaleOffer, decide_profile, timescaledb_offer, timescaledb_offered
from fleet_local.cli import main
from fleet_local.cluster import LocalCluster

FULL = TimescaleOffer(available=True, loaded=True, license="timescale")
APACHE = TimescaleOffer(available=True, loaded=True, license="apache")
ABSENT = TimescaleOffer(available=False, loaded=False, license=None)
NOT_PRELOADED = TimescaleOffer(available=True, loaded=False, license=None)


def test_auto_takes_timescale_only_where_every_feature_it_needs_is_licensed() -> None:
    assert decide_profile("admin", "auto", None, FULL) == ("timescale", None)
    assert decide_profile("admin", "auto", None, ABSENT) == ("postgres", None)
    assert decide_profile("admin", "auto", None, NOT_PRELOADED) == ("postgres", None)
    profile, notice = decide_profile("admin", "auto", None, APACHE)
    assert profile == "postgres"
    assert notice is not None and "timescaledb.license = 'apache'" in notice and "postgres profile" in notice
    # A license configured where the extension is not created yet counts the same.
    assert decide_profile("admin", "auto", None, TimescaleOffer(True, True, None)) == ("timescale", None)


def test_asking_for_timescale_under_the_apache_license_is_refused_naming_it() -> None:
    with pytest.raises(ProfileError, match=r"timescaledb\.license = 'apache'") as refused:
        decide_profile("admin", "timescale", None, APACHE)
    assert "continuous aggregates" in str(refused.value) and "--profile postgres" in str(refused.value)
    assert decide_profile("admin", "timescale", None, FULL) == ("timescale", None)
    with pytest.raises(ProfileError, match="does not offer TimescaleDB"):
        decide_profile("admin", "timescale", None, ABSENT)


def test_a_timescale_database_on_a_server_now_under_the_apache_license_is_refused() -> None:
    with pytest.raises(ProfileError, match=r"set up with the timescale profile.*timescaledb\.license = 'apache'"):
        decide_profile("admin", "auto", "timescale", APACHE)
    assert decide_profile("admin", "auto", "postgres", APACHE) == ("postgres", None)
    assert decide_profile("admin", "auto", "timescale", FULL) == ("timescale", None)
    assert decide_profile("client", "auto", None, APACHE) == ("postgres", None)


@pytest.fixture(scope="module")
def apache_server(pg_server) -> Iterator[LocalCluster]:
    """A server whose TimescaleDB runs under the Apache 2 license (it can be set in
    the server's configuration only, not in a running session)."""
    if not pg_server.has_timescale:
        pytest.skip("TimescaleDB is not installed on this PostgreSQL server: the apache license case is NOT covered")
    with LocalCluster(preload_timescaledb=True, settings={"timescaledb.license": "'apache'"}) as cluster:
        yield cluster


@pytest.fixture
def apache_db(apache_server: LocalCluster, request: pytest.FixtureRequest) -> str:
    name = f"lic_{request.node.name.split('[')[0][-40:]}"
    with psycopg.connect(apache_server.url(), autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    return apache_server.url(name)


def test_the_apache_license_is_read_from_the_server(apache_db: str) -> None:
    with psycopg.connect(apache_db, autocommit=True) as conn:
        assert timescaledb_offer(conn) == APACHE
        assert timescaledb_offered(conn) is False
        conn.execute("CREATE EXTENSION timescaledb")
        assert timescaledb_offer(conn) == APACHE


def test_migrate_auto_takes_the_postgres_profile_with_a_notice(apache_db: str, capsys) -> None:
    assert main(["db", "migrate", "--role", "admin", "--database-url", apache_db]) == 0
    out = capsys.readouterr().out
    assert "profile: postgres" in out
    assert "notice: " in out and "timescaledb.license = 'apache'" in out
    with psycopg.connect(apache_db) as conn:
        assert (
            conn.execute(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'fleet.power_measurements'::regclass"
            ).fetchone()[0]
            >= 3
        )  # type: ignore[index]


def test_the_bootstrap_says_why_it_took_the_postgres_profile(apache_db: str) -> None:
    outcome = bootstrap(apache_db, "admin")
    assert outcome.profile == "postgres"
    assert any("timescaledb.license = 'apache'" in c for c in outcome.changes), outcome.changes


def test_migrate_timescale_is_refused_at_once_and_applies_nothing(apache_db: str, capsys) -> None:
    code = main(["db", "migrate", "--role", "admin", "--profile", "timescale", "--database-url", apache_db])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: " in err and "timescaledb.license = 'apache'" in err
    with psycopg.connect(apache_db) as conn:
        assert conn.execute(
            "SELECT to_regclass('fleet.customers'), to_regclass('fleet_meta.migrations')"
        ).fetchone() == (None, None)
    code = main(["db", "check", "--role", "admin", "--profile", "timescale", "--database-url", apache_db])
    assert code == 2 and "timescaledb.license = 'apache'" in capsys.readouterr().err
