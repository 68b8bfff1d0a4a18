"""Fixtures of the reliability suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fleet_local.embedded import embedded_dynamodb


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials for local AWS endpoints (moto), so boto3 never looks further."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def dynamodb_endpoint(aws_credentials: None) -> Iterator[str]:
    """A DynamoDB endpoint other processes can reach too (moto server)."""
    with embedded_dynamodb() as endpoint:
        yield endpoint
