"""Schedules as EventBridge reads them (``rate(...)``, ``cron(...)``, UTC), and the
loop that invokes each scheduled function of a local stack on its schedule."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fleet_local.runner import InvokeError, LocalStack

_RATE = re.compile(r"^rate\(\s*(\d+)\s+(minute|minutes|hour|hours|day|days)\s*\)$")
_CRON = re.compile(r"^cron\((.+)\)$")
_MONTHS = {
    m: i for i, m in enumerate(["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"], 1)
}
_DAYS = {d: i for i, d in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"], 1)}


@dataclass(frozen=True)
class Schedule:
    """An EventBridge schedule expression: ``rate(...)`` or ``cron(...)`` (UTC)."""

    expression: str
    every: timedelta | None = None
    fields: tuple[frozenset[int], ...] | None = None  # minute, hour, day, month, weekday(1=SUN)

    @classmethod
    def parse(cls, expression: str) -> Schedule:
        text = expression.strip()
        rate = _RATE.match(text)
        if rate:
            amount, unit = int(rate[1]), rate[2].rstrip("s")
            if amount < 1:
                raise ValueError(f"rate must be positive: {expression}")
            if (amount == 1) != (not rate[2].endswith("s")):
                raise ValueError(f"use '1 {unit}' or 'N {unit}s': {expression}")
            return cls(text, every=timedelta(**{f"{unit}s": amount}))
        cron = _CRON.match(text)
        if not cron:
            raise ValueError(f"not a schedule expression: {expression}")
        parts = cron[1].split()
        if len(parts) != 6:
            raise ValueError(f"cron needs 6 fields (min hour day-of-month month day-of-week year): {expression}")
        minute, hour, dom, month, dow, _year = parts
        if (dom == "?") == (dow == "?"):
            raise ValueError(f"exactly one of day-of-month and day-of-week must be '?': {expression}")
        fields = (
            _field(minute, 0, 59),
            _field(hour, 0, 23),
            _field(dom, 1, 31),
            _field(month, 1, 12, _MONTHS),
            _field(dow, 1, 7, _DAYS),
        )
        return cls(text, fields=fields)

    def next_after(self, when: datetime) -> datetime:
        if self.every is not None:
            return when + self.every
        assert self.fields is not None
        minute, hour, dom, month, dow = self.fields
        t = when.astimezone(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
        for _ in range(366 * 24 * 60):
            weekday = (t.isoweekday() % 7) + 1  # SUN=1 .. SAT=7
            if t.minute in minute and t.hour in hour and t.month in month and t.day in dom and weekday in dow:
                return t
            t += timedelta(minutes=1)
        raise ValueError(f"{self.expression} never fires")


def _field(text: str, low: int, high: int, names: dict[str, int] | None = None) -> frozenset[int]:
    if text in ("*", "?"):
        return frozenset(range(low, high + 1))
    values: set[int] = set()
    for part in text.split(","):
        step = 1
        if "/" in part:
            part, step_text = part.split("/", 1)
            step = int(step_text)
            if step < 1:
                raise ValueError(f"bad step in {text}")
        if part in ("*", ""):
            start, end = low, high
        elif "-" in part:
            a, b = part.split("-", 1)
            start, end = _value(a, names), _value(b, names)
        else:
            start = _value(part, names)
            end = high if "/" in text else start
        if not (low <= start <= high and low <= end <= high):
            raise ValueError(f"{text}: out of range {low}-{high}")
        values.update(range(start, end + 1, step))
    return frozenset(values)


def _value(text: str, names: dict[str, int] | None) -> int:
    key = text.upper()
    if names and key in names:
        return names[key]
    return int(text)


def scheduled_event(logical_id: str, event_name: str, when: datetime) -> dict[str, Any]:
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "000000000000",
        "time": when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": "local",
        "resources": [f"arn:aws:events:local:000000000000:rule/fleet-local-{logical_id}{event_name}"],
        "detail": {},
    }


def run_schedules(
    stack: LocalStack,
    stop: threading.Event,
    on_result: Callable[[str, Any], None] | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    fire_at_start: bool = True,
    only: set[str] | None = None,
) -> None:
    """Invoke each scheduled function on its schedule until ``stop`` is set."""
    plans: list[_Plan] = []
    now = clock()
    for logical_id, event_name, expr in stack.schedules():
        if only is not None and logical_id not in only:
            continue
        schedule = Schedule.parse(expr)
        plans.append(_Plan(logical_id, event_name, schedule, now if fire_at_start else schedule.next_after(now)))
    while not stop.is_set() and plans:
        plan = min(plans, key=lambda p: p.due)
        wait = (plan.due - clock()).total_seconds()
        if wait > 0 and stop.wait(min(wait, 1.0)):
            break
        if wait > 0:
            continue
        try:
            result: Any = stack.invoke(plan.logical_id, scheduled_event(plan.logical_id, plan.event_name, plan.due))
        except InvokeError as exc:
            result = exc.payload
        if on_result:
            on_result(plan.logical_id, result)
        plan.due = plan.schedule.next_after(plan.due if plan.schedule.every is None else clock())


@dataclass
class _Plan:
    logical_id: str
    event_name: str
    schedule: Schedule
    due: datetime
