"""python -m bench FIGURE [--smoke]   (figures: ingest push growth coldstart memory e2e all)"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

FIGURES = {
    "ingest": "bench.ingest_throughput",
    "push": "bench.push_throughput",
    "growth": "bench.growth",
    "coldstart": "bench.cold_start",
    "memory": "bench.memory",
    "e2e": "bench.e2e",
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("figure", choices=[*FIGURES, "all"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the benchmark still works")
    args = parser.parse_args()
    print(f"# machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()}")
    for name in FIGURES if args.figure == "all" else [args.figure]:
        importlib.import_module(FIGURES[name]).main(smoke=args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
