"""Typed configuration, one model per function, read once from the environment.

Missing or invalid settings fail loudly naming the setting, never its value (some
are secrets). Settings that differ per deployment have no silent default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Literal, TypeVar

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fleet.errors import ConfigurationError
from fleet.schema.files import ProfileChoice, Role

if TYPE_CHECKING:
    from fleet.push.mapping import SourceMapping


class _EnvModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # CloudFormation passes "" for an optional parameter left empty.
        return None if value == "" else value


class DatabaseSettings(_EnvModel):
    database_url: str | None = Field(None, alias="DATABASE_URL")
    db_secret_arn: str | None = Field(None, alias="DB_SECRET_ARN")

    @model_validator(mode="after")
    def _one_source(self) -> DatabaseSettings:
        if not self.database_url and not self.db_secret_arn:
            raise ValueError("set DATABASE_URL or DB_SECRET_ARN")
        return self


class SourceMappingSetting(_EnvModel):
    # The push's source mapping (fleet.push.mapping): a JSON file in the deployment,
    # relative to the layer's python/ folder; unset or empty: the default tables.
    source_mapping: str | None = Field(None, alias="PUSH_SOURCE_MAPPING")

    def mapping(self) -> SourceMapping:
        from fleet.push.mapping import load_mapping  # the ingest has no use for it

        return load_mapping(self.source_mapping)


class BootstrapConfig(DatabaseSettings, SourceMappingSetting):
    role: Role = Field(alias="FLEET_ROLE")
    database_profile: ProfileChoice = Field("auto", alias="DATABASE_PROFILE")


class IngestConfig(DatabaseSettings):
    max_body_bytes: int = Field(4_000_000, alias="MAX_BODY_BYTES", gt=0, le=4_500_000)
    max_decompressed_bytes: int = Field(16_000_000, alias="MAX_DECOMPRESSED_BYTES", gt=0)
    max_items: int = Field(10_000, alias="MAX_ITEMS", gt=0)
    max_future_seconds: int = Field(86_400, alias="MAX_FUTURE_SECONDS", ge=0)
    statement_timeout_ms: int = Field(20_000, alias="STATEMENT_TIMEOUT_MS", gt=0)
    hourly_refresh_window_days: int = Field(30, alias="HOURLY_REFRESH_WINDOW_DAYS", gt=0)
    # Load shedding (fleet.ingest.admission): batches in flight per customer and in all.
    max_in_flight_per_customer: int = Field(2, alias="INGEST_MAX_IN_FLIGHT_PER_CUSTOMER", gt=0)
    max_in_flight: int = Field(16, alias="INGEST_MAX_IN_FLIGHT", gt=0)
    shed_retry_after_s: int = Field(1, alias="INGEST_SHED_RETRY_AFTER_S", gt=0)
    # A customer admitted nothing for this long is sending live data: the room kept.
    fresh_after_s: float = Field(10.0, alias="INGEST_FRESH_AFTER_S", gt=0)


class PushConfig(SourceMappingSetting):
    database_url: str | None = Field(None, alias="DATABASE_URL")
    db_secret_arn: str | None = Field(None, alias="DB_SECRET_ARN")
    ingest_url: AnyHttpUrl = Field(alias="INGEST_URL")
    ingest_token: str | None = Field(None, alias="INGEST_TOKEN")
    ingest_token_secret_arn: str | None = Field(None, alias="INGEST_TOKEN_SECRET_ARN")
    state_table: str = Field(alias="PUSH_STATE_TABLE")
    dynamodb_endpoint: str | None = Field(None, alias="DYNAMODB_ENDPOINT_URL")
    batch_size: int = Field(5_000, alias="PUSH_BATCH_SIZE", gt=0, le=50_000)
    # None (0 in the environment): no cap; a tick sends while there is a backlog and
    # time left in PUSH_TIME_BUDGET_S. A number caps the measurement batches a tick.
    max_batches: int | None = Field(None, alias="PUSH_MAX_BATCHES", ge=1, le=1_000_000)
    time_budget_s: float = Field(40.0, alias="PUSH_TIME_BUDGET_S", gt=0)
    connect_timeout_s: float = Field(3.0, alias="PUSH_CONNECT_TIMEOUT_S", gt=0)
    read_timeout_s: float = Field(20.0, alias="PUSH_READ_TIMEOUT_S", gt=0)
    lease_seconds: int = Field(120, alias="PUSH_LEASE_SECONDS", gt=0)
    full_resend_seconds: int = Field(3600, alias="PUSH_FULL_RESEND_SECONDS", gt=0)
    reconcile_enabled: bool = Field(True, alias="RECONCILE_ENABLED")
    reconcile_horizon_days: int = Field(90, alias="RECONCILE_HORIZON_DAYS", gt=0, le=3660)
    reconcile_period_s: float = Field(86_400.0, alias="RECONCILE_PERIOD_S", gt=0)
    reconcile_alarm_ticks: int = Field(5, alias="RECONCILE_ALARM_TICKS", gt=0)
    mode: Literal["client"] = "client"

    @field_validator("max_batches", mode="before")
    @classmethod
    def _zero_is_no_cap(cls, value: object) -> object:
        return None if value in (0, "0") else value

    @model_validator(mode="after")
    def _sources(self) -> PushConfig:
        if not self.database_url and not self.db_secret_arn:
            raise ValueError("set DATABASE_URL or DB_SECRET_ARN")
        if not self.ingest_token and not self.ingest_token_secret_arn:
            raise ValueError("set INGEST_TOKEN_SECRET_ARN (or INGEST_TOKEN for a local run)")
        return self


M = TypeVar("M", bound=BaseModel)


def load[M: BaseModel](model: type[M], environ: Mapping[str, str] | None = None) -> M:
    """Validate ``environ`` (default: the process environment) into ``model``."""
    values = dict(os.environ if environ is None else environ)
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(p) for p in err["loc"]) or "configuration"
            unset = len(err["loc"]) == 1 and not values.get(where, "").strip()
            problems.append(f"{where}: not set" if unset else f"{where}: {err['msg']}")
        raise ConfigurationError(f"invalid {model.__name__}: " + "; ".join(problems)) from None


@cache
def cached[M: BaseModel](model: type[M]) -> M:
    """``load`` once per process (cold start)."""
    return load(model)
