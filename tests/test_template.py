"""template.yaml: handlers resolve, roles are conditioned, secrets are least-privilege."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


class _CfnLoader(yaml.SafeLoader):
    pass


def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if suffix == "Condition":
        name = "Condition"
    return {name: value}


_CfnLoader.add_multi_constructor("!", _tag)


def load_template() -> dict[str, Any]:
    return yaml.load((ROOT / "template.yaml").read_text(), Loader=_CfnLoader)


TEMPLATE = load_template()
RESOURCES: dict[str, Any] = TEMPLATE["Resources"]
FUNCTIONS = {k: v for k, v in RESOURCES.items() if v["Type"] == "AWS::Serverless::Function"}
ADMIN_ONLY = {"IngestApi", "IngestFunction", "CustomerAdminFunction", "MaintenanceFunction"}
CLIENT_ONLY = {"PushFunction", "PushStateTable"}


@pytest.mark.parametrize("logical_id", sorted(FUNCTIONS))
def test_each_function_handler_resolves_to_an_importable_callable(logical_id: str) -> None:
    props = FUNCTIONS[logical_id]["Properties"]
    module_name, _, attr = props["Handler"].rpartition(".")
    path = ROOT / props["CodeUri"] / f"{module_name}.py"
    assert path.exists(), path
    spec = importlib.util.spec_from_file_location(f"_template_{logical_id}", path)
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(getattr(module, attr))


def test_handler_modules_have_distinct_names() -> None:
    names = [f["Properties"]["Handler"].rpartition(".")[0] for f in FUNCTIONS.values()]
    by_file = {(f["Properties"]["CodeUri"], n) for f, n in zip(FUNCTIONS.values(), names, strict=True)}
    assert len({n for _, n in by_file}) == len(by_file)


def _condition(resource: dict[str, Any]) -> str | None:
    return resource.get("Condition")


def test_admin_only_resources_carry_the_admin_condition() -> None:
    for logical_id in ADMIN_ONLY:
        assert _condition(RESOURCES[logical_id]) == "IsAdmin", logical_id


def test_client_only_resources_carry_the_push_condition() -> None:
    assert TEMPLATE["Conditions"]["PushEnabled"] == {
        "Fn::And": [{"Condition": "IsClient"}, {"Fn::Equals": [{"Ref": "IngestEnabled"}, "true"]}]
    }
    for logical_id in CLIENT_ONLY:
        assert _condition(RESOURCES[logical_id]) == "PushEnabled", logical_id
    assert TEMPLATE["Parameters"]["IngestEnabled"]["Default"] == "false"


def test_resources_referring_to_conditioned_ones_share_the_condition() -> None:
    for logical_id, resource in RESOURCES.items():
        text = repr(resource.get("Properties", {}))
        for target in ADMIN_ONLY | CLIENT_ONLY:
            if f"'{target}'" in text or f"{{'Ref': '{target}'}}" in text:
                assert _condition(resource) == _condition(RESOURCES[target]), (logical_id, target)


def test_push_schedule_and_maintenance_schedule() -> None:
    push = FUNCTIONS["PushFunction"]["Properties"]["Events"]["Push"]
    assert push["Type"] == "Schedule"
    assert push["Properties"]["Schedule"] == {"Ref": "PushSchedule"}
    assert TEMPLATE["Parameters"]["PushSchedule"]["Default"] == "rate(1 minute)"
    table = RESOURCES["PushStateTable"]["Properties"]
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True


def _secret_env(fn: dict[str, Any]) -> set[str]:
    env = dict(TEMPLATE["Globals"]["Function"]["Environment"]["Variables"])
    env.update(fn["Properties"].get("Environment", {}).get("Variables", {}))
    return {v["Ref"] for k, v in env.items() if k.endswith("SECRET_ARN") and isinstance(v, dict)}


def _granted(fn: dict[str, Any]) -> set[str]:
    out = set()
    for policy in fn["Properties"].get("Policies", []):
        if isinstance(policy, dict) and "AWSSecretsManagerGetSecretValuePolicy" in policy:
            out.add(policy["AWSSecretsManagerGetSecretValuePolicy"]["SecretArn"]["Ref"])
    return out


@pytest.mark.parametrize("logical_id", sorted(FUNCTIONS))
def test_no_function_reads_a_secret_it_is_not_granted(logical_id: str) -> None:
    fn = FUNCTIONS[logical_id]
    uses = _secret_env(fn)
    granted = _granted(fn)
    assert uses <= granted, f"{logical_id} reads {uses - granted} without a grant"
    assert granted <= uses, f"{logical_id} is granted {granted - uses} it does not use"
    for policy in fn["Properties"].get("Policies", []):
        assert not isinstance(policy, str), f"{logical_id} has a managed policy {policy}"


def test_only_the_push_function_touches_the_state_table() -> None:
    for logical_id, fn in FUNCTIONS.items():
        has = any("DynamoDBCrudPolicy" in p for p in fn["Properties"].get("Policies", []) if isinstance(p, dict))
        assert has == (logical_id == "PushFunction"), logical_id


def test_every_function_has_a_log_group_with_retention() -> None:
    for logical_id, fn in FUNCTIONS.items():
        group = fn["Properties"]["LoggingConfig"]["LogGroup"]["Ref"]
        assert RESOURCES[group]["Type"] == "AWS::Logs::LogGroup"
        assert RESOURCES[group]["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}
        assert _condition(RESOURCES[group]) == _condition(fn), logical_id


def test_globals_and_outputs() -> None:
    glob = TEMPLATE["Globals"]["Function"]
    assert glob["Runtime"] == "python3.13"
    assert glob["Tracing"] == "Active"
    assert glob["Environment"]["Variables"]["POWERTOOLS_SERVICE_NAME"] == "fleet"
    assert RESOURCES["FleetLayer"]["Metadata"]["BuildMethod"] == "python3.13"
    outputs = TEMPLATE["Outputs"]
    assert outputs["IngestApiUrl"]["Condition"] == "IsAdmin"
    assert outputs["PushStateTableName"]["Condition"] == "PushEnabled"


def test_alarms_exist_for_ingest_errors_5xx_push_failures_and_lag() -> None:
    alarms = {k: v["Properties"]["MetricName"] for k, v in RESOURCES.items() if v["Type"] == "AWS::CloudWatch::Alarm"}
    assert {"Errors", "5xx", "PushFailures", "PushLagSeconds", "PushRefused"} <= set(alarms.values())
