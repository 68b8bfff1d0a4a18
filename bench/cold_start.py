"""Cold start: each handler module's import time in a fresh interpreter, against a
minimal Powertools handler's import in the same run; and each function's size as
``sam build`` leaves it (the shared layer counted once)."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT, summary

MINIMAL = (
    "from aws_lambda_powertools import Logger, Metrics, Tracer\n"
    "from aws_lambda_powertools.event_handler import APIGatewayHttpResolver\n"
    "from aws_lambda_powertools.utilities.parser import parse\n"
    "logger = Logger(); metrics = Metrics(namespace='x'); tracer = Tracer(); app = APIGatewayHttpResolver()\n"
    "def handler(event, context):\n    return app.resolve(event, context)\n"
)
HANDLERS = {
    "ingest": ("functions/ingest", "import ingest"),
    "push": ("functions/push", "import push"),
    "bootstrap": ("functions/bootstrap", "import bootstrap"),
}


def _import_us(code: str, path: str | None, repeats: int) -> float:
    """Median over fresh interpreters of the total import time ``-X importtime`` reports."""
    totals = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (path, str(ROOT / "layers/fleet")) if p))
    env.setdefault("AWS_DEFAULT_REGION", "eu-west-1")
    for _ in range(repeats):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, env=env, check=True
        )
        # Sum the cumulative time of top-level imports (indent level 0 rows).
        total = 0
        for line in proc.stderr.splitlines():
            m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)
            if m and not m.group(2).startswith(" "):
                total += int(m.group(1))
        totals.append(total)
    return statistics.median(totals)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(smoke: bool = False) -> dict[str, float]:
    repeats = 3 if smoke else 15
    out: dict[str, float] = {}
    minimal_dir = ROOT / "bench" / "results"
    minimal_dir.mkdir(parents=True, exist_ok=True)
    (minimal_dir / "minimal_handler.py").write_text(MINIMAL)
    base = _import_us("import minimal_handler", str(minimal_dir), repeats)
    summary("coldstart.minimal_powertools_import", base / 1000, "ms", 1.0, "baseline")
    for name, (code_dir, code) in HANDLERS.items():
        us = _import_us(code, str(ROOT / code_dir), repeats)
        out[name] = us
        summary(f"coldstart.{name}_import", us / 1000, "ms", us / base, "target: under 1.5 x the minimal handler")
    build = ROOT / ".aws-sam" / "build"
    if build.is_dir():
        for fn in sorted(p for p in build.iterdir() if p.is_dir()):
            summary(f"size.{fn.name}", _size(fn) / 1e6, "MB", None)
    else:
        print("size: run `make build` first for the sam build sizes", flush=True)
    return out
