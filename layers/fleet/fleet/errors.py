"""Domain errors. Each is a type; one place per door maps them to answers."""

from __future__ import annotations


class FleetError(Exception):
    """Base of every error the fleet package raises on purpose."""


class ConfigurationError(FleetError):
    """Configuration is missing or invalid (raised at cold start)."""


class DatabaseUnavailable(FleetError):
    """The database cannot be reached right now; the caller should retry later."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DatabaseBusy(FleetError):
    """The database is shedding load (too many connections, timeouts)."""

    def __init__(self, message: str, retry_after: int = 2) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class MigrationError(FleetError):
    """A migration cannot be applied as asked."""


class MigrationChecksumMismatch(MigrationError):
    """A migration that was already applied has been changed since."""


class ProfileError(MigrationError):
    """The asked database profile is not available or contradicts the applied one."""


class CustomerError(FleetError):
    """A customer administration request cannot be carried out."""


class CustomerNotFound(CustomerError):
    pass


class CustomerExists(CustomerError):
    pass


class RequestRefused(FleetError):
    """A request refused by design, with what the caller is told. How it is answered
    is the door's to say (for the ingest: the table in fleet.ingest.http)."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after  # seconds after which the same request may succeed


class InvalidRequest(RequestRefused):
    """The headers or the body break the contract: final, the same request fails again."""


class BodyRefused(InvalidRequest):
    """The body as a whole is refused; ``text`` is what the operator keeps of it."""

    def __init__(self, message: str, reason: str, text: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.text = text


class NotAuthenticated(RequestRefused):
    """No token, or one that is unknown, expired or revoked."""


class CustomerDisabled(RequestRefused):
    """The token's customer is disabled."""


class BatchTooLarge(RequestRefused):
    """Over a size or item limit: the client sends the batch again, smaller."""


class UnsupportedFormat(RequestRefused):
    """A content type or encoding the contract does not know."""


class Overloaded(RequestRefused):
    """Too many batches in flight: the same batch is welcome after ``retry_after``."""


class RetryLater(RequestRefused):
    """The request could not be carried out now, through no fault of its own."""
