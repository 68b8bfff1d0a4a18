"""Logger, Metrics and Tracer, created once for the whole package."""

from __future__ import annotations

from aws_lambda_powertools import Logger, Metrics, Tracer

logger = Logger(service="fleet")
metrics = Metrics(namespace="FleetPipeline", service="fleet")
tracer = Tracer(service="fleet")
