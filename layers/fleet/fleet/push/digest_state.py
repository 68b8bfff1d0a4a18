"""The digests' own state: their settings, and the ``digests`` item's document of
what is pending, found and re-sent."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from datetime import date
from typing import Any


@dataclass(frozen=True)
class DigestSettings:
    horizon_days: int = 90  # the rolling re-check covers this many days before today
    period_s: float = 86_400.0  # ...once within this period
    alarm_ticks: int = 5  # a mismatch not healed within this many ticks raises the alarm
    heal_attempts: int = 3  # re-sends of one device-day before it is left to be reported
    batch_size: int = 5000  # rows per re-sent batch, digests per digests batch
    scan_rows: int = 100_000  # rows of the changed-days scan per chunk
    scan_chunks: int = 5  # chunks of it per tick at most
    max_pending: int = 5000  # changed device-days kept waiting (bounds the state item)
    days_per_tick: int = 30  # distinct days digested per tick at most


Key = tuple[str, date]  # (device_id, day)


def key_text(key: Key) -> str:
    return f"{key[1].isoformat()}|{key[0]}"


def parse_key(text: str) -> Key:
    day, _, device = text.partition("|")
    return device, date.fromisoformat(day)


@dataclass
class DigestState:
    """The ``digests`` item's document (one attribute, JSON)."""

    position: str | None = None  # the changed-days scan's cursor
    pending: list[str] = field(default_factory=list)  # changed device-days not yet digested
    open: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> outcome, first tick, attempts
    round_started_at: float | None = None
    round_first_day: str | None = None
    round_done: int = 0
    tick: int = 0
    failures: int = 0
    next_attempt_at: float = 0.0
    last_error: str | None = None

    @classmethod
    def loads(cls, text: str | None) -> DigestState:
        if not text:
            return cls()
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})

    def dumps(self) -> str:
        return json.dumps(vars(self), separators=(",", ":"), sort_keys=True)
