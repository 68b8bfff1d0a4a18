"""IngestFunction: POST /api/fleet/ingest and GET /api/fleet/ingest/state.

Thin: turn the HTTP API event into an IngestRequest, call the service, and map
errors to status codes in one place. No input produces a 500.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext
from fleet import config, db
from fleet.errors import ConfigurationError, DatabaseBusy, DatabaseUnavailable, RequestRefused
from fleet.ingest_service import IngestRequest, IngestService
from fleet.observability import logger, metrics, tracer

app = APIGatewayHttpResolver()


@lru_cache(maxsize=1)
def service() -> IngestService:
    cfg = config.cached(config.IngestConfig)
    holder = db.ConnectionHolder(lambda: db.resolve_conninfo(cfg.database_url, cfg.db_secret_arn))
    return IngestService(cfg, holder)


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


@app.exception_handler(RequestRefused)
def refused(exc: RequestRefused) -> Response:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Token realm="fleet", header="X-Customer-Token"'
    return _json(exc.status, {"message": exc.message}, headers)


@app.exception_handler(DatabaseBusy)
def busy(exc: DatabaseBusy) -> Response:
    metrics.add_metric(name="LoadShed", unit="Count", value=1)
    return _json(429, {"message": "server busy; retry later"}, {"Retry-After": str(exc.retry_after)})


@app.exception_handler(DatabaseUnavailable)
def unavailable(exc: DatabaseUnavailable) -> Response:
    logger.warning("database unavailable", extra={"error": str(exc)})
    metrics.add_metric(name="DatabaseUnavailable", unit="Count", value=1)
    return _json(503, {"message": "database unavailable; retry later"}, {"Retry-After": str(exc.retry_after)})


@app.exception_handler(ConfigurationError)
def misconfigured(exc: ConfigurationError) -> Response:
    logger.error("ingest is misconfigured", extra={"error": str(exc)})
    return _json(503, {"message": "service not configured; retry later"}, {"Retry-After": "60"})


@app.exception_handler(Exception)
def fault(exc: Exception) -> Response:
    # A bug, not the client's fault: nothing was committed (one transaction), so
    # the client keeps its batch and retries.
    logger.exception("unexpected error in the ingest")
    metrics.add_metric(name="IngestFaults", unit="Count", value=1)
    return _json(503, {"message": "internal error; retry later"}, {"Retry-After": "30"})


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP, clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    metrics.add_metric(name="IngestRequests", unit="Count", value=1)
    return app.resolve(event, context)
