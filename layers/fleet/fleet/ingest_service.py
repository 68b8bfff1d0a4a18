"""The ingest, as the HTTP contract defines it, free of API Gateway details.

Order of checks: the token first (nothing is decompressed or parsed for an
unknown caller), then the headers, the size, the body, the items. Every request
refused after the customer is known leaves an audit row; every invalid item is
rejected on its own (index and reason) and kept in the quarantine, while the rest
of the batch lands in the same transaction as the audit row.

No poison batch: 429/503 mean a busy or unreachable database, never something in the
body (``refusal_for``). A batch the database refuses for its content is written again
in halves, down to the items it refuses on their own, which are rejected like invalid
ones. What the parsers may build is bounded (``WHOLE_BODY_VALUES``), so any body within
the size limits is handled within the function's memory (bench/memory.py).
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypedDict

import psycopg
from isal import isal_zlib
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from pydantic_core import SchemaValidator

from fleet import tokens
from fleet.config import IngestConfig
from fleet.db import ConnectionHolder, classify, describe
from fleet.errors import (
    BadRequest,
    ConfigurationError,
    DatabaseBusy,
    DatabaseUnavailable,
    Forbidden,
    PayloadTooLarge,
    RequestRefused,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
)
from fleet.ingest_admission import Admission
from fleet.ingest_store import (
    AuditRecord,
    IngestStore,
    Reject,
    TokenOwner,
    WriteOutcome,
    find_token_owner,
    ledger,
    payload_text,
    storable,
)
from fleet.models import ITEM_MODELS, NUL_PATTERNS, BatchType, Measurement, error_message
from fleet.observability import logger, metrics

UNAUTHORIZED_MESSAGE = "missing, unknown, expired or revoked token"
_MAX_CURSOR = 1024
_QUARANTINE_BODY_EXCERPT = 65_536
# What the JSON parsers may build for one request. A body is parsed whole only when it
# holds at most this many JSON values (counted from its bytes: commas and opening
# brackets, an upper bound); otherwise item by item, and an item over the bound is
# rejected unparsed. At 60-110 bytes a value in pydantic-core's or json's trees this
# keeps a parse under ~55 MB; nesting is bounded by pydantic-core's recursion limit.
WHOLE_BODY_VALUES = 500_000
# A measurements body at least twice this size is written while it is parsed, in parts
# of about this many bytes (IngestService._write_while_parsing); well under the bytes
# that bound WHOLE_BODY_VALUES (two a value at least).
PART_BYTES = 262_144
_ONE = {bt: TypeAdapter(model) for bt, model in ITEM_MODELS.items()}


def _envelope_validator(batch_type: BatchType, max_items: int) -> SchemaValidator:
    """``{"items": [...]}`` with every item valid, in one pass over the JSON bytes.

    Without the items' NUL patterns: a NUL can reach a JSON string only as the escape
    ``\\u0000``, so a body without one holds none, and a body with one is validated
    item by item (with the patterns) instead. The patterns cost a fifth of this
    validation (0.9 ms of a 5,000-item batch), for nothing the bytes had not told."""
    model = ITEM_MODELS[batch_type]
    envelope = TypedDict(  # type: ignore[misc]  # noqa: UP013 - the item type is chosen at run time
        f"{batch_type.value.title()}Envelope",
        {"items": Annotated[list[model], Field(max_length=max_items)]},  # type: ignore[valid-type]
    )
    adapter: TypeAdapter[dict[str, Any]] = TypeAdapter(with_config(ConfigDict(extra="forbid"))(envelope))  # type: ignore[arg-type]
    return SchemaValidator(_without_nul_patterns(adapter.core_schema))


def _without_nul_patterns(schema: Any) -> Any:
    """A copy of a pydantic-core schema with the NUL patterns of models.py left out."""
    if isinstance(schema, dict):
        return {
            key: _without_nul_patterns(value)
            for key, value in schema.items()
            if not (key == "pattern" and value in NUL_PATTERNS)
        }
    if isinstance(schema, list):
        return [_without_nul_patterns(value) for value in schema]
    return schema


@dataclass
class IngestRequest:
    headers: Mapping[str, str]  # names in lower case
    body: str | bytes | None
    is_base64: bool = False

    def raw_body(self, limit: int) -> bytes:
        """The body's bytes; base64 (API Gateway's form for binary bodies) decoded."""
        body = self.body or b""
        if isinstance(body, bytes):
            return body
        if not self.is_base64:
            return body.encode("utf-8", "surrogatepass")
        if len(body) > (limit + 2) // 3 * 4 + 4:
            raise PayloadTooLarge(f"body is over {limit} bytes")
        try:
            return base64.b64decode(body, validate=True)
        except ValueError:
            raise BadRequest("body is not valid base64") from None


@dataclass
class IngestResponse:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Parsed:
    batch_type: BatchType
    valid: list[Any]  # unique by key for the upserts
    positions: list[int]  # the index in the request of each of ``valid``
    valid_total: int
    rejects: list[Reject]
    payload: Callable[[int], str]  # the item at an index as sent, for the quarantine


@dataclass(frozen=True)
class Refusal:
    """The answer to a request that is not a 200: status, message, Retry-After."""

    status: int
    message: str
    retry_after: int | None = None


def refusal_for(exc: BaseException) -> Refusal:
    """The one table from errors to answers, for the audit row and the HTTP response.

    429 and 503 only for a database that is busy or down: the client retries those for
    ever. Anything else that goes wrong while handling a body is final (a 400); the
    items the database refuses for their content never get here (they are rejected one
    by one, see ``IngestService._write``)."""
    if isinstance(exc, RequestRefused):
        return Refusal(exc.status, exc.message, exc.retry_after)
    if isinstance(exc, DatabaseBusy):
        return Refusal(429, "server busy; retry later", exc.retry_after)
    if isinstance(exc, DatabaseUnavailable):
        return Refusal(503, "database unavailable; retry later", exc.retry_after)
    if isinstance(exc, ConfigurationError):
        return Refusal(503, "service not configured; retry later", 60)
    if isinstance(exc, psycopg.Error) and (mapped := classify(exc)) is not exc:
        return refusal_for(mapped)
    return Refusal(400, "the request could not be processed; it is kept for the operator")


class IngestService:
    def __init__(self, cfg: IngestConfig, connections: ConnectionHolder) -> None:
        self.cfg = cfg
        self.connections = connections
        self.store = IngestStore(cfg.statement_timeout_ms, timedelta(days=cfg.hourly_refresh_window_days))
        self._envelopes = {bt: _envelope_validator(bt, cfg.max_items) for bt in BatchType}
        lease_ms = cfg.statement_timeout_ms * 2  # past any write's own timeouts
        self.admission = Admission(
            connections,
            cfg.max_in_flight_per_customer,
            cfg.max_in_flight,
            lease_ms,
            cfg.shed_retry_after_s,
            int(cfg.fresh_after_s * 1000),
        )

    # -- authentication -----------------------------------------------------
    def authenticate(self, headers: Mapping[str, str]) -> tuple[TokenOwner, bytes]:
        token = headers.get("x-customer-token")
        if not tokens.well_formed(token):
            # Refused before any database lookup: no token, a typo, or a forgery.
            raise Unauthorized(UNAUTHORIZED_MESSAGE)
        assert token is not None
        sha = tokens.digest(token)
        owner = self.connections.run(lambda conn: find_token_owner(conn, sha))
        if owner is None:
            raise Unauthorized(UNAUTHORIZED_MESSAGE)
        return owner, sha

    # -- POST /api/fleet/ingest ----------------------------------------------
    def ingest(self, request: IngestRequest) -> IngestResponse:
        started = time.perf_counter()
        owner, sha = self.authenticate(request.headers)
        headers = request.headers
        logger.append_keys(customer_id=owner.customer_id, batch_id=storable(headers.get("x-batch-id"), 64))
        audit = AuditRecord(
            customer_id=owner.customer_id,
            batch_type=(headers.get("x-batch-type") or None),
            batch_id=None,
            client_cursor=headers.get("x-push-cursor"),
            status=200,
            bytes=len(request.body or b""),
        )
        try:
            if not owner.active:
                raise Forbidden("customer is disabled")
            batch_type, body = self._body(request, audit)
            written = self._write_while_parsing(batch_type, body, audit, owner.customer_id, sha, started)
            if written is None:
                parsed = self._parse(batch_type, body, audit)
                audit.rejected = len(parsed.rejects)
                audit.rejects = parsed.rejects
                audit.duration_ms = (time.perf_counter() - started) * 1000
                with self.admission.slot(owner.customer_id):
                    written = self._write(parsed, audit, sha)
        except Exception as exc:  # every refusal after the customer is known is audited
            refusal = refusal_for(exc)
            if refusal.status in (413, 429, 503):
                audit.rejects, audit.rejected = [], 0  # the client sends the batch again
            elif not isinstance(exc, RequestRefused):
                audit.rejects, audit.rejected = [_as_received(request, exc)], 0
            self._audit_refusal(audit, refusal, started)  # the handler logs what is unexpected
            raise
        self._count(audit)
        answer: dict[str, Any] = {
            "accepted": audit.accepted,
            "duplicates": audit.duplicates,
            "rejected": audit.rejected,
            "errors": [{"index": r.index, "reason": r.reason} for r in audit.rejects],
        }
        if batch_type is BatchType.DIGESTS:
            answer["differ"] = written.differ  # the device-days whose digests differ
        return IngestResponse(200, answer)

    def _write_while_parsing(
        self, batch_type: BatchType, body: bytes, audit: AuditRecord, customer_id: str, sha: bytes, started: float
    ) -> WriteOutcome | None:
        """A large batch of valid measurements written while it is parsed: cut into
        parts at item boundaries (``part_cuts``), each part's rows sent to the database
        as soon as it is validated, so the server inserts one part while the next is
        parsed (``IngestStore.write_parts``). None, with nothing written, when the body
        is not one that can be cut safely, when a part holds anything but valid items,
        or when the database refuses the rows: the batch is then taken whole, item by
        item where needed, as any other."""
        if batch_type is not BatchType.MEASUREMENTS:
            return None
        cuts = part_cuts(body, PART_BYTES)
        if not cuts:
            return None
        with self.admission.slot(customer_id):
            try:
                return self.connections.run(
                    lambda conn: self.store.write_parts(conn, audit, self._valid_parts(body, cuts, audit, started), sha)
                )
            except _NotAllValid:
                return None
            except (DatabaseBusy, DatabaseUnavailable):
                raise
            except Exception as exc:  # noqa: BLE001 - the whole path finds the items to blame
                logger.info("a batch in parts was refused; taking it whole", extra={"error": describe(exc)})
                return None

    def _valid_parts(
        self, body: bytes, cuts: list[int], audit: AuditRecord, started: float
    ) -> Iterator[list[Measurement]]:
        """The parts' items, each part validated as the whole body would be; raises
        _NotAllValid at the first part with anything the whole path must look at."""
        envelope = self._envelopes[BatchType.MEASUREMENTS]
        limit = datetime.now(UTC) + timedelta(seconds=self.cfg.max_future_seconds)
        count = 0
        for part in envelopes(body, cuts):
            try:
                items: list[Measurement] = envelope.validate_json(part)["items"]
            except ValidationError:
                raise _NotAllValid from None
            count += len(items)
            if count > self.cfg.max_items or _in_utc(items) or max(m["time"] for m in items) > limit:
                raise _NotAllValid
            yield items
        audit.duration_ms = (time.perf_counter() - started) * 1000

    def _write(self, parsed: _Parsed, audit: AuditRecord, sha: bytes) -> WriteOutcome:
        """The batch in one transaction; when the database refuses it for something
        in it, again in halves down to the items it refuses, which are rejected."""
        bt, valid = parsed.batch_type, parsed.valid
        try:
            return self.connections.run(
                lambda conn: self.store.write_batch(conn, audit, bt, valid, parsed.valid_total, sha)
            )
        except (DatabaseBusy, DatabaseUnavailable):
            raise
        except Exception as exc:  # the data's fault, whatever it is: find the items
            if bt is BatchType.DIGESTS:
                # A digest holds no data to keep, and rejecting its items would read as
                # nothing differing: a comparison the database could not make is
                # answered 503, and the push digests those days again after the wait.
                if isinstance(exc, psycopg.Error):
                    logger.exception("database error while comparing digests")
                    raise ServiceUnavailable("the digests could not be compared; retry later", retry_after=30) from exc
                raise
            logger.warning("a batch was refused whole; writing it in parts", extra={"error": describe(exc)})
            metrics.add_metric(name="BatchesWrittenInParts", unit="Count", value=1)

            def refuse(failed: list[tuple[int, str]]) -> None:
                by_store = [Reject(parsed.positions[i], r, parsed.payload(parsed.positions[i])) for i, r in failed]
                audit.rejects = sorted([*parsed.rejects, *by_store], key=_reject_order)
                audit.rejected = len(audit.rejects)

            return self.connections.run(
                lambda conn: self.store.write_in_parts(conn, audit, bt, valid, parsed.valid_total, sha, refuse)
            )

    def _audit_refusal(self, audit: AuditRecord, refusal: Refusal, started: float) -> None:
        audit.status = refusal.status
        audit.error = refusal.message
        audit.accepted = audit.duplicates = 0
        audit.duration_ms = (time.perf_counter() - started) * 1000
        metrics.add_metric(name="BatchesRefused", unit="Count", value=1)
        try:
            self.connections.run(lambda conn: self.store.record_refusal(conn, audit))
        except Exception as exc:  # noqa: BLE001 - the answer goes out whatever the audit's fate
            # A busy or unreachable database: the client is told to retry (429/503).
            logger.warning("could not write the audit row of a refused batch", extra={"error": describe(exc)})

    def _count(self, audit: AuditRecord) -> None:
        metrics.add_metric(name="RowsAccepted", unit="Count", value=audit.accepted)
        metrics.add_metric(name="RowsDuplicate", unit="Count", value=audit.duplicates)
        metrics.add_metric(name="RowsRejected", unit="Count", value=audit.rejected)
        metrics.add_metric(name="BatchBytes", unit="Bytes", value=audit.bytes)
        logger.info(
            "batch ingested",
            extra={
                "batch_type": storable(audit.batch_type, 64),
                "accepted": audit.accepted,
                "duplicates": audit.duplicates,
                "rejected": audit.rejected,
                "bytes": audit.bytes,
                "duration_ms": round(audit.duration_ms or 0, 2),
            },
        )

    # -- request parsing --------------------------------------------------------
    def _body(self, request: IngestRequest, audit: AuditRecord) -> tuple[BatchType, bytes]:
        """The batch type and the decompressed body, the headers and sizes checked."""
        headers = request.headers
        try:
            batch_type = BatchType(headers.get("x-batch-type", ""))
        except ValueError:
            raise BadRequest(f"X-Batch-Type must be one of: {', '.join(BatchType)}") from None
        audit.batch_id = _batch_id(headers.get("x-batch-id"))
        cursor = headers.get("x-push-cursor")
        if cursor is not None and len(cursor) > _MAX_CURSOR:
            raise BadRequest(f"X-Push-Cursor is longer than {_MAX_CURSOR} characters")
        _check_content_type(headers.get("content-type"))
        raw = request.raw_body(self.cfg.max_body_bytes)
        audit.bytes = len(raw)
        if len(raw) > self.cfg.max_body_bytes:
            raise PayloadTooLarge(f"body is over {self.cfg.max_body_bytes} bytes")
        body = self._decode(raw, headers.get("content-encoding"))
        audit.decompressed_bytes = len(body)
        return batch_type, body

    def _parse(self, batch_type: BatchType, body: bytes, audit: AuditRecord) -> _Parsed:
        whole = json_values(body) <= WHOLE_BODY_VALUES
        # Fast path: the whole batch is valid; parsed and validated in one pass. Not for
        # a body with an escaped NUL (see _envelope_validator). A backslash is looked
        # for first: one memchr, where a search for the six bytes takes 0.4 ms.
        if whole and (b"\\" not in body or b"\\u0000" not in body):
            try:
                items = self._envelopes[batch_type].validate_json(body)["items"]
            except ValidationError:
                pass
            else:
                as_sent = _AsSent(body)
                return self._finish(batch_type, items, list(range(len(items))), [], as_sent.payload)
        # Slow path: find out exactly what is wrong, item by item.
        if whole:
            try:
                raw_items = _envelope(body, audit)
            except RecursionError:
                pass  # nested too deep for a parse of the whole: item by item from the bytes
            else:
                if len(raw_items) > self.cfg.max_items:
                    raise PayloadTooLarge(f"batch has {len(raw_items)} items; the limit is {self.cfg.max_items}")
                return self._validate(batch_type, raw_items)
        return self._validate_spans(batch_type, body, audit)

    def _decode(self, body: bytes, encoding: str | None) -> bytes:
        enc = (encoding or "identity").strip().lower()
        if enc == "identity":
            if len(body) > self.cfg.max_decompressed_bytes:
                raise PayloadTooLarge(f"body is over {self.cfg.max_decompressed_bytes} bytes")
            return body
        if enc != "gzip":
            raise UnsupportedMediaType("Content-Encoding must be gzip or identity")
        return gunzip_capped(body, self.cfg.max_decompressed_bytes)

    def _validate(self, batch_type: BatchType, items: list[Any]) -> _Parsed:
        """Each item on its own, through the same JSON validation as the fast path."""
        adapter = _ONE[batch_type]
        valid: list[Any] = []
        indexes: list[int] = []
        rejects: list[Reject] = []
        for index, item in enumerate(items):
            payload = payload_text(item)
            try:
                valid.append(adapter.validate_json(payload))
                indexes.append(index)
            except ValidationError as exc:
                rejects.append(Reject(index, _reasons(exc), payload))
        return self._finish(batch_type, valid, indexes, rejects, lambda i: payload_text(items[i]))

    def _validate_spans(self, batch_type: BatchType, body: bytes, audit: AuditRecord) -> _Parsed:
        """Item by item from the bytes, for a body too large to parse whole: each item
        is parsed on its own, so what the parser builds is bounded by one item, and an
        item over that bound is rejected without being parsed."""
        if not body.isascii():
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest("body is not UTF-8") from None
        try:
            spans = item_spans(body, self.cfg.max_items)
        except BadRequest as refused:
            _quarantine_body(audit, body.decode("utf-8"), refused.message)
            raise
        adapter = _ONE[batch_type]
        valid: list[Any] = []
        indexes: list[int] = []
        rejects: list[Reject] = []
        for index, (start, end) in enumerate(spans):
            values = json_values(body, start, end)
            if values > WHOLE_BODY_VALUES:
                reason = f"item: holds more than {WHOLE_BODY_VALUES} JSON values"
                rejects.append(Reject(index, reason, body[start:end].decode("utf-8")))
                continue
            try:
                valid.append(adapter.validate_json(body[start:end]))
                indexes.append(index)
            except ValidationError as exc:
                if any(e["type"] == "json_invalid" and "recursion" not in e["msg"] for e in exc.errors()):
                    _quarantine_body(audit, body.decode("utf-8"), "not JSON")
                    raise BadRequest("body is not valid JSON") from None
                rejects.append(Reject(index, _reasons(exc), body[start:end].decode("utf-8")))
        return self._finish(batch_type, valid, indexes, rejects, lambda i: body[slice(*spans[i])].decode("utf-8"))

    def _finish(
        self,
        batch_type: BatchType,
        valid: list[Any],
        indexes: list[int],
        rejects: list[Reject],
        payload: Callable[[int], str],
    ) -> _Parsed:
        if batch_type is BatchType.MEASUREMENTS:
            valid, indexes, late = self._times(valid, indexes, payload)
            if late:
                rejects = sorted([*rejects, *late], key=_reject_order)
        total = len(valid)
        valid, indexes = _unique(batch_type, valid, indexes)
        return _Parsed(batch_type, valid, indexes, total, rejects, payload)

    def _times(
        self, models: list[Measurement], indexes: list[int], payload: Callable[[int], str]
    ) -> tuple[list[Measurement], list[int], list[Reject]]:
        """Times moved to UTC; those that cannot be (before year 1 or after 9999 in
        UTC) or lie too far in the future are rejected."""
        unmovable = _in_utc(models)
        limit = datetime.now(UTC) + timedelta(seconds=self.cfg.max_future_seconds)
        if not unmovable and max((m["time"] for m in models), default=limit) <= limit:
            return models, indexes, []
        kept: list[Measurement] = []
        kept_at: list[int] = []
        rejects: list[Reject] = []
        late = f"time: more than {self.cfg.max_future_seconds} s in the future"
        for position, (m, i) in enumerate(zip(models, indexes, strict=True)):
            if position in unmovable:
                rejects.append(Reject(i, "time: outside the years 1 to 9999 in UTC", payload(i)))
            elif m["time"] > limit:
                rejects.append(Reject(i, late, payload(i)))
            else:
                kept.append(m)
                kept_at.append(i)
        return kept, kept_at, rejects

    # -- GET /api/fleet/ingest/state -------------------------------------------
    def state(self, headers: Mapping[str, str]) -> IngestResponse:
        owner, _ = self.authenticate(headers)
        if not owner.active:
            raise Forbidden("customer is disabled")
        acknowledged = self.connections.run(lambda conn: ledger(conn, owner.customer_id))
        return IngestResponse(
            200,
            {
                "customer_id": owner.customer_id,
                "ledger": acknowledged,
                "limits": {
                    "max_body_bytes": self.cfg.max_body_bytes,
                    "max_decompressed_bytes": self.cfg.max_decompressed_bytes,
                    "max_items": self.cfg.max_items,
                    "max_in_flight": self.cfg.max_in_flight_per_customer,
                },
            },
        )


# isal's stub declares its error class as an instance of Exception.
_INFLATE_ERROR: type[Exception] = isal_zlib.error  # type: ignore[assignment]


def gunzip_capped(data: bytes, cap: int) -> bytes:
    """Decompress one gzip stream, refusing output over ``cap`` bytes (no bombs)."""
    inflater = isal_zlib.decompressobj(wbits=31)  # zlib's interface, 5x faster
    try:
        out = inflater.decompress(data, cap + 1)
    except _INFLATE_ERROR:
        raise BadRequest("body is not valid gzip") from None
    if len(out) > cap:
        raise PayloadTooLarge(f"decompressed body is over {cap} bytes")
    if not inflater.eof:
        raise BadRequest("gzip body is truncated")
    if inflater.unused_data.strip(b"\x00"):
        raise BadRequest("unexpected data after the gzip stream")
    return out


def _check_content_type(content_type: str | None) -> None:
    if content_type is None:
        return  # JSON is the only type; a client that omits it is not refused
    media = content_type.split(";", 1)[0].strip().lower()
    if media not in ("application/json", ""):
        raise UnsupportedMediaType("Content-Type must be application/json")
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise UnsupportedMediaType("charset must be utf-8")


def _batch_id(raw: str | None) -> uuid.UUID | None:
    if raw is None or raw == "":
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise BadRequest("X-Batch-Id must be a UUID") from None


def _envelope(body: bytes, audit: AuditRecord) -> list[Any]:
    """``{"items": [...]}`` or BadRequest; the refused body is kept (an excerpt).

    RecursionError (nesting deeper than the json module goes) is left to the caller,
    which then takes the body item by item."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("body is not UTF-8") from None
    try:
        doc = json.loads(text)
    except ValueError:
        _quarantine_body(audit, text, "not JSON")
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(doc, dict):
        _quarantine_body(audit, text, "not a JSON object")
        raise BadRequest('body must be a JSON object {"items": [...]}')
    if "items" not in doc:
        _quarantine_body(audit, text, "no items")
        raise BadRequest('body must have an "items" list')
    if not isinstance(doc["items"], list):
        _quarantine_body(audit, text, "items not a list")
        raise BadRequest('"items" must be a list')
    _refuse_extra_keys(audit, text, [k for k in doc if k != "items"])
    return doc["items"]


def _refuse_extra_keys(audit: AuditRecord, text: str, extra: list[str]) -> None:
    if extra:
        _quarantine_body(audit, text, "unknown keys")
        # Named as JSON (escaped): a key may hold a NUL or a lone surrogate.
        named = ", ".join(json.dumps(k)[:40] for k in sorted(extra)[:5])
        raise BadRequest(f"unknown top-level keys: {named}")


def _quarantine_body(audit: AuditRecord, text: str, reason: str) -> None:
    # storable() escapes what PostgreSQL cannot hold when the row is written.
    audit.rejects = [Reject(None, f"body refused: {reason}", text[:_QUARANTINE_BODY_EXCERPT])]


def _as_received(request: IngestRequest, exc: Exception) -> Reject:
    """The body as it arrived (base64 as it came), for a request that failed
    unexpectedly: kept in the quarantine with the kind of failure."""
    body = request.body or ""
    text = body.decode("utf-8", "backslashreplace") if isinstance(body, bytes) else body
    return Reject(None, f"body refused: could not be processed ({type(exc).__name__})", text[:_QUARANTINE_BODY_EXCERPT])


def _reasons(exc: ValidationError) -> str:
    reasons = []
    for err in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "item"
        reasons.append(f"{where}: {error_message(err)}")
    return "; ".join(reasons)


def _reject_order(reject: Reject) -> int:
    return reject.index if reject.index is not None else -1


def _in_utc(models: list[Measurement]) -> set[int]:
    """Times moved to ``datetime.UTC``, in place: with pydantic's own tzinfo every
    comparison and subtraction after this (the future-time check, the array
    encoder) is several times slower. Returns the positions of the times that cannot
    be moved (0001-01-01T00:00:00+01:00 is in year 0 in UTC)."""
    unmovable: set[int] = set()
    for position, m in enumerate(models):
        t = m["time"]
        # What astimezone(UTC) does, for the fixed offset of pydantic's tzinfo (its
        # utcoffset(None)), without the calls it makes with the datetime: 1.5 ms instead
        # of 2.4-3.0 for 5,000 items. Any other tzinfo goes through astimezone.
        offset = t.tzinfo.utcoffset(None)  # type: ignore[union-attr]  # aware: validated
        try:
            m["time"] = t.astimezone(UTC) if offset is None else (t - offset).replace(tzinfo=UTC)
        except OverflowError:
            unmovable.add(position)
    return unmovable


def _unique(batch_type: BatchType, models: list[Any], positions: list[int]) -> tuple[list[Any], list[int]]:
    """One row per key for the upserts: the last site or device (the newest description),
    the last digest of a device-day."""
    if batch_type is BatchType.MEASUREMENTS:
        # Repeats inside the batch are left to ON CONFLICT DO NOTHING, which keeps
        # the first and counts the rest as duplicates.
        return models, positions
    latest: dict[Any, tuple[Any, int]] = {}
    for item, position in zip(models, positions, strict=True):
        key = (item["device_id"], item["day"]) if batch_type is BatchType.DIGESTS else item["id"]
        latest.pop(key, None)  # re-inserted: the dict keeps the order of the last
        latest[key] = (item, position)
    return [m for m, _ in latest.values()], [p for _, p in latest.values()]


class _NotAllValid(Exception):
    """A part of a batch in parts holds something only the whole body's parse judges."""


_PREFIX = b'{"items":['


def part_cuts(body: bytes, part_bytes: int) -> list[int] | None:
    """Where a body may be cut into envelopes of its own, about ``part_bytes`` apart:
    the offsets of the ``}`` of ``},{`` sequences, or None.

    Only for a body in the form the push sends (``{"items":[`` first, ``]}`` last, the
    key ``"items"`` once, no backslash, so no escaped key and no string holds a quote).
    A cut inside a string leaves the part before it with an unterminated string, and
    one inside a nested value leaves brackets unbalanced or a key the envelope
    forbids: such a part fails its validation and the body is taken whole. So when
    every part validates, they hold exactly the items of the whole, in order."""
    if (
        len(body) < 2 * part_bytes
        or not body.startswith(_PREFIX)
        or not body.endswith(b"]}")
        or b"\\" in body
        or body.find(b'"items"', len(_PREFIX)) != -1
    ):
        return None
    cuts: list[int] = []
    at = part_bytes
    while at <= len(body) - part_bytes // 2 and (cut := body.find(b"},{", at)) != -1:
        cuts.append(cut)
        at = cut + part_bytes
    # No part over twice the size: what a part's parse builds stays bounded as a whole
    # body's is (WHOLE_BODY_VALUES), without counting the values.
    ends = [0, *cuts, len(body)]
    if not cuts or max(b - a for a, b in itertools.pairwise(ends)) > 2 * part_bytes:
        return None
    return cuts


def envelopes(body: bytes, cuts: list[int]) -> Iterator[bytes]:
    """The parts of ``body`` cut at ``cuts`` (``part_cuts``), each ``{"items":[...]}``."""
    start = len(_PREFIX)
    for cut in cuts:
        yield _PREFIX + body[start : cut + 1] + b"]}"
        start = cut + 2
    yield _PREFIX + body[start:]


class _AsSent:
    """The items of a body that passed whole, parsed again only if one must be
    quarantined (the database refused it): the payload as the client sent it."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._items: list[Any] | None = None

    def payload(self, index: int) -> str:
        if self._items is None:
            self._items = json.loads(self._body)["items"]
        return payload_text(self._items[index])


def json_values(body: bytes, start: int = 0, end: int | None = None) -> int:
    """An upper bound on the JSON values (and keys) in ``body[start:end]``, from its
    bytes: every value after a container's first follows a comma, and every container
    opens with a bracket. Commas and brackets inside strings only raise the bound."""
    if start == 0 and end is None:
        # A whole body: one pass in C keeping just those bytes (0.55 ms for 900 KB
        # against 0.85 for three counts); what it keeps is gone before anything is parsed.
        return len(body.translate(None, _ALL_BUT_COMMAS_AND_OPENINGS)) + 1
    end = len(body) if end is None else end
    return body.count(b",", start, end) + body.count(b"[", start, end) + body.count(b"{", start, end) + 1


_ALL_BUT_COMMAS_AND_OPENINGS = bytes(b for b in range(256) if b not in b",[{")


def item_spans(body: bytes, max_items: int) -> list[tuple[int, int]]:
    """Where each item of ``{"items": [...]}`` starts and ends in ``body``, without
    building any of them (see ``_ItemSplitter``). Only the envelope is checked here
    (400) and the count of items (413); each item is checked by its own parse."""
    return _ItemSplitter(body, max_items).spans()


# A copy of the body in which only structure is left, byte for byte at the same
# positions: escapes and every byte that is not a quote, bracket, comma or colon
# become "0", strings holding a bracket are blanked, and small containers of nothing
# but scalars ("[]", "{}", "[1]", "[[]]" ...) become zeros too, so that millions of
# them cost nothing to skip. All in C (translate, replace, one anchored regex).
_STRUCTURE = bytes(c if c in b'"[]{},:' else 0x30 for c in range(256))
_BRACKETED_STRING = re.compile(rb'(?:[^"]++|"[^"\[\]{}]*+")*+("[^"]*+")')
_SMALL_CONTAINERS = [o + b"0" * k + c for k in range(4) for o, c in ((b"[", b"]"), (b"{", b"}"))]
_TOKEN = re.compile(rb'"[^"]*"|[\[{]+|[\]}]+|[,:]|"')  # at the items' level and above
_BRACKET_RUN = re.compile(rb"[\[{]+|[\]}]+")  # inside an item; brackets in strings are gone by then
_FEW_BRACKETS = 10_000  # fewer are scanned as they are
_WHITESPACE = b" \t\r\n"
_DOOMED_DEPTH = 256  # past pydantic-core's recursion limit: the item is rejected anyway


def _structure(body: bytes) -> bytes:
    scan = body
    if b"\\" in body:  # escapes: every quote left after this is a delimiter
        scan = body.replace(b"\\\\", b"00").replace(b'\\"', b"00")
    blanked: bytearray | None = None
    pos = 0
    while (m := _BRACKETED_STRING.match(scan, pos)) and m.group(1):
        blanked = blanked if blanked is not None else bytearray(scan)
        a, b = m.span(1)
        blanked[a + 1 : b - 1] = b"0" * (b - a - 2)
        pos = b
    scan = bytes(blanked) if blanked is not None else scan
    scan = scan.translate(_STRUCTURE).replace(b'""', b"00")
    brackets = scan.count(b"[") + scan.count(b"{")
    for _ in range(3):  # "[[[]]]" needs three rounds; a round costs ~15 ms a MB
        if brackets < _FEW_BRACKETS:
            break
        for small in _SMALL_CONTAINERS:
            scan = scan.replace(small, b"0" * len(small))
        left = scan.count(b"[") + scan.count(b"{")
        if left > brackets // 2:
            break  # what is left is not made of small containers
        brackets = left
    return scan


class _ItemSplitter:
    """A scan of the structure: strings and brackets at the top two levels, runs of
    brackets inside an item, and an item nested past ``_DOOMED_DEPTH`` skipped by
    counting brackets in blocks."""

    def __init__(self, body: bytes, max_items: int) -> None:
        self.body = body
        self.max_items = max_items
        self.scan = _structure(body)
        self.items: list[tuple[int, int]] = []
        self.extra: list[str] = []
        self.depth = 0
        self.in_items = False  # inside the items array: depth 2 is then an item's level
        self.item_from = -1  # where the current item begins (after "[" or ",")
        self.key: tuple[int, int] | None = None  # the last string at depth 1
        self.seen_items = False
        self._next = dict.fromkeys(b"[]{}", -1)  # the next of each bracket found so far

    def _next_bracket(self, pos: int) -> int:
        """Where the next bracket is at or after ``pos``: one find per kind, remembered
        until passed (a regex search is ~60x slower through a long stretch of zeros)."""
        for kind, at in self._next.items():
            if at < pos and at != len(self.scan):
                found = self.scan.find(kind, pos)
                self._next[kind] = len(self.scan) if found < 0 else found
        return min(self._next.values())

    def spans(self) -> list[tuple[int, int]]:
        pos = self._skip_space(0)
        if self.scan[pos : pos + 1] != b"{":
            raise BadRequest('body must be a JSON object {"items": [...]}')
        self.depth, pos = 1, pos + 1
        while self.depth:
            token = _BRACKET_RUN.match(self.scan, self._next_bracket(pos)) if self.depth > 2 else None
            token = token or _TOKEN.search(self.scan, pos)
            if token is None:
                raise BadRequest("body is not valid JSON")
            pos = self._take(token.start(), token.end())
        if self.body[pos:].strip(_WHITESPACE):
            raise BadRequest("body is not valid JSON")
        if not self.seen_items:
            raise BadRequest('body must have an "items" list')
        if self.extra:
            named = ", ".join(json.dumps(k)[:40] for k in sorted(self.extra)[:5])
            raise BadRequest(f"unknown top-level keys: {named}")
        return self.items

    def _take(self, at: int, end: int) -> int:
        """One token; returns where the scan goes on."""
        c = self.scan[at]
        if c == 0x22:  # a string (at depth 1 or 2)
            if end - at == 1:
                raise BadRequest("body is not valid JSON")
            if self.depth == 1:
                self.key = (at, end)
        elif c == 0x3A:  # ":"
            if self.depth == 1:
                return self._value_of_key(end)
        elif c == 0x2C:  # ","
            if self.in_items and self.depth == 2:
                self._add(self.item_from, at)
                self.item_from = end
        elif c in b"[{":
            self.depth += end - at
            if self.in_items and self.depth > 2 + _DOOMED_DEPTH:
                return self._past_deep_part(end)
        else:
            self._close(end - at, end)
        return end

    def _value_of_key(self, after_colon: int) -> int:
        try:
            # No string before the colon: the key was "" (blanked with the empty strings).
            name = json.loads(self.body[self.key[0] : self.key[1]]) if self.key else ""
        except ValueError:
            raise BadRequest("body is not valid JSON") from None
        self.key = None
        if name != "items":
            self.extra.append(name)
            return after_colon
        self.seen_items = True
        at = self._skip_space(after_colon)
        if self.body[at : at + 1] != b"[":
            raise BadRequest('"items" must be a list')
        if self.scan[at : at + 1] == b"0":  # a small container: "[]" or a few scalars
            end = self.body.index(b"]", at) + 1
            self.in_items, self.item_from, self.depth = True, at + 1, 2
            self._close(1, end)
            return end
        self.in_items, self.item_from, self.depth = True, at + 1, 2
        return at + 1

    def _close(self, run: int, end: int) -> None:
        """A run of closing brackets ending at ``end``."""
        if self.in_items and self.depth > 2:
            inside = min(run, self.depth - 2)
            self.depth, run = self.depth - inside, run - inside
        if run and self.in_items and self.depth == 2:  # the items array closes
            self._add(self.item_from, end - run, last=True)
            self.in_items, self.depth, run = False, 1, run - 1
        self.depth -= run
        if self.depth < 0:
            raise BadRequest("body is not valid JSON")

    def _past_deep_part(self, pos: int) -> int:
        """Skip to where the item is back at depth ``2 + _DOOMED_DEPTH``, counting
        brackets in blocks: a block with fewer closing brackets than the depth to
        climb cannot hold the way out."""
        scan, target = self.scan, 2 + _DOOMED_DEPTH
        block = 65_536
        while self.depth > target:
            if pos >= len(scan):
                raise BadRequest("body is not valid JSON")
            end = min(pos + block, len(scan))
            closing = scan.count(b"]", pos, end) + scan.count(b"}", pos, end)
            if self.depth - closing > target:
                self.depth += scan.count(b"[", pos, end) + scan.count(b"{", pos, end) - closing
                pos, block = end, min(block * 2, 65_536)
            elif end - pos > 64:
                block = (end - pos) // 2
            else:
                c = scan[pos]
                self.depth += 1 if c in b"[{" else -1 if c in b"]}" else 0
                pos += 1
        return pos

    def _add(self, start: int, end: int, last: bool = False) -> None:
        body = self.body
        while start < end and body[start] in _WHITESPACE:
            start += 1
        while end > start and body[end - 1] in _WHITESPACE:
            end -= 1
        if start == end:
            if last and not self.items:
                return  # "[ ]"
            raise BadRequest("body is not valid JSON")
        self.items.append((start, end))
        if len(self.items) > self.max_items:
            raise PayloadTooLarge(f"batch has more than {self.max_items} items")

    def _skip_space(self, pos: int) -> int:
        while pos < len(self.body) and self.body[pos] in _WHITESPACE:
            pos += 1
        return pos
