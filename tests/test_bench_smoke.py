"""The benchmarks stay working: each runs with tiny sizes and prints its figures.
(The figures themselves are measured by `python -m bench`, not here.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from support import ROOT

LINE = re.compile(r"^(\S+) (\S+) (\S+) (\S+)(  # .*)?$")


def test_every_benchmark_runs_and_prints_its_summary_lines(pg_server) -> None:
    env = dict(
        os.environ,
        DATABASE_URL=pg_server.base_url,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "layers/fleet")]),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = {m[1]: m for line in proc.stdout.splitlines() if (m := LINE.match(line))}
    for name in (
        "ingest.postgres.handler",
        "ingest.postgres.copy",
        "ingest.postgres.naive_executemany",
        "ingest.postgres.redelivery",
        "push.path",
        "push.copy_to_stdout",
        "push.copy_json_to_stdout",
        "push.read_ahead_without_round_trip",
        "growth.cursor_query_200000",
        "growth.postgres.ingest_batch_200000",
        "growth.digest_tick_200000",
        "growth.postgres.digest_compare_200000",
        "coldstart.ingest_import",
        "coldstart.minimal_powertools_import",
        "memory.ingest_peak_rss",
        "e2e.copy_pipe",
        "e2e.push",
        "e2e.ticks",
        "e2e.drain_at_schedule",
        "e2e.several.copy_pipes",
        "e2e.several.push",
        "e2e.freshness_p99",
    ):
        assert name in figures, f"{name} missing from:\n{proc.stdout}"
        assert float(figures[name][2]) > 0
    if pg_server.has_timescale:
        assert "ingest.timescale.handler" in figures
        assert "growth.timescale.ingest_batch_200000" in figures
