"""The client bootstrap (custom resource) checks the source mapping before it changes
anything, and answers CloudFormation with every problem named."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import bootstrap
import psycopg
import pytest
from fleet import config
from support import FakeLambdaContext, load_event, recording_server
from test_portal_mapping import EF_CORE_MAPPING, EF_CORE_SCHEMA


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in ("DATABASE_URL", "DB_SECRET_ARN", "FLEET_ROLE", "DATABASE_PROFILE", "PUSH_SOURCE_MAPPING"):
        monkeypatch.delenv(name, raising=False)
    config.cached.cache_clear()
    yield monkeypatch
    config.cached.cache_clear()


def _create() -> dict:
    with recording_server() as (base, seen):
        event = load_event("bootstrap/create.json")
        event["ResponseURL"] = f"{base}/cfn-response?X-Amz-Signature=abc"
        bootstrap.handler(event, FakeLambdaContext(timeout_s=120))
    assert len(seen) == 1
    return seen[0].json()


def test_a_mapping_that_does_not_fit_fails_the_stack_naming_each_problem(env, empty_db: str, tmp_path: Path) -> None:
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(EF_CORE_SCHEMA)
        conn.execute('ALTER TABLE monitoring."PowerMeasurements" DROP COLUMN "FrequencyHz"')
    doc = json.loads(json.dumps(EF_CORE_MAPPING))
    doc["devices"]["columns"]["firmware_version"] = '"Firmware"'
    (tmp_path / "portal.json").write_text(json.dumps(doc))
    env.setenv("DATABASE_URL", empty_db)
    env.setenv("FLEET_ROLE", "client")
    env.setenv("PUSH_SOURCE_MAPPING", str(tmp_path / "portal.json"))
    answer = _create()
    assert answer["Status"] == "FAILED"
    assert 'devices.firmware_version: column "Firmware" does not exist' in answer["Reason"]
    assert 'measurements.frequency_hz: column "FrequencyHz" does not exist' in answer["Reason"]
    with psycopg.connect(empty_db) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_attribute WHERE attname = 'push_xid' AND NOT attisdropped"
        ).fetchone() == (0,)


def test_a_mapping_that_fits_is_applied_and_reported(env, empty_db: str, tmp_path: Path) -> None:
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(EF_CORE_SCHEMA)
    (tmp_path / "portal.json").write_text(json.dumps(EF_CORE_MAPPING))
    env.setenv("DATABASE_URL", empty_db)
    env.setenv("FLEET_ROLE", "client")
    env.setenv("PUSH_SOURCE_MAPPING", str(tmp_path / "portal.json"))
    answer = _create()
    assert answer["Status"] == "SUCCESS", answer["Reason"]
    assert "column push_xid added to monitoring.PowerMeasurements" in answer["Data"]["Changes"]
    assert "PowerMeasurements_push_cursor_idx built" in answer["Data"]["Changes"]
    assert _create()["Data"]["Changes"] == "-"  # nothing left to do


def test_a_mapping_file_that_is_missing_fails_the_stack(env, empty_db: str, tmp_path: Path) -> None:
    env.setenv("DATABASE_URL", empty_db)
    env.setenv("FLEET_ROLE", "client")
    env.setenv("PUSH_SOURCE_MAPPING", "mappings/nowhere.json")
    answer = _create()
    assert answer["Status"] == "FAILED"
    assert "source mapping mappings/nowhere.json not found" in answer["Reason"]
