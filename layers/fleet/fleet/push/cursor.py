"""The push's measurement cursor: where it stands, as text that every later version reads.

Why it never skips a row
------------------------
Rows are read in a total order, keyset-paginated, and only from behind a horizon
that no transaction can still commit in front of:

* order: ``(push_xid, time, device_id)``. ``push_xid`` is the id of the
  transaction that wrote the row (``xid8 DEFAULT pg_current_xact_id()``).
* horizon: ``push_xid < pg_snapshot_xmin(pg_current_snapshot())``. Every
  transaction with an id below the snapshot's xmin has finished (committed or
  aborted), so every row that will ever carry such an id is already visible to
  this snapshot. Rows of transactions still open have ids >= xmin and wait.
* keyset: the next read starts strictly after the last key sent.

A tick reads its pages from one snapshot (``MeasurementReader``): consecutive runs
of the same ordered statement, each page's cursor the key of its last row.

So once the cursor has passed a key, no committed row can appear behind it later:
not a replay of 50,000 rows sharing one ``received_at`` (they share one xid and are
ordered by time and device inside it), not a transaction that stayed open for an
hour (its rows carry its xid, which is above the horizon until it commits), not a
transaction that began long ago and writes only now (same), wherever a batch
boundary falls. ``received_at`` cannot serve: it is the writing transaction's
*start* time, so a late commit carries an older value than rows already pushed.

Rows written before the ``push_xid`` column existed have NULL there; they are all
committed (the migration's ALTER waited for their writers) and are pushed first,
in ``(time, device_id)`` order (the ``legacy`` phase).

Two rows with the same ``(time, device_id)`` in one transaction are one row on
the Admin side (its unique key), so the keyset stepping over the second loses
nothing the Admin database could hold.

On a mapped table, ``time`` and ``device_id`` are the mapped columns in the form
they are sent (a ``timestamp`` read in the mapping's zone as timestamptz, an id of
any type as text): the keyset compares exactly what the cursor holds, and the
cursor's indexes are built on those expressions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

_MIN_TIME = "-infinity"
Phase = Literal["legacy", "xid"]


class UnreadableCursor(ValueError):
    """A cursor text in no format the push ever wrote (or damaged)."""


@dataclass(frozen=True)
class Cursor:
    """Where the push stands: the phase, then the keyset position in it.

    The text carries its format version ("v"). ``encode`` writes the current one;
    ``decode`` reads every version ever written (one reader each in ``_READERS``), so
    a push that is updated keeps the cursors the last one saved and the server's
    ledger holds. A new format gets a new version and a reader here; none is dropped."""

    phase: Phase
    xid: int = 0
    time: str = _MIN_TIME  # PostgreSQL's text of a timestamptz (read back as one), or -infinity
    device: str = ""

    FORMAT: ClassVar[int] = 1

    def encode(self) -> str:
        return json.dumps(
            {"v": self.FORMAT, "p": self.phase, "x": str(self.xid), "t": self.time, "d": self.device},
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, text: str | None) -> Cursor:
        """The cursor from its text; None or "" is the start. A text in no format the
        push ever wrote raises UnreadableCursor (never taken as the start silently)."""
        if not text:
            return START
        try:
            doc = json.loads(text)
            reader = _READERS.get(doc["v"]) if isinstance(doc, dict) and isinstance(doc.get("v"), int) else None
            if reader is None:
                raise ValueError(f"no cursor format {doc.get('v') if isinstance(doc, dict) else None!r}")
            return reader(doc)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UnreadableCursor(f"unreadable push cursor: {exc}") from None


def _read_v1(doc: dict[str, Any]) -> Cursor:
    """Format 1 (the first): {"v":1,"p":phase,"x":"<xid8>","t":"<timestamptz>","d":"<device>"}."""
    phase = doc["p"]
    if phase not in ("legacy", "xid"):
        raise ValueError(f"unknown phase {phase!r}")
    xid = int(doc["x"])
    if xid < 0:
        raise ValueError("negative transaction id")
    time, device = doc["t"], doc["d"]
    if not isinstance(time, str) or not _TIMESTAMPTZ_TEXT.match(time):
        raise ValueError("the time is not the text of a timestamptz")
    if not isinstance(device, str) or _UNSTORABLE.search(device):
        raise ValueError("the device id is not text PostgreSQL can hold")
    return Cursor(phase, xid, time, device)


# PostgreSQL's ISO output of a timestamptz (what the push reads back), or -infinity.
_TIMESTAMPTZ_TEXT = re.compile(
    r"-infinity\Z|\d{4,}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d{1,6})?([+-]\d\d(:\d\d){0,2}|Z)?( BC)?\Z"
)
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


_READERS: dict[int, Callable[[dict[str, Any]], Cursor]] = {1: _read_v1}


START = Cursor("legacy")
XID_START = Cursor("xid")


def furthest(texts: Sequence[str | None]) -> str | None:
    """Of the ledger's recent cursors (the last acknowledged first), the one furthest
    in the keyset's order: batches in flight at once are acknowledged in any order.
    Ordered by phase, transaction and time; a tie, or a cursor that cannot be read or
    placed, leaves the ledger's order to decide (the first of the tied). None for none."""
    best: tuple[tuple[int, int, datetime], str | None] | None = None
    for text in texts:
        try:
            cursor = Cursor.decode(text)
            key = (0 if cursor.phase == "legacy" else 1, cursor.xid, _instant(cursor.time))
        except (UnreadableCursor, ValueError):
            return texts[0] if texts else None
        if best is None or key > best[0]:
            best = (key, text)
    return best[1] if best else None


def _instant(time: str) -> datetime:
    """A cursor's time as an instant, for ordering (PostgreSQL's text, or +-infinity)."""
    if time == "-infinity":
        return datetime.min.replace(tzinfo=UTC)
    if time == "infinity":
        return datetime.max.replace(tzinfo=UTC)
    instant = datetime.fromisoformat(time)  # "BC" and the like: ValueError
    if instant.tzinfo is None:
        raise ValueError("a time without its offset")
    return instant


def key_of(row: tuple[Any, ...]) -> Cursor:
    """The cursor of a row. A row with a NULL time or device id (a portal table older
    than the migration may allow them) has no key to step past; such rows sort last
    in their transaction (a NULL device id last among its time's), and "infinity" or
    "" stands in: the next read skips no row that has a key, and may send again the
    keyed rows of that transaction and time (the Admin counts them as duplicates).
    Another row without a key left in the same transaction stays behind; the Admin
    would refuse it anyway."""
    xid, at, device = row[:3]
    if xid is None:
        return Cursor("legacy", 0, at or "infinity", device or "")
    return Cursor("xid", int(xid), at or "infinity", device or "")
