"""Shared by the reliability suite: a real Admin API (the ingest handler served over
local HTTP), a DynamoDB endpoint other processes can reach (moto server), numbered
rows on the Client side, and the sent == received check."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ingest
import psycopg
from fleet import config, customers
from fleet.push.service import PushService
from fleet_local.api import LocalHttpApi, Route, serving
from support import Clock, one_at_a_time

INGEST_PATH = "/api/fleet/ingest"
__all__ = ["INGEST_PATH", "Clock"]


def reset_caches() -> None:
    config.cached.cache_clear()
    ingest.service.cache_clear()


@contextmanager
def admin_api(
    admin_url: str, monkeypatch: Any, wrap: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None
) -> Iterator[LocalHttpApi]:
    """The real ingest handler behind local HTTP, against ``admin_url``."""
    monkeypatch.setenv("DATABASE_URL", admin_url)
    reset_caches()
    serial = one_at_a_time(ingest.handler)
    handler = wrap(serial) if wrap else serial
    routes = [Route("POST", INGEST_PATH, handler), Route("GET", f"{INGEST_PATH}/state", handler)]
    try:
        with serving(routes) as api:
            ingest.service()  # settle the Admin's configuration before anything else changes the env
            yield api
    finally:
        reset_caches()


def new_token(admin_url: str, customer_id: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        return customers.create(conn, customer_id, customer_id).token


def write_numbered(client_url: str, first: int, count: int, device: str = "serial", per_tx: int = 0) -> None:
    """Rows numbered first..first+count-1 in power_w; one transaction, or per_tx rows each."""
    step = per_tx or count
    with psycopg.connect(client_url, autocommit=True) as conn:
        for start in range(first, first + count, step):
            end = min(start + step, first + count) - 1
            conn.execute(
                "INSERT INTO monitoring.power_measurements (time, device_id, power_w)"
                " SELECT '2026-06-01T00:00:00Z'::timestamptz + make_interval(secs => g), %s, g"
                " FROM generate_series(%s::int, %s::int) g",
                (device, start, end),
            )


def numbers(url: str, query: str, *params: Any) -> list[int]:
    with psycopg.connect(url) as conn:
        return [int(r[0]) for r in conn.execute(query, params)]


@dataclass
class Tally:
    sent: list[int]
    received: list[int]

    @property
    def missing(self) -> set[int]:
        return set(self.sent) - set(self.received)

    @property
    def doubled(self) -> int:
        return len(self.received) - len(set(self.received))


def tally(client_url: str, admin_url: str, customer_id: str, device: str = "serial") -> Tally:
    return Tally(
        numbers(client_url, "SELECT power_w FROM monitoring.power_measurements WHERE device_id = %s", device),
        numbers(
            admin_url,
            "SELECT power_w FROM fleet.power_measurements WHERE customer_id = %s AND device_id = %s",
            customer_id,
            device,
        ),
    )


def drain(service: PushService, clock: Clock, ticks: int = 300, step: float = 1900.0) -> int:
    """Tick until a tick finds nothing to do; the clock jumps past any backoff."""
    for n in range(ticks):
        report = service.tick()
        # Done when no measurement is left and nothing failed; sites and devices may
        # be re-sent on any tick (at least hourly), so they do not decide it.
        if report.resources["measurements"].outcome == "idle" and not any(
            r.outcome in ("failed", "refused", "backoff", "leased") for r in report.resources.values()
        ):
            return n
        clock.advance(step)
    raise AssertionError("backlog not drained")
