"""BootstrapFunction: the CloudFormation custom resource that migrates the stack's
database, and (admin) the scheduled maintenance that shares its code."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
from aws_lambda_powertools.utilities.typing import LambdaContext
from fleet import config, db
from fleet.observability import logger, metrics, tracer
from fleet.schema.bootstrap import bootstrap, maintain
from fleet.schema.custom_resource import respond
from fleet.schema.profiles import ProfileSettings


def _physical_id(role: str) -> str:
    # Stable across updates: CloudFormation replaces (and deletes) on a change.
    return f"fleet-{role}-schema"


def _create_or_update(request: Any) -> tuple[str, dict[str, Any]]:
    cfg = config.cached(config.BootstrapConfig)
    props = request.resource_properties or {}
    outcome = bootstrap(
        db.resolve_conninfo(cfg.database_url, cfg.db_secret_arn),
        cfg.role,
        props.get("DatabaseProfile") or cfg.database_profile,
        ProfileSettings.model_validate(props),
        mapping=cfg.mapping() if cfg.role == "client" else None,
    )
    logger.info("bootstrap done", extra=outcome.as_data())
    return _physical_id(cfg.role), outcome.as_data()


def _delete(request: Any) -> tuple[str, dict[str, Any]]:
    # Deleting the stack (or replacing this resource) keeps every row.
    return request.physical_resource_id, {}


@logger.inject_lambda_context
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return respond(
        event,
        context,
        on_create_or_update=_create_or_update,
        on_delete=_delete,
        fallback_physical_id="fleet-schema",
    )


@logger.inject_lambda_context
@metrics.log_metrics
def maintenance_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    parse(event=event, model=EventBridgeModel)
    cfg = config.cached(config.BootstrapConfig)
    report = maintain(db.resolve_conninfo(cfg.database_url, cfg.db_secret_arn))
    metrics.add_metric(name="PartitionsCreated", unit="Count", value=report["partitions_created"])
    metrics.add_metric(name="HourlyRangesRefreshed", unit="Count", value=report["ranges_refreshed"])
    metrics.add_metric(name="HourlyRefreshQueue", unit="Count", value=report["refresh_queue_remaining"])
    metrics.add_metric(name="FailedBackgroundJobs", unit="Count", value=report["failed_jobs"])
    if report["failed_jobs"]:
        logger.error("background jobs failed", extra={"jobs": report["failed_job_details"]})
    logger.info("maintenance done", extra=report)
    return report
