"""Helpers shared by the tests: a Lambda context, event fixtures, env handling,
and a local HTTP listener that records what it is sent."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
from fleet.push.service import PushService
from fleet.push.state import PushStateStore
from fleet.push.transport import IngestClient

ROOT = Path(__file__).resolve().parents[1]
EVENTS = ROOT / "events"


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
