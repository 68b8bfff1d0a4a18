"""CustomerAdminFunction: customer administration by direct invoke.

Invoking a Lambda is authorised by IAM, and the function runs inside the VPC, so
an operator manages customers from a laptop without a network path to the
database: ``aws lambda invoke --function-name <CustomerAdminFunctionName>
--payload '{"action": "create", "customer_id": "DEV0001", "name": "Dev"}' out.json``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from aws_lambda_powertools.utilities.typing import LambdaContext
from fleet import config, customers, db
from fleet.errors import CustomerError
from fleet.observability import logger
from pydantic import BaseModel, Field, TypeAdapter, ValidationError


class _Create(BaseModel):
    action: Literal["create"]
    customer_id: str
    name: str


class _OnCustomer(BaseModel):
    action: Literal["rotate-token", "revoke-token", "disable", "enable"]
    customer_id: str
    keep_newest: bool = False


class _List(BaseModel):
    action: Literal["list"]


_REQUEST = TypeAdapter(Annotated[_Create | _OnCustomer | _List, Field(discriminator="action")])


def _run(request: _Create | _OnCustomer | _List) -> dict[str, Any]:
    cfg = config.cached(config.DatabaseSettings)
    with db.connect(db.resolve_conninfo(cfg.database_url, cfg.db_secret_arn)) as conn:
        if isinstance(request, _List):
            return {"customers": customers.list_customers(conn)}
        if isinstance(request, _Create):
            return customers.create(conn, request.customer_id, request.name).as_dict()
        if request.action == "rotate-token":
            return customers.rotate_token(conn, request.customer_id).as_dict()
        if request.action == "revoke-token":
            revoked = customers.revoke_tokens(conn, request.customer_id, keep_newest=request.keep_newest)
            return {"customer_id": request.customer_id, "revoked": revoked}
        status = "disabled" if request.action == "disable" else "active"
        customers.set_status(conn, request.customer_id, status)
        return {"customer_id": request.customer_id, "status": status}


@logger.inject_lambda_context
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    try:
        request = _REQUEST.validate_python(event)
    except ValidationError as exc:
        problems = exc.errors(include_input=False, include_url=False)
        return {"ok": False, "error": f"invalid request: {len(problems)} problems", "details": problems}
    try:
        result = _run(request)
    except CustomerError as exc:
        return {"ok": False, "error": str(exc)}
    logger.info("customer admin", extra={"action": request.action})  # never the token
    return {"ok": True, **result}
