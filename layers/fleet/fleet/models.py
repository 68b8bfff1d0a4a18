"""The items of an ingest batch, as the HTTP contract defines them.

Each item is validated on its own so one bad item is rejected with its index and a
reason while the rest of the batch lands.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

# Client ids: 1..64 characters, text only, no NUL (PostgreSQL text cannot hold it).
ClientId = Annotated[str, Field(min_length=1, max_length=64, strict=True, pattern=r"^[^\x00]+$")]
Name = Annotated[str, Field(min_length=1, max_length=256, strict=True, pattern=r"^[^\x00]+$")]
OptionalText = Annotated[str | None, Field(None, max_length=128, strict=True, pattern=r"^[^\x00]*$")]
Metric = Annotated[float | None, Field(None, strict=True)]


class BatchType(StrEnum):
    SITES = "sites"
    DEVICES = "devices"
    MEASUREMENTS = "measurements"


def _rfc3339(value: Any) -> Any:
    # Numbers would be taken as Unix time; the contract says RFC 3339 text.
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 timestamp string with an offset")
    return value


class _Item(BaseModel):
    # Unknown fields are ignored (forward compatible clients); NaN/Infinity refused.
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


class Site(_Item):
    id: ClientId
    name: Name
    timezone: OptionalText = None
    latitude: Annotated[float | None, Field(None, strict=True, ge=-90, le=90)] = None
    longitude: Annotated[float | None, Field(None, strict=True, ge=-180, le=180)] = None
    updated_at: AwareDatetime | None = None

    @field_validator("updated_at", mode="before")
    @classmethod
    def _updated_at_is_text(cls, value: Any) -> Any:
        return value if value is None else _rfc3339(value)


class Device(_Item):
    id: ClientId
    site_id: ClientId
    name: Name
    model: OptionalText = None
    firmware_version: OptionalText = None
    updated_at: AwareDatetime | None = None

    @field_validator("updated_at", mode="before")
    @classmethod
    def _updated_at_is_text(cls, value: Any) -> Any:
        return value if value is None else _rfc3339(value)


class Measurement(_Item):
    time: AwareDatetime
    device_id: ClientId
    power_w: Metric = None
    voltage_v: Metric = None
    current_a: Metric = None
    energy_wh: Metric = None
    power_factor: Metric = None
    frequency_hz: Metric = None

    @field_validator("time", mode="before")
    @classmethod
    def _time_is_text(cls, value: Any) -> Any:
        return _rfc3339(value)


ITEM_MODELS: dict[BatchType, type[_Item]] = {
    BatchType.SITES: Site,
    BatchType.DEVICES: Device,
    BatchType.MEASUREMENTS: Measurement,
}

MEASUREMENT_FIELDS = ("power_w", "voltage_v", "current_a", "energy_wh", "power_factor", "frequency_hz")


def measurement_key(m: Measurement) -> tuple[datetime, str]:
    return (m.time, m.device_id)
