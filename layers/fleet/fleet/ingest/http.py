"""The ingest's answers over HTTP: the one table from what went wrong to a status.

429 and 503 only for a database that is busy or down (and the admission's shedding):
the client retries those for ever. Anything else that goes wrong while handling a
body is final (a 400); the items the database refuses for their content never get
here (they are rejected one by one, see ``fleet.ingest.service``).
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from fleet.db import classify
from fleet.errors import (
    BatchTooLarge,
    ConfigurationError,
    CustomerDisabled,
    DatabaseBusy,
    DatabaseUnavailable,
    InvalidRequest,
    NotAuthenticated,
    Overloaded,
    RequestRefused,
    RetryLater,
    UnsupportedFormat,
)

_STATUS: tuple[tuple[type[RequestRefused], int], ...] = (
    (InvalidRequest, 400),
    (NotAuthenticated, 401),
    (CustomerDisabled, 403),
    (BatchTooLarge, 413),
    (UnsupportedFormat, 415),
    (Overloaded, 429),
    (RetryLater, 503),
)
# The answers after which the client sends the same batch again.
_SENT_AGAIN = frozenset({413, 429, 503})


@dataclass(frozen=True)
class Refusal:
    """The answer to a request that is not a 200: status, message, Retry-After."""

    status: int
    message: str
    retry_after: int | None = None

    @property
    def sent_again(self) -> bool:
        """The client sends the batch again (smaller, or later): nothing is rejected."""
        return self.status in _SENT_AGAIN


def refusal_for(exc: BaseException) -> Refusal:
    """The one table from errors to answers, for the audit row and the HTTP response."""
    if isinstance(exc, RequestRefused):
        status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 400)
        return Refusal(status, exc.message, exc.retry_after)
    if isinstance(exc, DatabaseBusy):
        return Refusal(429, "server busy; retry later", exc.retry_after)
    if isinstance(exc, DatabaseUnavailable):
        return Refusal(503, "database unavailable; retry later", exc.retry_after)
    if isinstance(exc, ConfigurationError):
        return Refusal(503, "service not configured; retry later", 60)
    if isinstance(exc, psycopg.Error) and (mapped := classify(exc)) is not exc:
        return refusal_for(mapped)
    return Refusal(400, "the request could not be processed; it is kept for the operator")
