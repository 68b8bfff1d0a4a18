"""Push state in DynamoDB, one item per resource (sites, devices, measurements).

A lease taken with a conditional write keeps two overlapping invocations from
pushing the same resource at once (EventBridge delivers at least once; a slow
tick can overlap the next). A lease past its expiry is taken over. Every save is
conditional on holding the lease *and* on the version that was read, so a holder
paused past its lease (and overtaken) cannot move the cursor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from botocore.exceptions import ClientError

RESOURCES = ("sites", "devices", "measurements")


@dataclass
class ResourceState:
    resource: str
    version: int = 0
    initialized: bool = False
    cursor: str | None = None
    batch_size: int | None = None
    failures: int = 0
    successes_in_a_row: int = 0
    next_attempt_at: float = 0.0
    last_success_at: float | None = None
    last_error: str | None = None
    content_hash: str | None = None
    last_full_push_at: float | None = None
    server_max_items: int | None = None
    server_max_bytes: int | None = None
    server_max_in_flight: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _SAVED = (
        "cursor",
        "batch_size",
        "failures",
        "successes_in_a_row",
        "next_attempt_at",
        "last_success_at",
        "last_error",
        "content_hash",
        "last_full_push_at",
        "server_max_items",
        "server_max_bytes",
        "server_max_in_flight",
    )

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> ResourceState:
        def num(name: str, default: Any = None) -> Any:
            value = item.get(name)
            if value is None:
                return default
            return float(value) if "_at" in name else int(value)

        return cls(
            resource=item["resource"],
            version=int(item.get("version", 0)),
            initialized=bool(item.get("initialized", False)),
            cursor=item.get("cursor"),
            batch_size=num("batch_size"),
            failures=num("failures", 0),
            successes_in_a_row=num("successes_in_a_row", 0),
            next_attempt_at=num("next_attempt_at", 0.0),
            last_success_at=num("last_success_at"),
            last_error=item.get("last_error"),
            content_hash=item.get("content_hash"),
            last_full_push_at=num("last_full_push_at"),
            server_max_items=num("server_max_items"),
            server_max_bytes=num("server_max_bytes"),
            server_max_in_flight=num("server_max_in_flight"),
        )


def _dynamo(value: Any) -> Any:
    if isinstance(value, float):
        return Decimal(repr(value))
    return value


class LeaseLost(Exception):
    """The lease expired and another invocation took it; stop without writing."""


class PushStateStore:
    def __init__(self, table: Any) -> None:
        self.table = table  # a boto3 DynamoDB Table resource

    @classmethod
    def connect(cls, table_name: str, endpoint_url: str | None = None) -> PushStateStore:
        import boto3

        return cls(boto3.resource("dynamodb", endpoint_url=endpoint_url).Table(table_name))

    def acquire(self, resource: str, owner: str, now: float, lease_seconds: int) -> ResourceState | None:
        """Take the resource's lease; None when another live invocation holds it."""
        try:
            resp = self.table.update_item(
                Key={"resource": resource},
                UpdateExpression=(
                    "SET lease_owner = :me, lease_expires_at = :exp, #version = if_not_exists(#version, :zero)"
                ),
                ExpressionAttributeNames={"#version": "version"},
                ConditionExpression=(
                    "attribute_not_exists(lease_expires_at) OR lease_expires_at < :now OR lease_owner = :me"
                ),
                ExpressionAttributeValues={
                    ":me": owner,
                    ":exp": _dynamo(now + lease_seconds),
                    ":now": _dynamo(now),
                    ":zero": 0,
                },
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return None
            raise
        return ResourceState.from_item(resp["Attributes"])

    def save(self, state: ResourceState, owner: str) -> None:
        """Write the state if we still hold the lease and nobody wrote since we read."""
        values: dict[str, Any] = {":me": owner, ":v": state.version, ":next": state.version + 1, ":t": True}
        # Names go through placeholders: several (cursor, version) are reserved words.
        names = {"#version": "version", "#initialized": "initialized", "#owner": "lease_owner"}
        sets = ["#version = :next", "#initialized = :t"]
        removes = []
        for name in ResourceState._SAVED:
            names[f"#{name}"] = name
            value = getattr(state, name)
            if value is None:
                removes.append(f"#{name}")
            else:
                values[f":{name}"] = _dynamo(value)
                sets.append(f"#{name} = :{name}")
        expression = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
        try:
            self.table.update_item(
                Key={"resource": state.resource},
                UpdateExpression=expression,
                ConditionExpression="#owner = :me AND #version = :v",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                raise LeaseLost(f"lease on {state.resource} lost; state not written") from None
            raise
        state.version += 1
        state.initialized = True

    def release(self, resource: str, owner: str) -> None:
        try:
            self.table.update_item(
                Key={"resource": resource},
                UpdateExpression="REMOVE lease_owner, lease_expires_at",
                ConditionExpression="lease_owner = :me",
                ExpressionAttributeValues={":me": owner},
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise

    def get(self, resource: str) -> ResourceState | None:
        item = self.table.get_item(Key={"resource": resource}, ConsistentRead=True).get("Item")
        return ResourceState.from_item(item) if item else None

    def document(self, resource: str, attribute: str) -> tuple[str | None, int]:
        """A resource's document (one attribute of its item, text) and the item's version."""
        item = self.table.get_item(Key={"resource": resource}, ConsistentRead=True).get("Item", {})
        return item.get(attribute), int(item.get("version", 0))

    def save_document(self, resource: str, attribute: str, text: str, owner: str, version: int) -> bool:
        """Write a resource's document if we still hold the lease and nobody wrote since
        we read ``version``; False when the lease was lost (nothing written)."""
        try:
            self.table.update_item(
                Key={"resource": resource},
                UpdateExpression="SET #doc = :doc, #version = :next, #initialized = :t",
                ConditionExpression="#owner = :me AND #version = :v",
                ExpressionAttributeNames={
                    "#doc": attribute,
                    "#version": "version",
                    "#initialized": "initialized",
                    "#owner": "lease_owner",
                },
                ExpressionAttributeValues={":doc": text, ":next": version + 1, ":v": version, ":me": owner, ":t": True},
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
            return False
        return True
