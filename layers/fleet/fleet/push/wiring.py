"""Builds a PushService from its configuration (secrets through Powertools
parameters, cached; a local run may pass the token directly)."""

from __future__ import annotations

import random
import time

import psycopg

from fleet import db
from fleet.config import PushConfig
from fleet.push.digests import DigestPush, DigestSettings
from fleet.push.service import PushService
from fleet.push.source import PortalSource
from fleet.push.state import PushStateStore
from fleet.push.transport import IngestClient


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
    state = PushStateStore.connect(cfg.state_table, cfg.dynamodb_endpoint)
    digests = None
    if cfg.reconcile_enabled:
        settings = DigestSettings(
            horizon_days=cfg.reconcile_horizon_days,
            period_s=cfg.reconcile_period_s,
            alarm_ticks=cfg.reconcile_alarm_ticks,
            batch_size=cfg.batch_size,
        )
        digests = DigestPush(state, client, settings, time.time, random.random, cfg.lease_seconds)
    return PushService(
        connect,
        state,
        client,
        digests=digests,
        batch_size=cfg.batch_size,
        max_batches=cfg.max_batches,
        time_budget_s=cfg.time_budget_s,
        lease_seconds=cfg.lease_seconds,
        full_resend_seconds=cfg.full_resend_seconds,
        source=PortalSource(cfg.mapping()),
    )
