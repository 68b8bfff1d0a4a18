"""The suite holds on any day: its date-dependent tests, run again at hard dates.

The tests marked ``calendar`` are those whose outcome could depend on the date (weekly
partitions, the archive bound, the hourly buckets, the future-time limit, token expiry,
status windows). Each case here runs them in a pytest session of its own whose clock,
and the clock of the throwaway PostgreSQL cluster that session starts, is moved to a
chosen moment by libfaketime: ``LD_PRELOAD`` with a relative shift, so time keeps
running, and monotonic clocks left alone (without that, timed waits hang). The moments
are computed from today, so they always lie ahead (see ``moments``).

Under libfaketime PostgreSQL's ``lock_timeout`` and ``statement_timeout`` no longer
fire, so no test that waits on them is marked ``calendar``. The outer bound here is
the subprocess timeout.
"""

from __future__ import annotations

import calendar
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBFAKETIME = [Path(p) for p in ("/usr/lib/x86_64-linux-gnu/faketime", "/usr/lib/aarch64-linux-gnu/faketime")]
MOMENT_ENV = "FLEET_ANY_DAY_AT"
RAN: list[str] = []  # read by conftest's closing summary


@dataclass(frozen=True)
class Moment:
    name: str
    at: datetime
    tz: str = "UTC"  # the test process's local time zone (TZ) and its sessions' (PGTZ)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.at:%a %Y-%m-%d %H:%M} UTC, TZ={self.tz})"


def _next(now: datetime, ok: Callable[[date], bool], hour: int, minute: int) -> datetime:
    day = (now + timedelta(days=1)).date()
    while not ok(day):
        day += timedelta(days=1)
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)


def _last_sunday(year: int, month: int) -> int:
    last = calendar.monthrange(year, month)[1]
    return max(d for d in range(last - 6, last + 1) if calendar.weekday(year, month, d) == calendar.SUNDAY)


def moments(now: datetime) -> list[Moment]:
    return [
        Moment("monday-0030Z", _next(now, lambda d: d.weekday() == 0, 0, 30)),
        Moment("wednesday-2359Z", _next(now, lambda d: d.weekday() == 2, 23, 59)),
        Moment("sunday", _next(now, lambda d: d.weekday() == 6, 12, 0)),
        Moment("leap-day", _next(now, lambda d: (d.month, d.day) == (2, 29), 12, 0)),
        Moment("year-end-2330Z", _next(now, lambda d: (d.month, d.day) == (12, 31), 23, 30)),
        # Europe/Berlin springs forward at 01:00 UTC on the last Sunday of March (02:00
        # local does not exist) and falls back at 01:00 UTC on the last Sunday of
        # October (02:00-03:00 local happens twice): just after the one, just before
        # the other, with the test process living in that zone.
        Moment(
            "berlin-spring-forward",
            _next(now, lambda d: d.month == 3 and d.day == _last_sunday(d.year, 3), 1, 30),
            "Europe/Berlin",
        ),
        Moment(
            "berlin-fall-back",
            _next(now, lambda d: d.month == 10 and d.day == _last_sunday(d.year, 10), 0, 30),
            "Europe/Berlin",
        ),
    ]


MOMENTS = moments(datetime.now(UTC))


def _libfaketime() -> Path | None:
    for folder in LIBFAKETIME:
        lib = folder / "libfaketimeMT.so.1"
        if lib.exists():
            return lib
    return None


def test_the_hard_dates_are_what_they_claim() -> None:
    by_name = {m.name: m.at for m in MOMENTS}
    assert by_name["monday-0030Z"].weekday() == 0 and by_name["monday-0030Z"].hour == 0
    assert by_name["wednesday-2359Z"].weekday() == 2 and by_name["wednesday-2359Z"].minute == 59
    assert by_name["sunday"].weekday() == 6
    assert (by_name["leap-day"].month, by_name["leap-day"].day) == (2, 29)
    assert (by_name["year-end-2330Z"].month, by_name["year-end-2330Z"].day) == (12, 31)
    from zoneinfo import ZoneInfo

    berlin = ZoneInfo("Europe/Berlin")
    spring = by_name["berlin-spring-forward"]
    # An hour before, Berlin was an hour further from UTC: the switch lies between.
    assert (spring - timedelta(hours=1)).astimezone(berlin).utcoffset() == timedelta(hours=1)
    assert spring.astimezone(berlin).utcoffset() == timedelta(hours=2)
    fall = by_name["berlin-fall-back"]
    assert fall.astimezone(berlin).utcoffset() == timedelta(hours=2)
    assert (fall + timedelta(hours=1)).astimezone(berlin).utcoffset() == timedelta(hours=1)
    assert all(m.at > datetime.now(UTC) for m in MOMENTS)


@pytest.mark.calendar
def test_the_clocks_agree(empty_db: str) -> None:
    """Python's clock and the server's agree; in an any-day run both are at its moment."""
    with psycopg.connect(empty_db) as conn:
        server_now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    here = datetime.now(UTC)
    assert abs(server_now - here) < timedelta(minutes=1)
    wanted = os.environ.get(MOMENT_ENV)
    if wanted:
        # The run started at the moment; its tests take minutes at most.
        assert timedelta(0) <= here - datetime.fromisoformat(wanted) < timedelta(minutes=10)


@pytest.mark.parametrize("moment", MOMENTS, ids=[m.name for m in MOMENTS])
def test_calendar_tests_pass_at(moment: Moment) -> None:
    if os.environ.get(MOMENT_ENV):
        pytest.skip("already inside an any-day run")
    lib = _libfaketime()
    assert lib is not None, "libfaketime is not installed (make test installs it: .ci/ensure-faketime)"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}  # the faked clock needs our own cluster
    shift = int((moment.at - datetime.now(UTC)).total_seconds())
    env |= {
        "LD_PRELOAD": str(lib),
        "FAKETIME": f"{shift:+d}",
        "DONT_FAKE_MONOTONIC": "1",
        "TZ": moment.tz,
        "PGTZ": moment.tz,
        MOMENT_ENV: moment.at.isoformat(),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "calendar", "-p", "no:cacheprovider", "-q", "-x", "tests"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    summary = next((ln for ln in reversed(proc.stdout.splitlines()) if " passed" in ln or " failed" in ln), "")
    RAN.append(f"{moment.label}: {summary.strip('= ') or 'no summary'}")
    assert proc.returncode == 0, f"calendar tests failed at {moment.label}:\n{tail}"
    assert " passed" in summary and "failed" not in summary, tail
