"""The items of an ingest batch, as the HTTP contract defines them.

Items are TypedDicts validated by pydantic straight from the JSON bytes (one pass
in pydantic-core: about five times faster than ``json.loads`` plus model
instances). Strict types: numbers must be JSON numbers, times RFC 3339 strings
with an offset; NaN and Infinity are refused. Each item is validated on its own,
so one bad item is rejected with its index and a reason while the rest lands.
"""

from __future__ import annotations

import re
from datetime import date
from enum import StrEnum
from typing import Annotated, Any, NotRequired, TypedDict

from pydantic import AfterValidator, AwareDatetime, ConfigDict, Field, with_config

# Text PostgreSQL can store: no NUL. In JSON a NUL can only be written as the escape
# \u0000 (a raw control character is invalid JSON), which the whole-batch validation
# relies on (fleet.ingest.codec.envelope_validator).
NO_NUL = r"^[^\x00]+$"
NO_NUL_OR_EMPTY = r"^[^\x00]*$"
# Client ids: 1..64 characters of text, as sent (never trimmed), not made only of
# whitespace (Unicode White_Space): no NUL, and at least one other character.
CLIENT_ID = r"^[^\x00]*[^\x00\s][^\x00]*$"
# Each NUL pattern and what is left of it where the bytes tell there is no NUL (see
# fleet.ingest.codec.envelope_validator): nothing, or the id's other half.
NUL_PATTERNS = {NO_NUL: None, NO_NUL_OR_EMPTY: None, CLIENT_ID: r"\S"}
# Unicode White_Space (the \s of the pattern above), as a bracket expression's body that
# Python's re and PostgreSQL's regular expressions read alike (their own \s and
# [:space:] differ from it, and from each other).
WHITE_SPACE = "\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_NOT_WHITE_SPACE = re.compile(f"[^{WHITE_SPACE}]")


def is_client_id(text: str) -> bool:
    """An id the ingest takes (ClientId): 1..64 characters, no NUL, not only whitespace."""
    return 1 <= len(text) <= 64 and "\x00" not in text and _NOT_WHITE_SPACE.search(text) is not None


ClientId = Annotated[str, Field(min_length=1, max_length=64, strict=True, pattern=CLIENT_ID)]
Name = Annotated[str, Field(min_length=1, max_length=256, strict=True, pattern=NO_NUL)]
OptionalText = Annotated[str | None, Field(max_length=128, strict=True, pattern=NO_NUL_OR_EMPTY)]
Metric = Annotated[float | None, Field(strict=True)]
Time = Annotated[AwareDatetime, Field(strict=True)]
OptionalTime = Annotated[AwareDatetime | None, Field(strict=True)]

# A day's digest, as fleet/reconcile.py writes it.
# Each half a sum modulo 2**64: at most 18446744073709551615 (20 digits, checked below).
DIGEST_HASH_PATTERN = r"^v1:\d{1,20}:\d{1,20}$"

_ITEM = ConfigDict(extra="ignore", allow_inf_nan=False)  # unknown fields ignored (forward compatible)


class BatchType(StrEnum):
    SITES = "sites"
    DEVICES = "devices"
    MEASUREMENTS = "measurements"
    DIGESTS = "digests"


@with_config(_ITEM)
class Site(TypedDict):
    id: ClientId
    name: Name
    timezone: NotRequired[OptionalText]
    latitude: NotRequired[Annotated[float | None, Field(strict=True, ge=-90, le=90)]]
    longitude: NotRequired[Annotated[float | None, Field(strict=True, ge=-180, le=180)]]
    updated_at: NotRequired[OptionalTime]


@with_config(_ITEM)
class Device(TypedDict):
    id: ClientId
    site_id: ClientId
    name: Name
    model: NotRequired[OptionalText]
    firmware_version: NotRequired[OptionalText]
    updated_at: NotRequired[OptionalTime]


@with_config(_ITEM)
class Measurement(TypedDict):
    time: Time
    device_id: ClientId
    power_w: NotRequired[Metric]
    voltage_v: NotRequired[Metric]
    current_a: NotRequired[Metric]
    energy_wh: NotRequired[Metric]
    power_factor: NotRequired[Metric]
    frequency_hz: NotRequired[Metric]


def _halves_below_2_64(text: str) -> str:
    if any(int(half) >= 2**64 for half in text.split(":")[1:]):
        raise ValueError("each half of the hash is a sum modulo 2**64: below 18446744073709551616")
    return text


@with_config(_ITEM)
class Digest(TypedDict):
    """What the portal holds for one device on one UTC day (fleet/reconcile.py)."""

    device_id: ClientId
    day: Annotated[date, Field(strict=True)]
    count: Annotated[int, Field(strict=True, ge=0, le=2**53)]
    hash: Annotated[str, Field(strict=True, pattern=DIGEST_HASH_PATTERN), AfterValidator(_halves_below_2_64)]


ITEM_MODELS: dict[BatchType, Any] = {
    BatchType.SITES: Site,
    BatchType.DEVICES: Device,
    BatchType.MEASUREMENTS: Measurement,
    BatchType.DIGESTS: Digest,
}

MEASUREMENT_FIELDS = ("power_w", "voltage_v", "current_a", "energy_wh", "power_factor", "frequency_hz")

# Friendlier words for the errors a client most often meets.
_MESSAGES = {
    "datetime_type": "must be an RFC 3339 timestamp string with an offset",
    "datetime_parsing": "must be an RFC 3339 timestamp string with an offset",
    "datetime_from_date_parsing": "must be an RFC 3339 timestamp string with an offset",
    "timezone_aware": "must have a timezone offset (RFC 3339), e.g. 2026-04-01T10:00:00Z",
    "finite_number": "must be a finite number (no NaN or Infinity)",
}


# The patterns' meaning, for the person who reads the reason.
_PATTERN_MESSAGES = {
    NO_NUL: "must not hold a NUL character (\\u0000): PostgreSQL text cannot store one",
    NO_NUL_OR_EMPTY: "must not hold a NUL character (\\u0000): PostgreSQL text cannot store one",
    CLIENT_ID: "must not be only whitespace, nor hold a NUL character (\\u0000)",
}


def error_message(err: Any) -> str:
    if err["type"] == "string_pattern_mismatch":
        pattern = (err.get("ctx") or {}).get("pattern")
        if pattern in _PATTERN_MESSAGES:
            return _PATTERN_MESSAGES[pattern]
    return _MESSAGES.get(err["type"], str(err["msg"]))
