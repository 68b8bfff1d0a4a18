"""What a push tick tells: per resource, what it did; and the named points a push
passes (reliability tests stop a real process at them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ResourceReport:
    resource: str
    outcome: str = "idle"  # idle | pushed | skipped | backoff | leased | failed | refused
    batches: int = 0
    rows: int = 0
    bytes: int = 0
    duplicates: int = 0
    rejected: int = 0
    shed: int = 0  # batches the server answered 429
    detail: str | None = None


@dataclass
class TickReport:
    resources: dict[str, ResourceReport] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {name: vars(r) for name, r in self.resources.items()}


class Checkpoints:
    """Named points of a push (reliability tests stop a real process at them)."""

    def reached(self, name: str, resource: str) -> None:  # pragma: no cover - overridden in tests
        pass
