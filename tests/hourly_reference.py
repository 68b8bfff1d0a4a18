"""The hourly energy of shared DESIGN.md computed in Python from the raw readings of
one device, the reference both profiles' ``fleet.hourly_per_device`` are held to.

Straight from the definition, with none of the view's bookkeeping: the rise between
consecutive register readings (``b - a``, or ``b`` after a drop, never below 0) is
spread evenly over the time between them, and each hour gets the part that falls in
it. Hours listed: those with readings, and the hours without rows that two register
readings bracket (sample_count 0). Energy is None for an hour with readings but no
register reading that no two register readings bracket.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

HOUR = timedelta(hours=1)


@dataclass(frozen=True)
class Hour:
    sample_count: int
    energy_wh: float | None


def hour_of(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def rise(a: float, b: float) -> float:
    return b - a if b >= a else max(b, 0.0)


def hourly(readings: list[tuple[datetime, float | None]]) -> dict[datetime, Hour]:
    """``readings``: (time, energy_wh) of one device, any order, times distinct."""
    rows = sorted(readings)
    counts: dict[datetime, int] = {}
    for t, _ in rows:
        counts[hour_of(t)] = counts.get(hour_of(t), 0) + 1
    register = [(t, v) for t, v in rows if v is not None]
    energy: dict[datetime, float] = {hour_of(t): 0.0 for t, _ in register}
    for (t0, v0), (t1, v1) in itertools.pairwise(register):
        whole = (t1 - t0).total_seconds()
        amount = rise(v0, v1)
        h = hour_of(t0)
        while h < t1:
            part = (min(h + HOUR, t1) - max(h, t0)).total_seconds()
            if part > 0:
                energy[h] = energy.get(h, 0.0) + amount * part / whole
            h += HOUR
    hours = set(counts) | set(energy)
    return {h: Hour(counts.get(h, 0), energy.get(h)) for h in sorted(hours)}


def total_rise(readings: list[tuple[datetime, float | None]]) -> float:
    """The register's rise from its first reading to its last."""
    values = [v for _, v in sorted(readings) if v is not None]
    return sum(rise(a, b) for a, b in itertools.pairwise(values))
