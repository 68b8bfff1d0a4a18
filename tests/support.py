"""Helpers shared by the tests: a Lambda context, event fixtures, env handling, a
local HTTP listener that records what it is sent, and the push against the real
ingest served over local HTTP."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from fleet.push.service import PushService
from fleet.push.state import PushStateStore
from fleet.push.transport import IngestClient

if TYPE_CHECKING:
    import pytest
    from fleet_local.api import Route

ROOT = Path(__file__).resolve().parents[1]
EVENTS = ROOT / "events"
INGEST_PATH = "/api/fleet/ingest"


def load_event(relative: str) -> dict[str, Any]:
    return json.loads((EVENTS / relative).read_text())


@dataclass
class FakeLambdaContext:
    function_name: str = "fleet-test"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = "arn:aws:lambda:eu-west-1:123456789012:function:fleet-test"
    aws_request_id: str = "00000000-0000-4000-8000-000000000000"
    timeout_s: float = 30.0
    _started: float = field(default_factory=time.monotonic)

    def get_remaining_time_in_millis(self) -> int:
        return int((self.timeout_s - (time.monotonic() - self._started)) * 1000)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@contextmanager
def recording_server() -> Iterator[tuple[str, list[Recorded]]]:
    """An HTTP server on 127.0.0.1 that answers 200 and records each request."""
    seen: list[Recorded] = []

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            seen.append(Recorded(self.command, self.path, dict(self.headers), self.rfile.read(length)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_PUT = do_POST = do_GET = _record

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def http_event(
    template: str,
    *,
    headers: dict[str, str] | None = None,
    drop_headers: tuple[str, ...] = (),
    body: str | bytes | None = None,
    query: str = "",
) -> dict[str, Any]:
    """An HTTP API (payload 2.0) event from ``events/``, with headers and body replaced.

    Bytes bodies are sent base64-encoded, as API Gateway does for binary bodies."""
    import base64

    event = load_event(template)
    for name in drop_headers:
        event["headers"].pop(name, None)
    event["headers"].update({k.lower(): v for k, v in (headers or {}).items()})
    if body is not None:
        if isinstance(body, bytes):
            event["body"] = base64.b64encode(body).decode()
            event["isBase64Encoded"] = True
        else:
            event["body"] = body
            event["isBase64Encoded"] = False
    event["rawQueryString"] = query
    if query:
        event["queryStringParameters"] = dict(p.split("=", 1) for p in query.split("&"))
    return event


class Clock:
    """A clock the tests move by hand (backoff and leases read it)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_push_service(
    client_url: str,
    table: Any,
    ingest_url: str,
    token: str,
    clock: Clock,
    *,
    read_timeout: float = 5.0,
    jitter: float = 1.0,
    **options: Any,
) -> PushService:
    """A push from a test's Client database, through its DynamoDB table, to an ingest
    URL, on the test's clock; ``jitter`` is where in its range every backoff falls
    (1.0: the top). ``options`` go to PushService (batch_size 50 unless given)."""
    options.setdefault("batch_size", 50)
    return PushService(
        lambda: psycopg.connect(client_url, autocommit=True),
        PushStateStore(table),
        IngestClient(ingest_url, token, 2.0, read_timeout),
        clock=clock,
        rng=lambda: jitter,
        **options,
    )


def one_at_a_time(handler: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """A handler served in-process as Lambda runs it: one request at a time per
    execution environment (the Powertools resolver keeps the current event in a
    module global, so two requests at once on threads of one process would mix)."""
    lock = threading.Lock()

    def serial(event: Any, context: Any) -> Any:
        with lock:
            return handler(event, context)

    return serial


def reset_handler_caches() -> None:
    """The handlers' cached configuration and services, cleared: each test sets the
    environment they are built from."""
    import ingest
    import push
    from fleet import config

    config.cached.cache_clear()
    ingest.service.cache_clear()
    push.service.cache_clear()


def ingest_routes(handler: Callable[[Any, Any], Any]) -> list[Route]:
    """The ingest's two routes (batches, the ledger), both to ``handler``."""
    from fleet_local.api import Route

    return [Route("POST", INGEST_PATH, handler), Route("GET", f"{INGEST_PATH}/state", handler)]


@contextmanager
def ingest_serving(admin_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """The real ingest handler over local HTTP against an Admin database, one request
    at a time as Lambda runs it, with the customer DEV0001 registered: (the ingest's
    URL, the customer's token)."""
    import ingest
    from fleet import customers
    from fleet_local.api import serving

    monkeypatch.setenv("DATABASE_URL", admin_url)
    reset_handler_caches()
    with psycopg.connect(admin_url, autocommit=True) as conn:
        token = customers.create(conn, "DEV0001", "Dev").token
    try:
        with serving(ingest_routes(one_at_a_time(ingest.handler))) as api:
            yield api.url + INGEST_PATH, token
    finally:
        reset_handler_caches()


def drain(service: PushService, clock: Clock, ticks: int = 200, *, no_failures: bool = False) -> int:
    """Ticks, a minute apart, until every resource is idle or skipped: how many ticks
    came before that one. ``no_failures``: a resource that fails or is refused fails
    the test at once."""
    for n in range(ticks):
        report = service.tick()
        if no_failures:
            failed = {k: r.detail for k, r in report.resources.items() if r.outcome in ("failed", "refused")}
            assert not failed, failed
        if all(r.outcome in ("idle", "skipped") for r in report.resources.values()):
            return n
        clock.advance(60)
    raise AssertionError("backlog not drained")
