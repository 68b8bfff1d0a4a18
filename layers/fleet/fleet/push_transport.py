"""HTTP transport of the push: gzip JSON bodies to the Admin ingest API (urllib3,
already in every Lambda Python runtime through botocore), with connect and read
timeouts and no automatic retries (the push decides what a failure means)."""

from __future__ import annotations

import email.utils
import json
import time
from dataclasses import dataclass
from typing import Any

import urllib3
from isal import igzip

USER_AGENT = "fleet-push/0.1"


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


def gzip_body(raw: bytes) -> bytes:
    # ISA-L at level 1: JSON of meter readings shrinks about 10x, in a fifth of the
    # time of zlib's fastest level (which also compresses less).
    return igzip.compress(raw, compresslevel=1, mtime=0)


class IngestClient:
    def __init__(self, ingest_url: str, token: str, connect_timeout: float, read_timeout: float) -> None:
        self.ingest_url = ingest_url.rstrip("/")
        self._token = token
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=False,
            maxsize=2,
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
