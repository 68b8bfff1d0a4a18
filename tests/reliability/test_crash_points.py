"""The push process killed with SIGKILL at each point of a batch's life; after a
restart every numbered row is on the Admin side exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import boto3
import pytest
from fleet_local.embedded import ensure_state_table
from harness import INGEST_PATH, admin_api, new_token, tally, write_numbered
from support import ROOT

CHILD = r"""
import json, os, signal, sys
import psycopg
from fleet.push.report import Checkpoints
from fleet.push.service import PushService
from fleet.push.state import PushStateStore
from fleet.push.transport import IngestClient

crash_at = os.environ.get("CRASH_AT", "")

class KillHere(Checkpoints):
    def reached(self, name, resource):
        if name == crash_at and resource == "measurements":
            os.kill(os.getpid(), signal.SIGKILL)

service = PushService(
    lambda: psycopg.connect(os.environ["CLIENT_URL"], autocommit=True),
    PushStateStore.connect(os.environ["STATE_TABLE"], os.environ["DYNAMODB_ENDPOINT_URL"]),
    IngestClient(os.environ["INGEST_URL"], os.environ["INGEST_TOKEN"], 2.0, 10.0),
    batch_size=50,
    max_batches=2,
    lease_seconds=1,
    checkpoints=KillHere(),
)
print(json.dumps(service.tick().as_dict()))
"""


def _run(env: dict[str, str], crash_at: str = "") -> tuple[int, dict[str, Any] | None]:
    child_env = dict(os.environ, **env, CRASH_AT=crash_at, PYTHONPATH=str(ROOT / "layers/fleet"))
    proc = subprocess.run([sys.executable, "-c", CHILD], env=child_env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"sites"')]
    return proc.returncode, (json.loads(lines[-1]) if lines else None)


@pytest.mark.parametrize("point", ["after_read", "after_send", "after_2xx", "after_cursor_saved"])
def test_sigkill_at_each_point_loses_and_doubles_nothing(
    point: str, admin_db_postgres: str, client_db: str, dynamodb_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_numbered(client_db, 1, 400, per_tx=37)
    token = new_token(admin_db_postgres, "CRASH")
    table = f"state-{point}"
    ensure_state_table(dynamodb_endpoint, table)
    with admin_api(admin_db_postgres, monkeypatch) as api:
        env = {
            "CLIENT_URL": client_db,
            "STATE_TABLE": table,
            "DYNAMODB_ENDPOINT_URL": dynamodb_endpoint,
            "INGEST_URL": api.url + INGEST_PATH,
            "INGEST_TOKEN": token,
        }
        kills = 0
        for _ in range(3):  # killed at the same point three times over
            code, _report = _run(env, crash_at=point)
            assert code == -signal.SIGKILL, f"the push was not killed at {point} (exit {code})"
            kills += 1
            time.sleep(1.1)  # the dead holder's lease runs out
        for _ in range(40):
            code, report = _run(env)
            assert code == 0 and report is not None
            if report["measurements"]["outcome"] == "idle":
                break
        else:
            raise AssertionError("backlog not drained after the crashes")
    result = tally(client_db, admin_db_postgres, "CRASH")
    assert kills == 3
    assert len(result.sent) == 400
    assert result.missing == set()
    assert result.doubled == 0
    state = (
        boto3.resource("dynamodb", endpoint_url=dynamodb_endpoint)
        .Table(table)
        .get_item(Key={"resource": "measurements"})
    )
    assert "cursor" in state["Item"]
