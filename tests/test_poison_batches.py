"""No poison batch: every body gets a final answer (200 with the bad items rejected and
quarantined, or 400 for the envelope), audited, and never a 429/503 for something the
body holds. Through the real handler, against a real PostgreSQL Admin database."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fleet.sam_template import Template
from support import ROOT, http_event
from test_ingest import NOW, Answer, IngestClient, _client, m

FUNCTION_MEMORY_MB = Template(ROOT / "template.yaml").functions()["IngestFunction"].memory_mb


@pytest.fixture
def api(admin_db_postgres: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[IngestClient]:
    yield from _client(admin_db_postgres, monkeypatch)


def audit(api: IngestClient) -> list[tuple[Any, ...]]:
    return api.sql(
        "SELECT status, batch_type, client_cursor, accepted, rejected, error FROM fleet.ingest_events ORDER BY id"
    )


def quarantined(api: IngestClient) -> list[tuple[Any, ...]]:
    return api.sql("SELECT item_index, reason, payload FROM fleet.quarantine ORDER BY id")


def post_raw(api: IngestClient, body: str | bytes, headers: dict[str, str]) -> Answer:
    hdrs = {"x-customer-token": api.token, "x-batch-id": str(uuid.uuid4()), **headers}
    return api.call(http_event("ingest/measurements.json", headers=hdrs, body=body))


def peak_of_one_invocation(db_url: str, gzipped: bytes) -> dict[str, Any]:
    """bench/memory.py's measurement: the handler in a fresh process, its VmHWM."""
    with tempfile.NamedTemporaryFile(suffix=".gz", delete=False) as fh:
        fh.write(gzipped)
    script = (
        "import json, sys; from bench.memory import peak_of_one_invocation as peak;"
        " print(json.dumps(peak(sys.argv[1], open(sys.argv[2], 'rb').read())))"
    )
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "layers/fleet")])}
        proc = subprocess.run(
            [sys.executable, "-c", script, db_url, fh.name], capture_output=True, text=True, env=env, check=False
        )
    finally:
        os.unlink(fh.name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return doc


def good(n: int, device: str = "good") -> list[dict[str, Any]]:
    return [m(NOW + timedelta(seconds=i), device=device) for i in range(n)]


# --- the nine failures of the black-box probe, one by one ---------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("filler", "device"),
    [(b"[[]],", "meter-1"), (b"{},", "m" * 65)],
    ids=["1-empty-arrays-in-an-ignored-field", "2-empty-objects-in-an-item-with-a-bad-id"],
)
def test_16_mb_of_empty_values_stays_within_the_function_memory(
    admin_db_postgres: str, filler: bytes, device: str
) -> None:
    # 16 MB (inside every default limit) of tiny values: the first in an ignored field
    # of a valid item, the second inside an item whose id is one character too long.
    junk = filler * ((16_000_000 - 200) // len(filler))
    body = (
        b'{"items": [{"time": "2026-01-01T00:00:00Z", "device_id": "' + device.encode() + b'", "extra": ['
        b"" + junk.rstrip(b",") + b"]}]}"
    )
    assert len(body) <= 16_000_000
    outcome = peak_of_one_invocation(admin_db_postgres, gzip.compress(body))
    assert outcome["status"] == 200, outcome
    assert outcome["body"]["accepted"] + outcome["body"]["rejected"] == 1
    assert outcome["peak_kb"] / 1024 < FUNCTION_MEMORY_MB, outcome


def test_3_two_huge_finite_powers_in_one_device_hour_do_not_stall_the_batch(api: IngestClient) -> None:
    hour = NOW.replace(minute=0)
    items = [
        *good(3),
        m(hour, device="huge", power=1.7e308),
        m(hour + timedelta(minutes=1), device="huge", power=1.7e308),
    ]
    answer = api.post("measurements", items)
    assert answer.status == 200, answer.body
    assert answer.body["accepted"] + answer.body["rejected"] == 5
    assert api.one("SELECT count(*) FROM fleet.power_measurements WHERE device_id = 'good'") == 3
    # Whatever the store could not take is rejected by index and kept in the quarantine.
    assert len(quarantined(api)) == answer.body["rejected"]
    assert {e["index"] for e in answer.body["errors"]} <= {3, 4}
    assert audit(api)[-1][0] == 200


@pytest.mark.parametrize("key", ["\ud800", "\u0000"], ids=["4-lone-surrogate", "5-nul"])
def test_4_5_an_unstorable_top_level_key_is_400_and_audited(api: IngestClient, key: str) -> None:
    body = json.dumps({"items": good(1), key: 1})  # ensure_ascii: the key travels as an escape
    answer = post_raw(api, body, {"x-batch-type": "measurements", "x-push-cursor": "c"})
    assert answer.status == 400
    assert "unknown top-level keys" in answer.body["message"]
    rows = audit(api)
    assert [r[0] for r in rows] == [400]
    # The refused body is kept as sent, recoverable: the escape stays an escape.
    ((index, reason, payload),) = quarantined(api)
    assert index is None and "unknown keys" in reason
    assert json.loads(payload) == {"items": good(1), key: 1}


@pytest.mark.parametrize(
    "time",
    ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"],
    ids=["6-before-year-1-in-utc", "7-after-year-9999-in-utc"],
)
def test_6_7_times_that_overflow_in_utc_are_rejected_with_a_reason(api: IngestClient, time: str) -> None:
    answer = api.post("measurements", [*good(2), m(time, device="clock-unset")])
    assert answer.status == 200, answer.body
    assert (answer.body["accepted"], answer.body["rejected"]) == (2, 1)
    assert answer.body["errors"][0]["index"] == 2
    assert "time" in answer.body["errors"][0]["reason"]
    ((index, _, payload),) = quarantined(api)
    assert index == 2 and time in payload
    assert audit(api)[-1][:5] == (200, "measurements", "c-1", 2, 1)


def test_8_a_nul_in_the_batch_type_is_400_and_audited_recoverably(api: IngestClient) -> None:
    answer = post_raw(api, json.dumps({"items": good(1)}), {"x-batch-type": "measure\x00ments"})
    assert answer.status == 400
    ((status, batch_type, *_),) = audit(api)
    assert status == 400
    assert json.loads(batch_type) == "measure\x00ments"


def test_9_a_nul_in_the_cursor_is_a_final_answer_and_audited_recoverably(api: IngestClient) -> None:
    answer = post_raw(
        api, json.dumps({"items": good(2)}), {"x-batch-type": "measurements", "x-push-cursor": "cur\x00sor"}
    )
    assert answer.status == 200, answer.body
    assert answer.body["accepted"] == 2
    ((status, _, cursor, *_),) = audit(api)
    assert status == 200
    assert json.loads(cursor) == "cur\x00sor"
    # The ledger gives the client back exactly the cursor it sent.
    assert api.state().body["ledger"]["measurements"]["cursor"] == "cur\x00sor"
