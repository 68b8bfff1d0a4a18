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
    """An HTTP request answered with a 4xx/5xx status by design."""

    status = 400

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequest(RequestRefused):
    status = 400


class Unauthorized(RequestRefused):
    status = 401


class Forbidden(RequestRefused):
    status = 403


class PayloadTooLarge(RequestRefused):
    status = 413


class UnsupportedMediaType(RequestRefused):
    status = 415


class TooManyRequests(RequestRefused):
    status = 429


class ServiceUnavailable(RequestRefused):
    status = 503
