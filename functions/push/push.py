"""PushFunction: one push tick per EventBridge schedule event (Client stack)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
from aws_lambda_powertools.utilities.typing import LambdaContext
from fleet import config
from fleet.observability import logger, metrics, tracer
from fleet.push.service import PushService
from fleet.push.wiring import build_push_service


@lru_cache(maxsize=1)
def service() -> PushService:
    return build_push_service(config.cached(config.PushConfig))


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    parse(event=event, model=EventBridgeModel)
    cfg = config.cached(config.PushConfig)
    # No new batch once what is left of the invocation could not see one through
    # (the read timeout of its POST, and a margin for the state write).
    left = context.get_remaining_time_in_millis() / 1000 - cfg.read_timeout_s - 10
    report = service().tick(owner=context.aws_request_id, time_budget_s=max(1.0, min(cfg.time_budget_s, left)))
    logger.info("push tick done", extra={"report": report.as_dict()})
    return report.as_dict()
