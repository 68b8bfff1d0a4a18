"""The local tool's embedded defaults: what a command starts when it is not told
where the servers are (a throwaway PostgreSQL with a migrated database, a local
DynamoDB endpoint), the sample events' customer, and what the push still needs."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from fleet_local.runner import LocalStack

# The customer and token of the sample events in events/ (and env.sample.json): a
# throwaway Admin database has them registered, so the samples work as they are.
SAMPLE_CUSTOMER = "DEV0001"
SAMPLE_TOKEN = "flt_ExampleTokenReplaceWithYourOwn_2RmiI6"  # noqa: S105 - public, throwaway databases only


@contextmanager
def embedded_dynamodb() -> Iterator[str]:
    """A local DynamoDB endpoint (moto server) on 127.0.0.1; yields its URL."""
    import logging

    from moto.server import ThreadedMotoServer

    from fleet_local.cluster import free_port

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per DynamoDB call

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def ensure_state_table(endpoint: str, name: str) -> None:
    import boto3

    client = boto3.client(
        "dynamodb",
        endpoint_url=endpoint,
        region_name=os.environ.get("AWS_DEFAULT_REGION", "eu-west-1"),
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "local"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "local"),
    )
    with contextlib.suppress(client.exceptions.ResourceInUseException):
        client.create_table(
            TableName=name,
            KeySchema=[{"AttributeName": "resource", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "resource", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )


@contextmanager
def embedded_database(role: str, existing_url: str | None = None, profile: str = "auto") -> Iterator[str]:
    """``DATABASE_URL`` when given; else a throwaway cluster with a database
    migrated in ``profile``, an Admin one with the sample customer registered."""
    from fleet import db
    from fleet.schema.migrate import migrate
    from psycopg import sql

    from fleet_local.cluster import LocalCluster

    with ExitStack() as stack:
        url = existing_url
        if not url:
            cluster = LocalCluster(timescaledb_background_workers=4)
            stack.callback(cluster.stop)  # before start: a start cut short is cleaned up too
            cluster.start()
            with db.connect(cluster.url()) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(f"fleet_{role}")))
            url = cluster.url(f"fleet_{role}")
        with db.connect(url) as conn:
            migrate(conn, role, profile)  # type: ignore[arg-type]
            if role == "admin" and not existing_url:
                register_sample_customer(conn)
        yield url


def register_sample_customer(conn: Any) -> None:
    """The sample events' customer and token (only its SHA-256 is stored)."""
    from fleet import tokens

    with conn.transaction():
        conn.execute(
            "INSERT INTO fleet.customers (id, name) VALUES (%s, 'Sample events') ON CONFLICT (id) DO NOTHING",
            (SAMPLE_CUSTOMER,),
        )
        conn.execute(
            "INSERT INTO fleet.customer_tokens (token_sha256, customer_id, token_hint) VALUES (%s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            (tokens.digest(SAMPLE_TOKEN), SAMPLE_CUSTOMER, tokens.hint(SAMPLE_TOKEN)),
        )


def push_settings_missing(stack: LocalStack) -> str | None:
    """What the PushFunction still needs to be told, in words, or None."""
    env = stack.environment("PushFunction")
    missing = [] if env.get("INGEST_URL") else ["INGEST_URL"]
    if not env.get("INGEST_TOKEN") and not env.get("INGEST_TOKEN_SECRET_ARN"):
        missing.append("INGEST_TOKEN")
    if not missing:
        return None
    return (
        f"PushFunction: {' and '.join(missing)} not set, so every push tick fails. Set them under"
        ' "PushFunction" in an --env-vars file: env.sample.json sends to http://127.0.0.1:3000/api/fleet/ingest'
        " (where `fleet local start-api` serves the Admin API) with the sample customer's token"
    )


def local_aws_env() -> None:
    """Credentials for local endpoints, so boto3 never looks further."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    os.environ.setdefault("AWS_DEFAULT_REGION", "eu-west-1")


def wait_forever(stop: threading.Event) -> None:
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        stop.set()
