"""A small CloudFormation custom-resource responder.

Parses the request with the Powertools parser models and always answers the
ResponseURL exactly once: SUCCESS, or FAILED with a readable reason, including on
bad configuration, an unreachable database, or a Lambda about to time out (a
watchdog answers FAILED shortly before the deadline), so a stack never hangs.
Unlike crhelper it leaves the root logger alone and never sleeps on delete.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Annotated, Any, Protocol

import urllib3
from aws_lambda_powertools.utilities.parser.models import (
    CloudFormationCustomResourceCreateModel,
    CloudFormationCustomResourceDeleteModel,
    CloudFormationCustomResourceUpdateModel,
)
from pydantic import Field, TypeAdapter, ValidationError

from fleet.observability import logger

CustomResourceEvent = Annotated[
    CloudFormationCustomResourceCreateModel
    | CloudFormationCustomResourceUpdateModel
    | CloudFormationCustomResourceDeleteModel,
    Field(discriminator="request_type"),
]
_EVENT = TypeAdapter(CustomResourceEvent)
_http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=5, read=10), retries=urllib3.Retry(3))

# Leave this much of the Lambda's time to send FAILED before the deadline.
WATCHDOG_MARGIN_S = 5.0
_REASON_LIMIT = 3000  # CloudFormation truncates long reasons; keep ours readable


class LambdaContextLike(Protocol):
    def get_remaining_time_in_millis(self) -> int: ...


def parse_event(
    event: dict[str, Any],
) -> (
    CloudFormationCustomResourceCreateModel
    | CloudFormationCustomResourceUpdateModel
    | CloudFormationCustomResourceDeleteModel
):
    return _EVENT.validate_python(event)


def send_response(
    event: dict[str, Any],
    status: str,
    physical_id: str,
    reason: str = "",
    data: dict[str, Any] | None = None,
) -> None:
    """PUT the response document to the pre-signed ResponseURL."""
    body = {
        "Status": status,
        "Reason": (reason or status)[:_REASON_LIMIT],
        "PhysicalResourceId": physical_id,
        "StackId": event.get("StackId", ""),
        "RequestId": event.get("RequestId", ""),
        "LogicalResourceId": event.get("LogicalResourceId", ""),
        "NoEcho": False,
        "Data": data or {},
    }
    payload = json.dumps(body).encode()
    # The pre-signed URL is signed for an empty content type.
    resp = _http.request(
        "PUT",
        event["ResponseURL"],
        body=payload,
        headers={"Content-Type": "", "Content-Length": str(len(payload))},
    )
    logger.info("custom resource response sent", extra={"status": status, "http_status": resp.status})


Handler = Callable[[Any], tuple[str, dict[str, Any]]]


def respond(
    event: dict[str, Any],
    context: LambdaContextLike | None,
    *,
    on_create_or_update: Handler,
    on_delete: Handler,
    fallback_physical_id: str,
    sender: Callable[..., None] = send_response,
) -> dict[str, Any]:
    """Run the handler for the request type and answer CloudFormation once.

    Handlers return ``(physical_id, data)`` or raise; the exception's text becomes
    the FAILED reason. Returns the response document's essentials (for tests and
    ``sam local invoke``).
    """
    lock = threading.Lock()
    answered: dict[str, Any] = {}
    physical_id = str(event.get("PhysicalResourceId") or fallback_physical_id)

    def answer(status: str, pid: str, reason: str, data: dict[str, Any] | None = None) -> None:
        with lock:
            if answered:
                return
            answered.update({"Status": status, "PhysicalResourceId": pid, "Reason": reason, "Data": data or {}})
        try:
            sender(event, status, pid, reason, data)
        except Exception:  # noqa: BLE001 - nothing else can be done; log and return
            logger.exception("could not send the custom resource response")

    watchdog: threading.Timer | None = None
    if context is not None:
        seconds = context.get_remaining_time_in_millis() / 1000 - WATCHDOG_MARGIN_S
        watchdog = threading.Timer(
            max(seconds, 0.0),
            answer,
            args=("FAILED", physical_id, "timed out before the bootstrap finished"),
        )
        watchdog.daemon = True
        watchdog.start()
    try:
        try:
            request = parse_event(event)
        except ValidationError as exc:
            raise ValueError(f"not a CloudFormation custom resource request: {exc.error_count()} errors") from exc
        if request.request_type == "Delete":
            pid, data = on_delete(request)
        else:
            pid, data = on_create_or_update(request)
        answer("SUCCESS", pid, "OK", data)
    except Exception as exc:  # noqa: BLE001 - every failure must reach CloudFormation
        logger.exception("custom resource request failed")
        answer("FAILED", physical_id, f"{type(exc).__name__}: {exc}")
    finally:
        if watchdog is not None:
            watchdog.cancel()
    return dict(answered)
