"""Every sample event in events/ parses with the Powertools parser model of the
function it is for, and the ingest samples' bodies follow the OpenAPI contract."""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path

import jsonschema
import pytest
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import APIGatewayProxyEventV2Model, EventBridgeModel
from contract import check_response, request_schema
from fleet.schema.custom_resource import parse_event
from support import EVENTS

ALL = sorted(p.relative_to(EVENTS).as_posix() for p in EVENTS.rglob("*.json"))


def _model_for(name: str):
    if name.startswith("bootstrap/") and name != "bootstrap/maintenance.json":
        return parse_event
    if name in ("bootstrap/maintenance.json", "push/scheduled.json"):
        return lambda event: parse(event=event, model=EventBridgeModel)
    if name.startswith("ingest/"):
        return lambda event: parse(event=event, model=APIGatewayProxyEventV2Model)
    raise AssertionError(f"no parser model is known for events/{name}: add it here")


@pytest.mark.parametrize("name", ALL)
def test_event_parses_with_its_function_model(name: str) -> None:
    event = json.loads((EVENTS / name).read_text())
    assert _model_for(name)(event) is not None


@pytest.mark.parametrize("name", [n for n in ALL if n.startswith("ingest/") and "state" not in n])
def test_ingest_sample_bodies_follow_the_contract(name: str) -> None:
    event = json.loads((EVENTS / name).read_text())
    body = event["body"]
    raw = base64.b64decode(body) if event["isBase64Encoded"] else body.encode()
    if event["headers"].get("content-encoding") == "gzip":
        raw = gzip.decompress(raw)
    jsonschema.validate(json.loads(raw), request_schema("/api/fleet/ingest"))
    assert event["headers"]["x-batch-type"] in ("sites", "devices", "measurements")


def test_the_contract_check_can_fail() -> None:
    with pytest.raises(AssertionError, match="does not list"):
        check_response("POST", "/api/fleet/ingest", 500, {}, {"message": "x"})
    with pytest.raises(AssertionError, match="Retry-After"):
        check_response("POST", "/api/fleet/ingest", 429, {}, {"message": "x"})
    with pytest.raises(jsonschema.ValidationError):
        check_response("POST", "/api/fleet/ingest", 200, {}, {"accepted": 1})


def test_every_event_folder_is_known() -> None:
    assert {Path(n).parts[0] for n in ALL} == {"bootstrap", "ingest", "push"}
