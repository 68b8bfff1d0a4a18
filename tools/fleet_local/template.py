"""Reads template.yaml as the local runner needs it: functions (code, handler,
timeout, environment), their HTTP API routes and schedules, with parameters and
references resolved the way a local run can resolve them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form tags (!Ref, !Sub, !If, ...)."""


def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "Condition":
        return {"Condition": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _tag)


def load(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_CfnLoader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class FunctionSpec:
    logical_id: str
    code_uri: Path
    handler: str
    timeout_s: float
    memory_mb: int
    environment: dict[str, str]
    routes: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    schedules: list[tuple[str, str]] = field(default_factory=list)  # (event name, expression)
    condition: str | None = None


class Template:
    def __init__(self, path: Path, parameter_overrides: dict[str, str] | None = None) -> None:
        self.path = path
        self.root = path.parent
        self.doc = load(path)
        self.parameters = {name: str(spec.get("Default", "")) for name, spec in self.doc.get("Parameters", {}).items()}
        self.parameters.update(parameter_overrides or {})
        self.parameters.setdefault("AWS::Region", "local")
        self.parameters.setdefault("AWS::StackName", "fleet-local")
        self.parameters.setdefault("AWS::AccountId", "000000000000")

    # -- intrinsic functions, as far as a local run can take them --------------
    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if not isinstance(value, dict):
            return value
        if "Ref" in value:
            name = value["Ref"]
            if name in self.parameters:
                return self.parameters[name]
            # A resource: locally, its logical id stands for its name.
            return name
        if "Fn::Sub" in value:
            text = value["Fn::Sub"] if isinstance(value["Fn::Sub"], str) else value["Fn::Sub"][0]
            for key, val in self.parameters.items():
                text = text.replace("${" + key + "}", val)
            return text
        if "Fn::If" in value:
            cond, yes, no = value["Fn::If"]
            return self.resolve(yes if self.condition(cond) else no)
        if "Fn::GetAtt" in value:
            return ".".join(value["Fn::GetAtt"])
        if "Fn::Join" in value:
            sep, parts = value["Fn::Join"]
            return sep.join(str(p) for p in self.resolve(parts))
        return {k: self.resolve(v) for k, v in value.items()}

    def condition(self, name: str) -> bool:
        return bool(self._eval(self.doc.get("Conditions", {})[name]))

    def condition_parameters(self, name: str) -> list[str]:
        """The parameters a condition reads, directly or through other conditions."""
        found: list[str] = []

        def walk(expr: Any) -> None:
            if isinstance(expr, list):
                for item in expr:
                    walk(item)
            elif isinstance(expr, dict):
                if isinstance(expr.get("Ref"), str) and expr["Ref"] in self.parameters and expr["Ref"] not in found:
                    found.append(expr["Ref"])
                elif isinstance(expr.get("Condition"), str):
                    walk(self.doc.get("Conditions", {}).get(expr["Condition"]))
                else:
                    for value in expr.values():
                        walk(value)

        walk(self.doc.get("Conditions", {}).get(name))
        return found

    def _eval(self, expr: Any) -> Any:
        if isinstance(expr, dict):
            if "Fn::Equals" in expr:
                a, b = (self._eval(x) for x in expr["Fn::Equals"])
                return str(a) == str(b)
            if "Fn::And" in expr:
                return all(self._eval(x) for x in expr["Fn::And"])
            if "Fn::Or" in expr:
                return any(self._eval(x) for x in expr["Fn::Or"])
            if "Fn::Not" in expr:
                return not self._eval(expr["Fn::Not"][0])
            if "Condition" in expr:
                return self.condition(expr["Condition"])
            return self.resolve(expr)
        return expr

    # -- functions ---------------------------------------------------------------
    def functions(self) -> dict[str, FunctionSpec]:
        """The functions the stack has with these parameters (their Condition holds)."""
        return {lid: spec for lid, spec in self.all_functions().items() if self.creates(spec)}

    def creates(self, spec: FunctionSpec) -> bool:
        return spec.condition is None or self.condition(spec.condition)

    def all_functions(self) -> dict[str, FunctionSpec]:
        """Every function of the template, whatever its Condition."""
        glob = self.doc.get("Globals", {}).get("Function", {})
        out: dict[str, FunctionSpec] = {}
        for logical_id, res in self.doc.get("Resources", {}).items():
            if res.get("Type") != "AWS::Serverless::Function":
                continue
            props = res.get("Properties", {})
            env: dict[str, Any] = dict(glob.get("Environment", {}).get("Variables", {}))
            env.update(props.get("Environment", {}).get("Variables", {}))
            spec = FunctionSpec(
                logical_id=logical_id,
                code_uri=(self.root / props["CodeUri"]).resolve(),
                handler=props["Handler"],
                timeout_s=float(props.get("Timeout", glob.get("Timeout", 3))),
                memory_mb=int(props.get("MemorySize", glob.get("MemorySize", 128))),
                environment={k: _text(self.resolve(v)) for k, v in env.items()},
                condition=res.get("Condition"),
            )
            for event_name, event in (props.get("Events") or {}).items():
                eprops = event.get("Properties", {})
                if event.get("Type") in ("HttpApi", "Api"):
                    spec.routes.append((str(eprops.get("Method", "ANY")).upper(), str(eprops["Path"])))
                elif event.get("Type") in ("Schedule", "ScheduleV2"):
                    expr = self.resolve(eprops.get("Schedule") or eprops.get("ScheduleExpression"))
                    spec.schedules.append((event_name, str(expr)))
            out[logical_id] = spec
        return out

    def layer_dirs(self) -> list[Path]:
        return [
            (self.root / res["Properties"]["ContentUri"]).resolve()
            for res in self.doc.get("Resources", {}).values()
            if res.get("Type") == "AWS::Serverless::LayerVersion"
        ]


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value).lower() if isinstance(value, bool) else str(value)
    return json.dumps(value)


def read_env_vars_file(path: Path | None) -> dict[str, dict[str, str]]:
    """SAM's --env-vars format: {"Parameters": {...all functions}, "<LogicalId>": {...}}."""
    if path is None:
        return {}
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return {k: {n: str(v) for n, v in (vals or {}).items()} for k, vals in doc.items()}


def function_environment(spec: FunctionSpec, env_vars: dict[str, dict[str, str]]) -> dict[str, str]:
    """The template's variables, overridden by the env-vars file (as SAM does: only
    variables the template declares are taken from the file)."""
    env = dict(spec.environment)
    for source in (env_vars.get("Parameters", {}), env_vars.get(spec.logical_id, {})):
        for key, value in source.items():
            if key in env:
                env[key] = value
    return env
