"""A page of the portal's measurements and its request body: the JSON written from
PostgreSQL's own text of the values, on the fast path when the page allows it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from isal import igzip

from fleet.models import MEASUREMENT_FIELDS
from fleet.push.cursor import Cursor

# A page's JSON, written from the values as PostgreSQL's own text (what COPY would
# write: no JSON functions on the server, no conversion to Python numbers or
# datetimes), one of two ways, the same JSON either way:
#
# * fast: an f-string per row (MeasurementPage.body). Exact by construction once
#   ``vouch`` has looked at the page: timestamps in ISO form in UTC (set for the
#   transaction), metrics as the digits of their float8 (NULL, NaN and Infinity
#   written as PostgreSQL's JSON writes them), no NULL time or device id, and no
#   device id that JSON would escape.
# * exact: value by value, for a page the fast path will not vouch for; written
#   as PostgreSQL's ``json_build_object`` writes the same values
#   (tests/test_push_pages.py holds both to it).
AS_TEXT = ("xid8", "timestamptz", "float8")  # the types the reader takes as PostgreSQL's text
_CONTROL = re.compile("[\x00-\x1f]")  # what JSON escapes, besides '"' and '\\'

# The formats the fast path (and the digests) read the text in, set for the
# transaction only, and only where the session's own differ: a changed TimeZone or
# DateStyle is reported to the client, and a proxy may pin the connection for it.
# (ISO output is the same whatever the MDY/DMY part; any extra_float_digits above 0
# gives the shortest exact digits.)
TEXT_SETTINGS = (
    "SELECT CASE WHEN current_setting('TimeZone') NOT IN ('UTC', 'Etc/UTC')"
    " THEN set_config('TimeZone', 'UTC', true) END,"
    " CASE WHEN left(current_setting('DateStyle'), 4) <> 'ISO,'"
    " THEN set_config('DateStyle', 'ISO, YMD', true) END,"
    " CASE WHEN current_setting('extra_float_digits')::int < 1"
    " THEN set_config('extra_float_digits', '1', true) END"
)

Row = tuple[Any, ...]  # (x, t, d, m0..m5) as PostgreSQL's text; None for NULL


@dataclass
class MeasurementPage:
    rows: list[Row]
    cursor: Cursor  # the key of the last row (the reader's position when none)
    limit: int  # the most rows it could hold
    vouched: bool  # whether the fast path writes its JSON

    @property
    def count(self) -> int:
        return len(self.rows)

    @property
    def full(self) -> bool:
        """Whether more rows may follow it."""
        return len(self.rows) == self.limit

    def body(self) -> bytes:
        """The request body: ``{"items": [...]}``."""
        if not self.vouched:
            items = [_exact_item(r) for r in self.rows]
        else:
            items = [
                f'{{"time":"{r[1].replace(" ", "T")}:00","device_id":"{r[2]}","power_w":{r[3]},"voltage_v":{r[4]},'
                f'"current_a":{r[5]},"energy_wh":{r[6]},"power_factor":{r[7]},"frequency_hz":{r[8]}}}'
                for r in self.rows
            ]
        if not items:
            return b'{"items":[]}'
        # The body's ends go into its first and last items: one join makes the whole
        # text (adding them around it would copy the page twice more; bench/README.md).
        items[0] = '{"items":[' + items[0]
        items[-1] += "]}"
        text = ",".join(items)
        # Numbers are digits, ".", "-", "+" and "e": a capital N or I is a NULL (None),
        # NaN or Infinity (written as PostgreSQL's JSON writes them), or is in a device
        # id, which vouch made sure holds none of those words.
        if self.vouched and ("N" in text or "I" in text):
            text = text.replace(":None", ":null").replace(":NaN", ':"NaN"')
            text = text.replace(":Infinity", ':"Infinity"').replace(":-Infinity", ':"-Infinity"')
        return text.encode()


def vouch(rows: list[Row]) -> bool:
    """Whether the fast path writes exactly what PostgreSQL's JSON would for these rows."""
    try:
        times = "".join([r[1] for r in rows])
        devices = "".join([r[2] for r in rows])
    except TypeError:  # a NULL
        return False
    if "n" in times or "B" in times:  # infinity, BC
        return False
    if '"' in devices or "\\" in devices or _CONTROL.search(devices):  # JSON escapes
        return False
    return not any(word in devices for word in ("None", "NaN", "Infinity"))


# PostgreSQL's text of a timestamptz in UTC and ISO DateStyle, and what its JSON
# writes for it: "2026-01-01 00:00:00.5+00" -> "2026-01-01T00:00:00.5+00:00".
_TIMESTAMPTZ = re.compile(r"(\S+) (\S+?)([+-]\d\d)(:\d\d)?(:\d\d)?( BC)?")
_NOT_FINITE = {"NaN": '"NaN"', "Infinity": '"Infinity"', "-Infinity": '"-Infinity"'}


def _exact_item(row: Row) -> str:
    metrics = ",".join(
        f'"{name}":{"null" if value is None else _NOT_FINITE.get(value, value)}'
        for name, value in zip(MEASUREMENT_FIELDS, row[3:], strict=True)
    )
    return f'{{"time":{_exact_time(row[1])},"device_id":{json.dumps(row[2], ensure_ascii=False)},{metrics}}}'


def _exact_time(text: str | None) -> str:
    if text is None:
        return "null"
    match = _TIMESTAMPTZ.fullmatch(text)
    if match is None:  # infinity, -infinity
        return json.dumps(text)
    day, clock, hours, minutes, seconds, era = match.groups()
    return f'"{day}T{clock}{hours}{minutes or ":00"}{seconds or ""}{era or ""}"'


def gzip_body(raw: bytes) -> bytes:
    """A request body compressed (ISA-L at level 1: bench/README.md has why)."""
    return igzip.compress(raw, compresslevel=1, mtime=0)


def items_body(items: list[dict[str, Any]]) -> bytes:
    """Items as the request body ``{"items": [...]}``, uncompressed."""
    return json.dumps({"items": items}, separators=(",", ":")).encode()
