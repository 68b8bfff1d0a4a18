"""Customer administration: the command line and the direct-invoke admin door."""

from __future__ import annotations

import json
from collections.abc import Iterator

import customer_admin
import psycopg
import pytest
from fleet import config, tokens
from fleet_local.cli import main
from support import FakeLambdaContext


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_create_prints_the_token_once_and_stores_only_its_hash(admin_db_postgres: str, capsys) -> None:
    code, out, _ = run_cli(
        capsys, "customers", "--database-url", admin_db_postgres, "create", "DEV0001", "--name", "Dev", "--json"
    )
    assert code == 0
    issued = json.loads(out)
    token = issued["token"]
    assert tokens.well_formed(token)
    with psycopg.connect(admin_db_postgres) as conn:
        stored = conn.execute("SELECT token_sha256, token_hint FROM fleet.customer_tokens").fetchall()
        dump = str(conn.execute("SELECT * FROM fleet.customer_tokens").fetchall())
    assert stored == [(tokens.digest(token), tokens.hint(token))]
    assert token not in dump
    code, out, _ = run_cli(capsys, "customers", "--database-url", admin_db_postgres, "list")
    assert "DEV0001" in out
    assert token not in out


def test_create_twice_is_a_clear_error(admin_db_postgres: str, capsys) -> None:
    run_cli(capsys, "customers", "--database-url", admin_db_postgres, "create", "C1", "--name", "one")
    code, _, err = run_cli(capsys, "customers", "--database-url", admin_db_postgres, "create", "C1", "--name", "one")
    assert code == 2
    assert "exists already" in err


def test_rotate_revoke_disable_enable(admin_db_postgres: str, capsys) -> None:
    url = admin_db_postgres
    run_cli(capsys, "customers", "--database-url", url, "create", "C1", "--name", "one")
    code, out, _ = run_cli(capsys, "customers", "--database-url", url, "rotate-token", "C1")
    assert code == 0 and "flt_" in out
    code, out, _ = run_cli(capsys, "customers", "--database-url", url, "revoke-token", "C1", "--keep-newest", "--json")
    assert json.loads(out) == {"revoked": 1}
    run_cli(capsys, "customers", "--database-url", url, "disable", "C1")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT status FROM fleet.customers").fetchone() == ("disabled",)
    run_cli(capsys, "customers", "--database-url", url, "enable", "C1")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT status FROM fleet.customers").fetchone() == ("active",)
    code, _, err = run_cli(capsys, "customers", "--database-url", url, "disable", "NOPE")
    assert code == 2 and "no customer" in err


def test_invalid_customer_id_is_refused(admin_db_postgres: str, capsys) -> None:
    code, _, err = run_cli(capsys, "customers", "--database-url", admin_db_postgres, "create", "bad id!", "--name", "x")
    assert code == 2 and "customer id" in err


@pytest.fixture
def admin_door(admin_db_postgres: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("DATABASE_URL", admin_db_postgres)
    config.cached.cache_clear()
    yield admin_db_postgres
    config.cached.cache_clear()


def test_admin_function_creates_and_lists(admin_door: str) -> None:
    created = customer_admin.handler({"action": "create", "customer_id": "DEV9", "name": "Nine"}, FakeLambdaContext())
    assert created["ok"] is True and tokens.well_formed(created["token"])
    listed = customer_admin.handler({"action": "list"}, FakeLambdaContext())
    assert [c["id"] for c in listed["customers"]] == ["DEV9"]
    assert (
        customer_admin.handler({"action": "disable", "customer_id": "DEV9"}, FakeLambdaContext())["status"]
        == "disabled"
    )


def test_admin_function_refuses_bad_requests_clearly(admin_door: str) -> None:
    bad = customer_admin.handler({"action": "explode"}, FakeLambdaContext())
    assert bad["ok"] is False and "invalid request" in bad["error"]
    missing = customer_admin.handler({"action": "rotate-token", "customer_id": "NOPE"}, FakeLambdaContext())
    assert missing == {"ok": False, "error": "no customer 'NOPE'"}


def test_migrate_command_prints_what_it_applied(empty_db: str, capsys) -> None:
    code, out, _ = run_cli(
        capsys, "db", "migrate", "--role", "admin", "--profile", "postgres", "--database-url", empty_db
    )
    assert code == 0
    assert "profile: postgres" in out and "applied: 001_core.sql" in out
    code, out, _ = run_cli(capsys, "db", "migrate", "--role", "admin", "--database-url", empty_db)
    assert "nothing to apply" in out and "profile: postgres" in out
