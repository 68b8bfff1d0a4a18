"""HTTP transport of the push: gzip JSON bodies to the Admin ingest API (urllib3,
already in every Lambda Python runtime through botocore), with connect and read
timeouts and no automatic retries (the push decides what a failure means)."""

from __future__ import annotations

import contextlib
import email.utils
import json
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import urllib3

USER_AGENT = "fleet-push/0.1"
MAX_IN_FLIGHT = 4


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    retry_after: float | None = None


class TransportError(Exception):
    """No answer from the server (connection refused, timeout, reset)."""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class IngestClient:
    def __init__(self, ingest_url: str, token: str, connect_timeout: float, read_timeout: float) -> None:
        self.ingest_url = ingest_url.rstrip("/")
        self._token = token
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=False,
            maxsize=MAX_IN_FLIGHT,  # a kept-alive connection for each batch in flight
        )

    def _headers(self) -> dict[str, str]:
        return {"X-Customer-Token": self._token, "User-Agent": USER_AGENT}

    def post_batch(self, batch_type: str, body: bytes, cursor: str, batch_id: str) -> Reply:
        headers = self._headers()
        headers.update(
            {
                "Content-Type": "application/json",
                "Content-Encoding": "gzip",
                "X-Batch-Type": batch_type,
                "X-Push-Cursor": cursor,
                "X-Batch-Id": batch_id,
            }
        )
        return self._request("POST", self.ingest_url, body, headers)

    def state(self) -> Reply:
        return self._request("GET", f"{self.ingest_url}/state", None, self._headers())

    def _request(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> Reply:
        try:
            resp = self._http.request(method, url, body=body, headers=headers)
        except urllib3.exceptions.HTTPError as exc:
            raise TransportError(f"{type(exc).__name__}: {str(exc)[:200]}") from None
        try:
            doc = json.loads(resp.data) if resp.data else {}
        except ValueError:
            doc = {"message": resp.data[:200].decode("utf-8", "replace")}
        if not isinstance(doc, dict):
            doc = {"message": str(doc)[:200]}
        return Reply(resp.status, doc, parse_retry_after(resp.headers.get("Retry-After")))


@dataclass
class Flight[T]:
    """One batch posted and not yet answered: what it carries, and its answer."""

    batch: T
    answer: Future[Reply]


class InFlight[T]:
    """Batches posted on threads of their own, at most ``depth`` at once, their
    answers taken in the order they were posted (so the cursor only ever moves in
    order, past batches the server acknowledged). A thread waiting for an answer
    holds no GIL: the caller reads and writes the next batches meanwhile."""

    def __init__(self, depth: int) -> None:
        self.depth = max(1, min(depth, MAX_IN_FLIGHT))
        self._posts = ThreadPoolExecutor(max_workers=self.depth, thread_name_prefix="push-post")
        self._flights: deque[Flight[T]] = deque()

    def __enter__(self) -> InFlight[T]:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.drop()
        self._posts.shutdown(wait=True)

    def __len__(self) -> int:
        return len(self._flights)

    @property
    def full(self) -> bool:
        return len(self._flights) >= self.depth

    def post(self, batch: T, send: Callable[[], Reply]) -> None:
        self._flights.append(Flight(batch, self._posts.submit(send)))

    def oldest(self) -> tuple[T, Reply | TransportError]:
        """The oldest batch and its answer (or the transport's error), once it came."""
        flight = self._flights.popleft()
        try:
            return flight.batch, flight.answer.result()
        except TransportError as exc:
            return flight.batch, exc

    def drop(self) -> list[T]:
        """The batches still in flight, in order, their answers awaited and ignored (a
        batch the server stored anyway is sent again later: re-delivery is harmless)."""
        dropped = []
        while self._flights:
            flight = self._flights.popleft()
            with contextlib.suppress(Exception):
                flight.answer.result()
            dropped.append(flight.batch)
        return dropped
