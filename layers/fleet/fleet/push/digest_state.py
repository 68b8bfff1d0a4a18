"""The digests' own state: their settings, and the ``digests`` item's document of
what is pending, found and re-sent."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from datetime import date, timedelta
from typing import Any

from fleet.models import is_client_id
from fleet.reconcile import HEALABLE


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


def choose(doc: DigestState, s: DigestSettings, now: float, today: date) -> dict[date, set[str] | None]:
    """This tick's work, from the state and the clock: per day, the devices to digest
    (None: every device of the day). The re-sent device-days to confirm, the changed
    days pending, then the rolling re-check's days as its pace allows."""
    work: dict[date, set[str] | None] = {}

    def add(key: Key) -> bool:
        device, day = key
        if not is_client_id(device):
            return True  # the ingest refuses its rows: nothing of it to digest
        if day > today or (day not in work and len(work) >= s.days_per_tick):
            return False
        devices = work.setdefault(day, set())
        if devices is not None:
            devices.add(device)
        return True

    for text, o in doc.open.items():  # a re-sent device-day is confirmed
        if o["o"] in HEALABLE and o["a"] <= s.heal_attempts and o.get("resent"):
            add(parse_key(text))
    for text in doc.pending:
        add(parse_key(text))
    # The rolling re-check: a round starts once a period after the last one began
    # (and the last one is done), and is paced to end within 80 % of the period.
    if doc.round_started_at is None or (doc.round_done >= s.horizon_days and now - doc.round_started_at >= s.period_s):
        doc.round_started_at, doc.round_done = now, 0
        doc.round_first_day = (today - timedelta(days=s.horizon_days)).isoformat()
    due = min(s.horizon_days, math.ceil(s.horizon_days * (now - doc.round_started_at) / (0.8 * s.period_s)) + 1)
    first = date.fromisoformat(doc.round_first_day or today.isoformat())
    while doc.round_done < due and len(work) < s.days_per_tick:
        work[first + timedelta(days=doc.round_done)] = None
        doc.round_done += 1
    return work
