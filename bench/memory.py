"""Memory: peak RSS of one ingest invocation, in a fresh process, for the largest
accepted batch and for each pathological shape a body within the configured limits can
take (16 MB decompressed: deep nesting, millions of empty arrays or objects, maximal
strings, maximal numbers of items), against the function's MemorySize in template.yaml
and against the same process's RSS after importing the handler."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from fleet import customers
from fleet_local.template import Template

from bench.common import ROOT, database, gzip_body, measurement_rows, server, summary

FUNCTION_MEMORY_MB = Template(ROOT / "template.yaml").all_functions()["IngestFunction"].memory_mb
DECOMPRESSED_LIMIT = 16_000_000  # MAX_DECOMPRESSED_BYTES' default

_CHILD = r"""
import json, os, time
from datetime import UTC, datetime
import ingest
from bench.ingest_throughput import _Ctx, _event
from bench.common import measurement_rows, gzip_body
def peak_kb():
    # VmHWM: this process image's own peak. getrusage's ru_maxrss would also carry
    # the parent's peak over fork and exec (a bench run after a large one read 500 MB).
    with open("/proc/self/status") as fh:
        return int(next(line.split()[1] for line in fh if line.startswith("VmHWM:")))
with open(os.environ["BENCH_BODY"], "rb") as fh:
    body = fh.read()
event = _event(body, os.environ["BENCH_TOKEN"])
before = peak_kb()
warm = measurement_rows(1, start=datetime(2026, 1, 1, tzinfo=UTC))
ingest.handler(_event(gzip_body(warm), os.environ["BENCH_TOKEN"]), _Ctx())
after_warm = peak_kb()
started = time.perf_counter()
result = ingest.handler(event, _Ctx())
seconds = time.perf_counter() - started
peak = peak_kb()
print(json.dumps({"status": result["statusCode"], "body": json.loads(result["body"]), "before_kb": before,
                  "warm_kb": after_warm, "peak_kb": peak, "body_bytes": len(body), "seconds": seconds}))
"""


def peak_of_one_invocation(db_url: str, gzipped_body: bytes, *, max_items: int = 10_000) -> dict[str, Any]:
    """The answer and the peak RSS of the real handler taking one body, in a process of its own.

    ``db_url`` is a migrated Admin database; a customer is created for the call."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        token = customers.create(conn, f"MEM{uuid.uuid4().hex[:12]}", "memory").token
    with tempfile.NamedTemporaryFile(suffix=".json.gz", delete=False) as body_file:
        body_file.write(gzipped_body)
    env = dict(
        os.environ,
        BENCH_BODY=body_file.name,
        DATABASE_URL=db_url,
        MAX_ITEMS=str(max_items),
        MAX_DECOMPRESSED_BYTES=str(DECOMPRESSED_LIMIT),
        BENCH_TOKEN=token,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "layers/fleet"), str(ROOT / "functions/ingest")]),
    )
    env.pop("DB_SECRET_ARN", None)
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, check=True)
    finally:
        os.unlink(body_file.name)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"status"')][-1]
    doc: dict[str, Any] = json.loads(line)
    return doc


def _item(extra: bytes, device: bytes = b"meter-1") -> bytes:
    return b'{"time": "2026-01-01T00:00:00Z", "device_id": "' + device + b'", "power_w": 1.0, "extra": ' + extra + b"}"


def _envelope(*items: bytes) -> bytes:
    return b'{"items": [' + b", ".join(items) + b"]}"


def _filled(unit: bytes, room: int) -> bytes:
    return (unit * (room // len(unit))).rstrip(b",")


def _shapes(items: int) -> dict[str, Callable[[], bytes]]:
    """Each pathological shape filling the decompressed limit, built lazily."""
    room = DECOMPRESSED_LIMIT - 200
    return {
        "empty_arrays_in_ignored_field": lambda: _envelope(_item(b"[" + _filled(b"[[]],", room) + b"]")),
        "empty_objects_in_a_bad_item": lambda: _envelope(_item(b"[" + _filled(b"{},", room) + b"]", b"m" * 65)),
        "empty_objects_as_items": lambda: b'{"items": [' + _filled(b"{},", room) + b"]}",
        "deep_nesting": lambda: _envelope(_item(b"1"), *([_item(b"[" * 10_000 + b"]" * 10_000)] * (room // 20_100))),
        "maximal_string": lambda: _envelope(_item(b'"' + b"x" * room + b'"')),
        "maximal_escaped_string": lambda: _envelope(_item(b'"' + b"\\u0000" * (room // 6) + b'"')),
        "maximal_numbers": lambda: _envelope(_item(b"[" + _filled(b"1e308,", room) + b"]")),
        "maximal_items": lambda: gzip.decompress(gzip_body(measurement_rows(items, devices=200))),
    }


def main(smoke: bool = False) -> dict[str, float]:
    items = 500 if smoke else 10_000
    peaks: dict[str, float] = {}
    with server() as (url, _), database(url, "admin", "postgres") as db:
        shapes = _shapes(items)
        for name in ["maximal_items"] if smoke else list(shapes):
            body = shapes[name]()
            assert len(body) <= DECOMPRESSED_LIMIT, (name, len(body))
            doc = peak_of_one_invocation(db, gzip.compress(body, 6), max_items=items)
            del body
            assert doc["status"] in (200, 400, 413), (name, doc["status"], doc["body"])
            if name == "maximal_items":
                assert doc["status"] == 200 and doc["body"]["accepted"] == items, doc
                summary("memory.ingest_warm_rss", doc["warm_kb"] / 1024, "MB", 1.0, "baseline: handler imported, warm")
            peak_mb = doc["peak_kb"] / 1024
            peaks[name] = peak_mb
            body = doc["body"]
            answer = f"{doc['status']} " + (
                f"accepted {body['accepted']} rejected {body['rejected']}" if doc["status"] == 200 else body["message"]
            )
            summary(
                "memory.ingest_peak_rss" + ("" if name == "maximal_items" else f".{name}"),
                peak_mb,
                "MB",
                peak_mb / FUNCTION_MEMORY_MB,
                f"vs MemorySize {FUNCTION_MEMORY_MB} MB; {doc['body_bytes'] / 1e6:.3f} MB gzip; {answer};"
                f" handled in {doc['seconds']:.2f} s",
            )
    assert max(peaks.values()) < FUNCTION_MEMORY_MB, peaks
    return peaks
