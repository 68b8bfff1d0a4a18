"""Builds a PushService from its configuration (secrets through Powertools
parameters, cached; a local run may pass the token directly)."""

from __future__ import annotations

import psycopg

from fleet import db
from fleet.config import PushConfig
from fleet.push_service import PushService
from fleet.push_source import PortalSource
from fleet.push_state import PushStateStore
from fleet.push_transport import IngestClient


def _token(cfg: PushConfig) -> str:
    if cfg.ingest_token:
        return cfg.ingest_token
    from aws_lambda_powertools.utilities import parameters

    assert cfg.ingest_token_secret_arn is not None
    value = parameters.get_secret(cfg.ingest_token_secret_arn, max_age=300)
    return (value if isinstance(value, str) else bytes(value).decode()).strip()


def build_push_service(cfg: PushConfig) -> PushService:
    def connect() -> psycopg.Connection:
        return db.connect(db.resolve_conninfo(cfg.database_url, cfg.db_secret_arn))

    client = IngestClient(str(cfg.ingest_url), _token(cfg), cfg.connect_timeout_s, cfg.read_timeout_s)
    return PushService(
        connect,
        PushStateStore.connect(cfg.state_table, cfg.dynamodb_endpoint),
        client,
        batch_size=cfg.batch_size,
        max_batches=cfg.max_batches,
        time_budget_s=cfg.time_budget_s,
        lease_seconds=cfg.lease_seconds,
        full_resend_seconds=cfg.full_resend_seconds,
        source=PortalSource(cfg.mapping()),
    )
