"""The ``fleet`` command as a new user meets it: the embedded defaults (a throwaway
database unless DATABASE_URL is given), the sample events' token, the template's
Conditions, options after the action, and SIGTERM ending a command as Ctrl-C does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fleet import tokens
from fleet_local.cli import main
from fleet_local.embedded import SAMPLE_CUSTOMER, SAMPLE_TOKEN, register_sample_customer
from fleet_local.runner import REPO_ROOT
from support import EVENTS


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A temp folder the server's own account can enter (it runs as postgres under root)."""
    where = Path(tempfile.mkdtemp(prefix="fleet-cmd-test-"))
    where.chmod(0o755)
    yield where
    shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def no_database_url(monkeypatch: pytest.MonkeyPatch, scratch: Path) -> Path:
    """No DATABASE_URL, and throwaway clusters made in ``scratch`` (to see them go)."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return scratch


def _clusters_left(where: Path) -> list[Path]:
    return sorted(where.glob("fleet-pg-*"))


def test_the_sample_events_and_env_local_carry_the_sample_token() -> None:
    assert tokens.well_formed(SAMPLE_TOKEN)
    events = sorted((EVENTS / "ingest").glob("*.json"))
    assert len(events) >= 4
    for path in events:
        assert json.loads(path.read_text())["headers"]["x-customer-token"] == SAMPLE_TOKEN, path.name
    env_local = json.loads((REPO_ROOT / "env.sample.json").read_text())
    assert env_local["PushFunction"]["INGEST_TOKEN"] == SAMPLE_TOKEN


@pytest.mark.parametrize("name", ["sites.json", "measurements-gzip.json", "state.json"])
def test_invoke_without_database_url_uses_a_throwaway_database_with_the_sample_customer(
    name: str, no_database_url: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "local", "invoke", "IngestFunction", "--event", str(EVENTS / "ingest" / name),
            "--parameter-overrides", "Mode=admin", "DatabaseProfile=postgres",
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "embedded database (admin)" in err
    assert json.loads(out)["statusCode"] == 200, out
    assert _clusters_left(no_database_url) == []


def test_invoke_honours_database_url_from_the_shell(
    admin_db_postgres: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(admin_db_postgres, autocommit=True) as conn:
        register_sample_customer(conn)
    monkeypatch.setenv("DATABASE_URL", admin_db_postgres)
    code = main(
        ["local", "invoke", "IngestFunction", "--event", str(EVENTS / "ingest/sites.json"), "--parameter-overrides",
         "Mode=admin"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "embedded database" not in err
    assert json.loads(out)["statusCode"] == 200, out
    with psycopg.connect(admin_db_postgres) as conn:
        count = conn.execute("SELECT count(*) FROM fleet.sites WHERE customer_id = %s", (SAMPLE_CUSTOMER,)).fetchone()
    assert count == (2,)


def test_a_function_the_conditions_leave_out_is_refused_by_name(
    no_database_url: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["local", "invoke", "IngestFunction", "--parameter-overrides", "Mode=client"])
    err = capsys.readouterr().err
    assert code == 2
    assert "IngestFunction is not created with these parameters: its Condition IsAdmin is false (Mode='client')" in err
    assert _clusters_left(no_database_url) == []


def test_schedule_says_what_the_push_needs_and_schedules_only_the_clients_functions(
    no_database_url: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["local", "schedule", "--ticks", "1", "--parameter-overrides", "Mode=client", "IngestEnabled=true"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "PushFunction: INGEST_URL and INGEST_TOKEN not set" in err
    assert "env.sample.json" in err
    assert "MaintenanceFunction" not in out + err
    (tick,) = [line for line in out.splitlines() if "PushFunction:" in line]
    assert "INGEST_URL: not set" in tick
    assert _clusters_left(no_database_url) == []


def test_schedule_with_nothing_scheduled_says_which_parameters_schedule_what(capsys) -> None:
    assert main(["local", "schedule", "--parameter-overrides", "Mode=client"]) == 2
    assert "Mode=client IngestEnabled=true" in capsys.readouterr().err


def test_customer_options_work_after_the_action(admin_db_postgres: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = admin_db_postgres
    assert main(["customers", "create", "DEV0001", "--name", "Dev", "--database-url", url, "--json"]) == 0
    assert tokens.well_formed(json.loads(capsys.readouterr().out)["token"])
    assert main(["customers", "--database-url", url, "disable", "DEV0001"]) == 0  # before it, as ever
    capsys.readouterr()
    assert main(["customers", "list", "--json", "--database-url", url]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["id"], row["status"]) == ("DEV0001", "disabled")


def test_the_database_option_works_before_the_command_too(
    admin_db_postgres: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    url = admin_db_postgres
    assert main(["--database-url", url, "customers", "create", "DEV0002", "--name", "Dev", "--json"]) == 0
    capsys.readouterr()
    assert main(["--database-url", url, "customers", "list", "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == ["DEV0002"]
    assert main(["--database-url", url, "db", "check", "--role", "admin"]) == 0
    assert main(["--database-url", url, "status"]) == 0
    with pytest.raises(SystemExit, match="no database"):
        main(["customers", "list"])


def _postmaster_pid(where: Path) -> int:
    (pidfile,) = where.glob("fleet-pg-*/data/postmaster.pid")
    return int(pidfile.read_text().split()[0])


def _running(pid: int) -> bool:
    try:
        return "postgres" in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return False


def test_sigterm_ends_start_api_as_ctrl_c_does_with_no_postgres_left(scratch: Path) -> None:
    tmp_path = scratch
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet_local.cli", "local", "start-api", "--port", "0",
         "--parameter-overrides", "DatabaseProfile=postgres"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 120
        lines: list[str] = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if not line or "serving on" in line:
                break
        assert "serving on" in lines[-1], "".join(lines)
        postgres = _postmaster_pid(tmp_path)
        assert _running(postgres)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not _running(postgres)
    assert _clusters_left(tmp_path) == []


def test_a_database_url_that_does_not_answer_is_named_by_source_without_its_password(
    no_database_url: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleet_local.cluster import free_port

    monkeypatch.setenv("DATABASE_URL", f"postgresql://fleet:s3cret-pw@127.0.0.1:{free_port()}/fleet_admin")
    with pytest.raises(SystemExit) as stopped:
        main(["local", "invoke", "IngestFunction", "--parameter-overrides", "Mode=admin"])
    message = str(stopped.value.code)
    assert "the DATABASE_URL of the environment does not answer" in message
    assert "leave DATABASE_URL out and a throwaway database is started" in message
    assert "s3cret-pw" not in message
    assert _clusters_left(no_database_url) == []
