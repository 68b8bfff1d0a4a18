"""Checks responses against openapi.yaml (the contract that ships with the project)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SPEC_PATH = Path(__file__).resolve().parents[1] / "openapi.yaml"


@cache
def spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC_PATH.read_text())


def _resolve(node: Any, root: dict[str, Any]) -> Any:
    """Inline $refs and turn OpenAPI 3.0 ``nullable`` into JSON Schema."""
    if isinstance(node, list):
        return [_resolve(n, root) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target: Any = root
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return _resolve(target, root)
    out = {k: _resolve(v, root) for k, v in node.items() if k not in ("nullable", "format", "description")}
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


def check_response(method: str, path: str, status: int, headers: dict[str, str], body: Any) -> None:
    """Raise AssertionError when the response is not one the contract allows."""
    root = spec()
    operation = root["paths"][path][method.lower()]
    documented = operation["responses"]
    assert str(status) in documented, f"{method} {path} answered {status}, which the contract does not list"
    response = _resolve(documented[str(status)], root)
    for name in response.get("headers", {}):
        assert name.lower() in {h.lower() for h in headers}, f"{status} without the {name} header"
    schema = response["content"]["application/json"]["schema"]
    jsonschema.validate(body, schema)


def request_schema(path: str, method: str = "post") -> dict[str, Any]:
    root = spec()
    op = root["paths"][path][method]
    return _resolve(op["requestBody"]["content"]["application/json"]["schema"], root)
