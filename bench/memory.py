"""Memory: peak RSS of one ingest invocation with the largest accepted batch (the
configured item limit, as a gzip body), in a fresh process, against the same
process's RSS after importing the handler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import psycopg
from fleet import customers

from bench.common import ROOT, database, gzip_body, measurement_rows, server, summary

_CHILD = r"""
import base64, gzip, json, os, sys
from datetime import UTC, datetime, timedelta
import ingest
from bench.ingest_throughput import _Ctx, _event
from bench.common import measurement_rows, gzip_body
n = int(os.environ["MAX_ITEMS"])
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
result = ingest.handler(event, _Ctx())
peak = peak_kb()
print(json.dumps({"status": result["statusCode"], "body": json.loads(result["body"]), "before_kb": before,
                  "warm_kb": after_warm, "peak_kb": peak, "body_bytes": len(body)}))
"""


def main(smoke: bool = False) -> dict[str, float]:
    items = 500 if smoke else 10_000
    with server() as (url, _), database(url, "admin", "postgres") as db:
        with psycopg.connect(db, autocommit=True) as conn:
            token = customers.create(conn, "MEM", "mem").token
        body_file = tempfile.NamedTemporaryFile(suffix=".json.gz", delete=False)
        body_file.write(gzip_body(measurement_rows(items, devices=200)))
        body_file.close()
        env = dict(
            os.environ,
            BENCH_BODY=body_file.name,
            DATABASE_URL=db,
            MAX_ITEMS=str(items),
            BENCH_TOKEN=token,
            PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "layers/fleet"), str(ROOT / "functions/ingest")]),
        )
        try:
            proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, check=True)
        finally:
            os.unlink(body_file.name)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"status"')][-1]
        doc = json.loads(line)
    assert doc["status"] == 200 and doc["body"]["accepted"] == items, doc
    peak_mb, warm_mb = doc["peak_kb"] / 1024, doc["warm_kb"] / 1024
    summary("memory.ingest_warm_rss", warm_mb, "MB", 1.0, "baseline: the handler imported and warm")
    summary(
        "memory.ingest_peak_rss",
        peak_mb,
        "MB",
        peak_mb / warm_mb,
        f"{items} items, {doc['body_bytes'] / 1e6:.2f} MB gzip body; target under 256 MB",
    )
    return {"peak_mb": peak_mb, "warm_mb": warm_mb}
