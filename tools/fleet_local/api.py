"""A local stand-in for API Gateway's HTTP API: serves routes to Lambda handlers
with payload-format-2.0 events, binary bodies base64-encoded as API Gateway does.
Used by ``fleet local start-api``, the demo and the tests."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

API_GATEWAY_MAX_BODY = 10 * 1024 * 1024
Invoke = Callable[[dict[str, Any], Any], Any]


@dataclass
class LocalLambdaContext:
    """What a Lambda handler may read from its context."""

    function_name: str = "local"
    timeout_s: float = 30.0
    memory_limit_in_mb: int = 256
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    log_group_name: str = "/local"
    log_stream_name: str = "local"
    function_version: str = "$LATEST"
    _started: float = field(default_factory=time.monotonic)

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:local:000000000000:function:{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.timeout_s - (time.monotonic() - self._started)) * 1000))


@dataclass
class Route:
    method: str
    path: str
    invoke: Invoke
    function_name: str = "local"
    timeout_s: float = 30.0

    @property
    def route_key(self) -> str:
        return f"{self.method} {self.path}"


def _is_text(body: bytes, headers: dict[str, str]) -> bool:
    if headers.get("content-encoding"):
        return False
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def build_event(
    method: str, target: str, headers: dict[str, str], body: bytes, source_ip: str, route_key: str
) -> dict[str, Any]:
    parts = urlsplit(target)
    now = datetime.now(UTC)
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": route_key,
        "rawPath": parts.path,
        "rawQueryString": parts.query,
        "headers": headers,
        "requestContext": {
            "accountId": "000000000000",
            "apiId": "local",
            "domainName": headers.get("host", "localhost"),
            "domainPrefix": "local",
            "http": {
                "method": method,
                "path": parts.path,
                "protocol": "HTTP/1.1",
                "sourceIp": source_ip,
                "userAgent": headers.get("user-agent", ""),
            },
            "requestId": uuid.uuid4().hex,
            "routeKey": route_key,
            "stage": "$default",
            "time": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
            "timeEpoch": int(now.timestamp() * 1000),
        },
        "isBase64Encoded": False,
    }
    if parts.query:
        event["queryStringParameters"] = dict(parse_qsl(parts.query, keep_blank_values=True))
    if body:
        if _is_text(body, headers):
            event["body"] = body.decode("utf-8")
        else:
            event["body"] = base64.b64encode(body).decode()
            event["isBase64Encoded"] = True
    return event


def _normalise(result: Any) -> tuple[int, dict[str, str], bytes]:
    """A handler's return value as API Gateway turns it into an HTTP response."""
    if not isinstance(result, dict) or "statusCode" not in result:
        # Payload 2.0: anything else is a 200 JSON body.
        return 200, {"content-type": "application/json"}, json.dumps(result).encode()
    headers = {str(k).lower(): str(v) for k, v in (result.get("headers") or {}).items()}
    for key, values in (result.get("multiValueHeaders") or {}).items():
        headers[key.lower()] = ",".join(str(v) for v in values)
    body = result.get("body") or ""
    raw = base64.b64decode(body) if result.get("isBase64Encoded") else str(body).encode()
    return int(result["statusCode"]), headers, raw


def _as_api_gateway_reads(value: str) -> str:
    """A header value as API Gateway hands it to the function: its bytes read as
    UTF-8 (http.server reads them as latin-1); bytes that are not UTF-8 become U+FFFD,
    as the event, JSON, can hold only text."""
    if value.isascii():
        return value
    return value.encode("latin-1", "replace").decode("utf-8", "replace")


class _Handler(BaseHTTPRequestHandler):
    server: LocalHttpApi
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > API_GATEWAY_MAX_BODY:
            self._reply(413, {"content-type": "application/json"}, b'{"message":"Request Entity Too Large"}')
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        path = urlsplit(self.path).path
        route = self.server.match(self.command, path)
        if route is None:
            self._reply(404, {"content-type": "application/json"}, b'{"message":"Not Found"}')
            return
        headers: dict[str, str] = {}
        for key, value in self.headers.items():
            key, value = key.lower(), _as_api_gateway_reads(value)
            headers[key] = f"{headers[key]},{value}" if key in headers else value
        event = build_event(self.command, self.path, headers, body, self.client_address[0], route.route_key)
        context = LocalLambdaContext(function_name=route.function_name, timeout_s=route.timeout_s)
        started = time.perf_counter()
        try:
            status, out_headers, out = _normalise(route.invoke(event, context))
        except Exception:  # noqa: BLE001 - as API Gateway: a failed integration is a 500
            self.server.errors += 1
            status, out_headers, out = 500, {"content-type": "application/json"}, b'{"message":"Internal Server Error"}'
        self.server.record(route.route_key, status, time.perf_counter() - started)
        self._reply(status, out_headers, out)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            if key not in ("content-length", "connection"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


class LocalHttpApi(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, routes: list[Route], host: str = "127.0.0.1", port: int = 3000, verbose: bool = False):
        super().__init__((host, port), _Handler)
        self.routes = routes
        self.verbose = verbose
        self.errors = 0
        self.latencies: list[tuple[str, int, float]] = []
        self._lock = threading.Lock()

    def match(self, method: str, path: str) -> Route | None:
        for route in self.routes:
            if route.method in (method, "ANY") and route.path == path:
                return route
        return None

    def record(self, route_key: str, status: int, seconds: float) -> None:
        with self._lock:
            self.latencies.append((route_key, status, seconds))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


@contextmanager
def serving(routes: list[Route], host: str = "127.0.0.1", port: int = 0) -> Iterator[LocalHttpApi]:
    """Serve in a background thread for the duration of the block."""
    api = LocalHttpApi(routes, host, port)
    thread = threading.Thread(target=api.serve_forever, name="local-http-api", daemon=True)
    thread.start()
    try:
        yield api
    finally:
        api.shutdown()
        api.server_close()
