"""IngestFunction: POST /api/fleet/ingest and GET /api/fleet/ingest/state.

Thin: turn the HTTP API event into an IngestRequest, call the service, and answer
errors as ``refusal_for`` (the one table) says. No input produces a 500.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext
from fleet import config, db
from fleet.db import describe
from fleet.errors import RequestRefused
from fleet.ingest.http import refusal_for
from fleet.ingest.service import IngestRequest, IngestService
from fleet.observability import logger, metrics, tracer

app = APIGatewayHttpResolver()


@lru_cache(maxsize=1)
def service() -> IngestService:
    cfg = config.cached(config.IngestConfig)
    holder = db.ConnectionHolder(lambda: db.resolve_conninfo(cfg.database_url, cfg.db_secret_arn))
    return IngestService(cfg, holder, refusal_for)


def _headers() -> dict[str, str]:
    return {k.lower(): v for k, v in (app.current_event.headers or {}).items()}


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(status, content_types.APPLICATION_JSON, json.dumps(body), headers or {})


@app.post("/api/fleet/ingest")
@tracer.capture_method
def post_ingest() -> Response:
    event = app.current_event
    request = IngestRequest(_headers(), event.body, bool(event.is_base64_encoded))
    result = service().ingest(request)
    return _json(result.status, result.body, result.headers)


@app.get("/api/fleet/ingest/state")
@tracer.capture_method
def get_state() -> Response:
    result = service().state(_headers())
    return _json(result.status, result.body, result.headers)


@app.exception_handler(Exception)
def refused(exc: Exception) -> Response:
    # The one table of answers is refusal_for; here only what each answer is logged as.
    answer = refusal_for(exc)
    headers = {"Retry-After": str(answer.retry_after)} if answer.retry_after else {}
    if answer.status == 401:
        headers["WWW-Authenticate"] = 'Token realm="fleet", header="X-Customer-Token"'
    if answer.status == 429:
        metrics.add_metric(name="LoadShed", unit="Count", value=1)
    elif answer.status == 503:
        logger.warning("database unavailable or service not configured", extra={"error": describe(exc)})
        metrics.add_metric(name="DatabaseUnavailable", unit="Count", value=1)
    elif not isinstance(exc, RequestRefused):
        # Not the client's fault, and not something to retry: the request is answered
        # for good (its audit row and quarantine keep it) and the fault is counted.
        logger.exception("unexpected error in the ingest")
        metrics.add_metric(name="IngestFaults", unit="Count", value=1)
    return _json(answer.status, {"message": answer.message}, headers)


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP, clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    metrics.add_metric(name="IngestRequests", unit="Count", value=1)
    return app.resolve(event, context)
