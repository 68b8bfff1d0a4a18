"""Columns encoded straight into PostgreSQL's binary array format.

psycopg's generic array dumper visits every element in Python; these encoders hand
whole columns to ``array`` and strided copies (C) at once, several times as fast for
a 5,000-row batch, which is a large Python cost on the ingest path (see bench/). The wire
format is array_recv's: ndim, has-null flag, element type, per dimension its length
and lower bound, then per element a length (-1 for NULL) and the element's bytes.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import adapters
from psycopg.adapt import Dumper
from psycopg.pq import Format

_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # PostgreSQL's timestamp epoch
_ONE_US = timedelta(microseconds=1)
_NULL = b"\xff\xff\xff\xff"
_PACK_ITEM_F8 = struct.Struct(">id").pack
_LEN = struct.Struct(">i").pack


def _eight_byte_elements(values: array[Any]) -> bytes:
    """Each 8-byte value big-endian behind its length (8), for a whole column at
    once: strided slice assignments, in C, instead of a pack per element."""
    if sys.byteorder == "little":
        values.byteswap()
    raw = values.tobytes()
    out = bytearray(12 * len(values))
    out[3::12] = b"\x08" * len(values)  # the big-endian int32 8; its other bytes stay 0
    for k in range(8):
        out[4 + k :: 12] = raw[k::8]
    return bytes(out)


def _header(elem_oid: int, count: int, has_null: bool) -> bytes:
    if count == 0:
        return struct.pack(">iiI", 0, 0, elem_oid)
    return struct.pack(">iiIii", 1, int(has_null), elem_oid, count, 1)


class Float8Array(bytes):
    """float8[] in binary form."""

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Float8Array:
        n = len(values)
        try:
            column = array("d", values)  # type: ignore[type-var]  # refuses None: faster than a search for it
        except TypeError:
            parts = [_NULL if v is None else _PACK_ITEM_F8(8, v) for v in values]
            return cls(_header(701, n, True) + b"".join(parts))
        return cls(_header(701, n, False) + _eight_byte_elements(column))


class TimestamptzArray(bytes):
    """timestamptz[] in binary form (microseconds since 2000-01-01 UTC)."""

    @classmethod
    def of(cls, values: Sequence[datetime]) -> TimestamptzArray:
        micros = array("q", [(v - _EPOCH) // _ONE_US for v in values])
        return cls(_header(1184, len(values), False) + _eight_byte_elements(micros))


class TextArray(bytes):
    """text[] in binary form (UTF-8)."""

    @classmethod
    def of(cls, values: Sequence[str | None]) -> TextArray:
        # Each distinct value encoded once: a batch names a few devices many times.
        encoded = {v: _NULL if v is None else _LEN(len(data := v.encode())) + data for v in set(values)}
        return cls(_header(25, len(values), None in encoded) + b"".join(map(encoded.__getitem__, values)))

    @classmethod
    def of_large(cls, values: Sequence[str]) -> TextArray:
        """The same for large values (quarantined items, up to the body's size): length
        and bytes kept apart and joined once with the header, so each value is copied
        twice, not four times; slower than ``of`` for the many short ids of a batch."""
        parts: list[bytes] = [_header(25, len(values), False)]
        for value in values:
            data = value.encode()
            parts += (_LEN(len(data)), data)
        return cls(b"".join(parts))


def _dumper(oid: int) -> type[Dumper]:
    class _Packed(Dumper):
        format = Format.BINARY

        def dump(self, obj: bytes) -> bytes:
            return bytes(obj)

    _Packed.oid = oid
    return _Packed


adapters.register_dumper(Float8Array, _dumper(1022))
adapters.register_dumper(TimestamptzArray, _dumper(1185))
adapters.register_dumper(TextArray, _dumper(1009))
