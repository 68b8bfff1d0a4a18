"""The ``fleet`` command's exit statuses, one rule for every command: 0 done;
1 it ran, and what it checked is not right; 2 it could not do what was asked
(usage, no database or one that does not answer, a request refused). And the
customer commands print plain text unless ``--json`` is given."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from fleet_local.cli import run
from fleet_local.cluster import free_port

ROOT = Path(__file__).resolve().parents[1]


def status_of(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The exit status the ``fleet`` program ends with, and what it printed."""
    with pytest.raises(SystemExit) as ended:
        run(list(argv))
    out, err = capsys.readouterr()
    assert isinstance(ended.value.code, int), ended.value.code
    return ended.value.code, out, err


@pytest.fixture
def no_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)


def _dead_url() -> str:
    return f"postgresql://fleet:s3cret-pw@127.0.0.1:{free_port()}/fleet_admin"


CUSTOMER_COMMANDS = [
    ["list"],
    ["create", "C9", "--name", "nine"],
    ["rotate-token", "C1"],
    ["revoke-token", "C1"],
    ["disable", "C1"],
    ["enable", "C1"],
]


@pytest.mark.parametrize("command", CUSTOMER_COMMANDS, ids=lambda c: c[0])
def test_each_customer_command_ends_0_when_done(
    admin_db_postgres: str, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    with psycopg.connect(admin_db_postgres, autocommit=True) as conn:
        from fleet import customers

        customers.create(conn, "C1", "one")
    code, out, err = status_of(capsys, "customers", *command, "--database-url", admin_db_postgres)
    assert (code, err) == (0, "")
    assert out.strip()


@pytest.mark.parametrize(
    "command", [c for c in CUSTOMER_COMMANDS if c[0] not in ("list", "create")], ids=lambda c: c[0]
)
def test_each_customer_command_ends_2_for_a_customer_that_does_not_exist(
    admin_db_postgres: str, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    code, out, err = status_of(capsys, "customers", command[0], "NOPE", "--database-url", admin_db_postgres)
    assert (code, out) == (2, "")
    assert "no customer 'NOPE'" in err


def test_create_ends_2_when_refused(admin_db_postgres: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = admin_db_postgres
    assert status_of(capsys, "customers", "create", "C1", "--name", "one", "--database-url", url)[0] == 0
    code, _, err = status_of(capsys, "customers", "create", "C1", "--name", "one", "--database-url", url)
    assert code == 2 and "exists already" in err
    code, _, err = status_of(capsys, "customers", "create", "bad id!", "--name", "x", "--database-url", url)
    assert code == 2 and "customer id" in err


@pytest.mark.parametrize("command", [*CUSTOMER_COMMANDS, ["status"]], ids=lambda c: c[0])
def test_each_customer_command_and_status_end_2_without_a_database(
    no_database_url: None, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    argv = command if command == ["status"] else ["customers", *command]
    code, out, err = status_of(capsys, *argv)
    assert (code, out) == (2, "")
    assert "error: no database: pass --database-url or set DATABASE_URL" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["customers", "list"],
        ["customers", "disable", "C1"],
        ["status"],
        ["db", "migrate", "--role", "admin"],
        ["db", "check", "--role", "admin"],
        ["db", "check", "--role", "client"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_a_database_that_does_not_answer_ends_2_without_its_password(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = status_of(capsys, *argv, "--database-url", _dead_url())
    assert (code, out) == (2, "")
    assert err.startswith("error: ") and "s3cret-pw" not in err


@pytest.mark.parametrize(
    "argv",
    [["customers", "list"], ["customers", "disable", "C1"], ["status"], ["db", "check", "--role", "admin"]],
    ids=lambda a: " ".join(a[:2]),
)
def test_a_database_without_the_fleet_schema_ends_2_with_a_clear_error(
    empty_db: str, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = status_of(capsys, *argv, "--database-url", empty_db)
    if argv[0] == "db":  # a check of an empty database: everything is pending, nothing wrong
        assert code == 0 and "pending: 001_core.sql" in out
        return
    assert (code, out) == (2, "")
    assert err.startswith("error: the database refused the command: UndefinedTable")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["customers"],
        ["customers", "disable"],
        ["customers", "create", "C1"],
        ["customers", "explode"],
        ["customers", "list", "--bogus"],
        ["db"],
        ["db", "migrate"],
        ["db", "migrate", "--role", "portal"],
        ["db", "check", "--role", "admin", "--profile", "oracle"],
        ["status", "--bogus"],
    ],
    ids=lambda a: " ".join(a) or "(nothing)",
)
def test_usage_errors_end_2_as_argparse_does(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = status_of(capsys, *argv)
    assert (code, out) == (2, "")
    assert "usage: fleet" in err


def test_db_commands_end_0_when_done_and_1_when_the_check_finds_problems(
    empty_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = empty_db
    assert status_of(capsys, "db", "check", "--role", "admin", "--database-url", url)[0] == 0
    assert status_of(capsys, "db", "migrate", "--role", "admin", "--profile", "postgres", "--database-url", url)[0] == 0
    assert status_of(capsys, "db", "check", "--role", "admin", "--database-url", url)[0] == 0
    # The portal's tables are missing: the client check runs and finds problems.
    code, _, err = status_of(capsys, "db", "check", "--role", "client", "--database-url", url, "--mapping",
                             str(ROOT / "layers/fleet/mappings/efcore-example.json"))  # fmt: skip
    assert code == 1 and "problems: the push cannot read this portal as mapped" in err
    # A profile the database cannot be switched to is refused.
    code, _, err = status_of(
        capsys, "db", "migrate", "--role", "admin", "--profile", "timescale", "--database-url", url
    )
    assert code == 2 and "set up with the postgres profile" in err


def test_status_ends_0_when_done(admin_db_postgres: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = status_of(capsys, "status", "--database-url", admin_db_postgres)
    assert code == 0 and "no customers yet" in out
    code, out, _ = status_of(capsys, "status", "--json", "--database-url", admin_db_postgres)
    assert code == 0 and json.loads(out) == []


def test_revoke_disable_enable_print_plain_text_and_json_when_asked(
    admin_db_postgres: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = admin_db_postgres
    status_of(capsys, "customers", "create", "C1", "--name", "one", "--database-url", url)
    status_of(capsys, "customers", "rotate-token", "C1", "--database-url", url)
    assert status_of(capsys, "customers", "revoke-token", "C1", "--keep-newest", "--database-url", url)[1] == (
        "1 token of C1 revoked, the newest kept\n"
    )
    assert status_of(capsys, "customers", "disable", "C1", "--database-url", url)[1] == "customer C1 disabled\n"
    assert status_of(capsys, "customers", "enable", "C1", "--database-url", url)[1] == "customer C1 enabled\n"
    out = status_of(capsys, "customers", "revoke-token", "C1", "--json", "--database-url", url)[1]
    assert json.loads(out) == {"revoked": 1}
    out = status_of(capsys, "customers", "disable", "C1", "--json", "--database-url", url)[1]
    assert json.loads(out) == {"customer_id": "C1", "status": "disabled"}
    out = status_of(capsys, "customers", "enable", "C1", "--json", "--database-url", url)[1]
    assert json.loads(out) == {"customer_id": "C1", "status": "active"}


def test_the_fleet_program_ends_with_the_same_statuses(admin_db_postgres: str) -> None:
    fleet = Path(sys.executable).with_name("fleet")
    if not fleet.exists():
        pytest.skip("the fleet program is not installed beside this Python (make venv installs it)")
    env = {"PATH": "/usr/bin:/bin"}

    def ended(*argv: str) -> tuple[int, str]:
        proc = subprocess.run([str(fleet), *argv], capture_output=True, text=True, env=env, timeout=60, check=False)
        return proc.returncode, proc.stderr

    assert ended("customers", "list", "--database-url", admin_db_postgres)[0] == 0
    code, err = ended("customers", "list")
    assert code == 2 and "no database" in err
    assert ended("customers", "disable", "NOPE", "--database-url", admin_db_postgres)[0] == 2
    assert ended("customers")[0] == 2


@pytest.mark.parametrize("option", ["--event", "--env-vars"])
def test_local_invoke_ends_2_for_a_file_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path in (bad, tmp_path / "missing.json"):
        code, out, err = status_of(capsys, "local", "invoke", "IngestFunction", option, str(path))
        assert (code, out) == (2, "")
        assert "cannot be read" in err and "Traceback" not in err
