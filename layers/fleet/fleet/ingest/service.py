"""The ingest's rules, as the HTTP contract defines them, free of API Gateway details.

Order of checks: the token first (nothing is decompressed or parsed for an
unknown caller), then the headers, the size, the body, the items. Every request
refused after the customer is known leaves an audit row; every invalid item is
rejected on its own (index and reason) and kept in the quarantine, while the rest
of the batch lands in the same transaction as the audit row.

No poison batch: 429/503 mean a busy or unreachable database, never something in the
body. A batch the database refuses for its content is written again in halves, down
to the items it refuses on their own, which are rejected like invalid ones. How each
refusal is answered is the HTTP adapter's (``fleet.ingest.http``), handed in as
``answer_for``; the audit row records that answer.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

import psycopg

from fleet import tokens
from fleet.config import IngestConfig
from fleet.db import ConnectionHolder, describe
from fleet.errors import (
    BatchTooLarge,
    BodyRefused,
    CustomerDisabled,
    DatabaseBusy,
    DatabaseUnavailable,
    InvalidRequest,
    NotAuthenticated,
    RequestRefused,
    RetryLater,
)
from fleet.ingest import codec
from fleet.ingest.admission import Admission
from fleet.ingest.parse import BodyParser, NotAllValid, Parsed
from fleet.ingest.records import AuditRecord, Reject, TokenOwner, WriteOutcome, storable
from fleet.ingest.store import IngestStore, find_token_owner, ledger
from fleet.models import BatchType
from fleet.observability import logger, metrics

UNAUTHORIZED_MESSAGE = "missing, unknown, expired or revoked token"
_MAX_CURSOR = 1024
_QUARANTINE_BODY_EXCERPT = 65_536
# A measurements body at least twice this size is written while it is parsed, in parts
# of about this many bytes (IngestService._write_while_parsing); well under the bytes
# that bound parse.WHOLE_BODY_VALUES (two a value at least).
PART_BYTES = 262_144


class Answer(Protocol):
    """How a refusal is answered (fleet.ingest.http.Refusal)."""

    @property
    def status(self) -> int: ...

    @property
    def message(self) -> str: ...

    @property
    def sent_again(self) -> bool: ...


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
            raise BatchTooLarge(f"body is over {limit} bytes")
        try:
            return base64.b64decode(body, validate=True)
        except ValueError:
            raise InvalidRequest("body is not valid base64") from None


@dataclass
class IngestResponse:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class IngestService:
    def __init__(
        self, cfg: IngestConfig, connections: ConnectionHolder, answer_for: Callable[[BaseException], Answer]
    ) -> None:
        self.cfg = cfg
        self.connections = connections
        self.answer_for = answer_for
        self.store = IngestStore(cfg.statement_timeout_ms, timedelta(days=cfg.hourly_refresh_window_days))
        self.parser = BodyParser(cfg)
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
            raise NotAuthenticated(UNAUTHORIZED_MESSAGE)
        assert token is not None
        sha = tokens.digest(token)
        owner = self.connections.run(lambda conn: find_token_owner(conn, sha))
        if owner is None:
            raise NotAuthenticated(UNAUTHORIZED_MESSAGE)
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
                raise CustomerDisabled("customer is disabled")
            batch_type, body = self._receive(request, audit)
            written = self._write_while_parsing(batch_type, body, audit, sha, started)
            if written is None:
                parsed = self.parser.parse(batch_type, body)
                audit.rejected = len(parsed.rejects)
                audit.rejects = parsed.rejects
                audit.duration_ms = (time.perf_counter() - started) * 1000
                with self.admission.slot(owner.customer_id):
                    written = self._write(parsed, audit, sha)
        except Exception as exc:  # every refusal after the customer is known is audited
            self._audit_refusal(request, audit, exc, started)  # the handler logs what is unexpected
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

    def _receive(self, request: IngestRequest, audit: AuditRecord) -> tuple[BatchType, bytes]:
        """The batch type and the decompressed body, the headers and sizes checked."""
        headers = request.headers
        try:
            batch_type = BatchType(headers.get("x-batch-type", ""))
        except ValueError:
            raise InvalidRequest(f"X-Batch-Type must be one of: {', '.join(BatchType)}") from None
        audit.batch_id = codec.batch_id(headers.get("x-batch-id"))
        cursor = headers.get("x-push-cursor")
        if cursor is not None and len(cursor) > _MAX_CURSOR:
            raise InvalidRequest(f"X-Push-Cursor is longer than {_MAX_CURSOR} characters")
        codec.check_content_type(headers.get("content-type"))
        raw = request.raw_body(self.cfg.max_body_bytes)
        audit.bytes = len(raw)
        if len(raw) > self.cfg.max_body_bytes:
            raise BatchTooLarge(f"body is over {self.cfg.max_body_bytes} bytes")
        body = codec.decoded(raw, headers.get("content-encoding"), self.cfg.max_decompressed_bytes)
        audit.decompressed_bytes = len(body)
        return batch_type, body

    def _write_while_parsing(
        self, batch_type: BatchType, body: bytes, audit: AuditRecord, sha: bytes, started: float
    ) -> WriteOutcome | None:
        """A large batch of valid measurements written while it is parsed: cut into
        parts at item boundaries (``codec.part_cuts``), each part's rows sent to the
        database as soon as it is validated, so the server inserts one part while the
        next is parsed (``IngestStore.write_parts``). None, with nothing written, when
        the body is not one that can be cut safely, when a part holds anything but
        valid items, or when the database refuses the rows: the batch is then taken
        whole, item by item where needed, as any other."""
        if batch_type is not BatchType.MEASUREMENTS or not (cuts := codec.part_cuts(body, PART_BYTES)):
            return None

        def parts() -> Any:
            yield from self.parser.valid_parts(body, cuts)
            audit.duration_ms = (time.perf_counter() - started) * 1000

        with self.admission.slot(audit.customer_id):
            try:
                return self.connections.run(lambda conn: self.store.write_parts(conn, audit, parts(), sha))
            except NotAllValid:
                return None
            except (DatabaseBusy, DatabaseUnavailable):
                raise
            except Exception as exc:  # noqa: BLE001 - the whole path finds the items to blame
                logger.info("a batch in parts was refused; taking it whole", extra={"error": describe(exc)})
                return None

    def _write(self, parsed: Parsed, audit: AuditRecord, sha: bytes) -> WriteOutcome:
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
                    raise RetryLater("the digests could not be compared; retry later", retry_after=30) from exc
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

    def _audit_refusal(self, request: IngestRequest, audit: AuditRecord, exc: Exception, started: float) -> None:
        answer = self.answer_for(exc)
        if answer.sent_again:
            audit.rejects, audit.rejected = [], 0  # the client sends the batch again
        elif isinstance(exc, BodyRefused):
            audit.rejects = [Reject(None, f"body refused: {exc.reason}", exc.text[:_QUARANTINE_BODY_EXCERPT])]
        elif not isinstance(exc, RequestRefused):
            audit.rejects, audit.rejected = [_as_received(request, exc)], 0
        audit.status = answer.status
        audit.error = answer.message
        audit.accepted = audit.duplicates = 0
        audit.duration_ms = (time.perf_counter() - started) * 1000
        metrics.add_metric(name="BatchesRefused", unit="Count", value=1)
        try:
            self.connections.run(lambda conn: self.store.record_refusal(conn, audit))
        except Exception as write_failed:  # noqa: BLE001 - the answer goes out whatever the audit's fate
            # A busy or unreachable database: the client is told to retry (429/503).
            logger.warning("could not write the audit row of a refused batch", extra={"error": describe(write_failed)})

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

    # -- GET /api/fleet/ingest/state -------------------------------------------
    def state(self, headers: Mapping[str, str]) -> IngestResponse:
        owner, _ = self.authenticate(headers)
        if not owner.active:
            raise CustomerDisabled("customer is disabled")
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


def _as_received(request: IngestRequest, exc: Exception) -> Reject:
    """The body as it arrived (base64 as it came), for a request that failed
    unexpectedly: kept in the quarantine with the kind of failure."""
    body = request.body or ""
    text = body.decode("utf-8", "backslashreplace") if isinstance(body, bytes) else body
    return Reject(None, f"body refused: could not be processed ({type(exc).__name__})", text[:_QUARANTINE_BODY_EXCERPT])


def _reject_order(reject: Reject) -> int:
    return reject.index if reject.index is not None else -1
