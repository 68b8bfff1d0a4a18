"""Shared by the benchmarks: a throwaway database, handler loading, the summary line."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
from fleet.schema.migrate import migrate
from fleet.schema.runner import timescaledb_offered
from fleet_local.cluster import LocalCluster
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
# Read once: the benchmarks point their handlers at their own databases through
# DATABASE_URL, which must not change which server the next benchmark uses.
_GIVEN_SERVER = os.environ.get("DATABASE_URL")
RESULTS = ROOT / "bench" / "results"


def summary(name: str, value: float, unit: str, ratio: float | None, note: str = "") -> str:
    """One line per figure: ``name value unit ratio`` (comparable across runs)."""
    r = "-" if ratio is None else f"{ratio:.3f}"
    line = f"{name} {value:.6g} {unit} {r}" + (f"  # {note}" if note else "")
    print(line, flush=True)
    return line


def load_handler(relative: str) -> ModuleType:
    """A fresh copy of a handler module, reading the environment as it is now."""
    from fleet import config

    config.cached.cache_clear()
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def server() -> Iterator[tuple[str, bool]]:
    """(maintenance URL, has TimescaleDB): DATABASE_URL, or a throwaway cluster."""
    url = _GIVEN_SERVER
    if url:
        with psycopg.connect(url) as conn:
            yield url, timescaledb_offered(conn)
        return
    cluster = LocalCluster().start()
    try:
        yield cluster.url(), cluster.has_timescaledb
    finally:
        cluster.stop()


@contextmanager
def database(server_url: str, role: str | None = None, profile: str = "postgres") -> Iterator[str]:
    name = f"fleet_bench_{os.getpid()}_{int(time.time() * 1000) % 10**9}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(server_url)
    info["dbname"] = name
    url = psycopg.conninfo.make_conninfo("", **info)
    try:
        if role:
            with psycopg.connect(url, autocommit=True) as conn:
                migrate(conn, role, profile)  # type: ignore[arg-type]
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def measurement_rows(
    count: int, devices: int = 50, start: datetime | None = None, seed: int = 7
) -> list[dict[str, Any]]:
    """Readings one per minute per device, like a fleet's meters report them."""
    rng = random.Random(seed)
    start = start or (datetime.now(UTC) - timedelta(days=20)).replace(second=0, microsecond=0)
    rows = []
    for i in range(count):
        device = i % devices
        t = start + timedelta(minutes=i // devices)
        rows.append(
            {
                "time": t.isoformat(),
                "device_id": f"meter-{device:04d}",
                "power_w": round(rng.uniform(100, 5000), 2),
                "voltage_v": round(rng.uniform(225, 235), 2),
                "current_a": round(rng.uniform(0.5, 20), 3),
                "energy_wh": 1_000_000 + i * 1.5,
                "power_factor": round(rng.uniform(0.8, 1.0), 3),
                "frequency_hz": round(rng.uniform(49.9, 50.1), 3),
            }
        )
    return rows


def gzip_body(items: list[dict[str, Any]]) -> bytes:
    return gzip.compress(json.dumps({"items": items}, separators=(",", ":")).encode(), compresslevel=5)


def save(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    return path
