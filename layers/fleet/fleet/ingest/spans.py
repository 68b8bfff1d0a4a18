"""The items of a body located in its bytes, without building any of them: for a body
too large to parse whole (see ``fleet.ingest.parse``)."""

from __future__ import annotations

import json
import re

from fleet.errors import BatchTooLarge, InvalidRequest


def json_values(body: bytes, start: int = 0, end: int | None = None) -> int:
    """An upper bound on the JSON values (and keys) in ``body[start:end]``, from its
    bytes: every value after a container's first follows a comma, and every container
    opens with a bracket. Commas and brackets inside strings only raise the bound."""
    if start == 0 and end is None:
        # A whole body: one pass in C keeping just those bytes (0.55 ms for 900 KB
        # against 0.85 for three counts); what it keeps is gone before anything is parsed.
        return len(body.translate(None, _ALL_BUT_COMMAS_AND_OPENINGS)) + 1
    end = len(body) if end is None else end
    return body.count(b",", start, end) + body.count(b"[", start, end) + body.count(b"{", start, end) + 1


_ALL_BUT_COMMAS_AND_OPENINGS = bytes(b for b in range(256) if b not in b",[{")


def item_spans(body: bytes, max_items: int) -> list[tuple[int, int]]:
    """Where each item of ``{"items": [...]}`` starts and ends in ``body``, without
    building any of them (see ``_ItemSplitter``). Only the envelope is checked here
    (400) and the count of items (413); each item is checked by its own parse."""
    return _ItemSplitter(body, max_items).spans()


# A copy of the body in which only structure is left, byte for byte at the same
# positions: escapes and every byte that is not a quote, bracket, comma or colon
# become "0", strings holding a bracket are blanked, and small containers of nothing
# but scalars ("[]", "{}", "[1]", "[[]]" ...) become zeros too, so that millions of
# them cost nothing to skip. All in C (translate, replace, one anchored regex).
_STRUCTURE = bytes(c if c in b'"[]{},:' else 0x30 for c in range(256))

_BRACKETED_STRING = re.compile(rb'(?:[^"]++|"[^"\[\]{}]*+")*+("[^"]*+")')

_SMALL_CONTAINERS = [o + b"0" * k + c for k in range(4) for o, c in ((b"[", b"]"), (b"{", b"}"))]

_TOKEN = re.compile(rb'"[^"]*"|[\[{]+|[\]}]+|[,:]|"')  # at the items' level and above

_BRACKET_RUN = re.compile(rb"[\[{]+|[\]}]+")  # inside an item; brackets in strings are gone by then

_FEW_BRACKETS = 10_000  # fewer are scanned as they are

_WHITESPACE = b" \t\r\n"

_DOOMED_DEPTH = 256  # past pydantic-core's recursion limit: the item is rejected anyway


def _structure(body: bytes) -> bytes:
    scan = body
    if b"\\" in body:  # escapes: every quote left after this is a delimiter
        scan = body.replace(b"\\\\", b"00").replace(b'\\"', b"00")
    blanked: bytearray | None = None
    pos = 0
    while (m := _BRACKETED_STRING.match(scan, pos)) and m.group(1):
        blanked = blanked if blanked is not None else bytearray(scan)
        a, b = m.span(1)
        blanked[a + 1 : b - 1] = b"0" * (b - a - 2)
        pos = b
    scan = bytes(blanked) if blanked is not None else scan
    scan = scan.translate(_STRUCTURE).replace(b'""', b"00")
    brackets = scan.count(b"[") + scan.count(b"{")
    for _ in range(3):  # "[[[]]]" needs three rounds; a round costs ~15 ms a MB
        if brackets < _FEW_BRACKETS:
            break
        for small in _SMALL_CONTAINERS:
            scan = scan.replace(small, b"0" * len(small))
        left = scan.count(b"[") + scan.count(b"{")
        if left > brackets // 2:
            break  # what is left is not made of small containers
        brackets = left
    return scan


class _ItemSplitter:
    """A scan of the structure: strings and brackets at the top two levels, runs of
    brackets inside an item, and an item nested past ``_DOOMED_DEPTH`` skipped by
    counting brackets in blocks."""

    def __init__(self, body: bytes, max_items: int) -> None:
        self.body = body
        self.max_items = max_items
        self.scan = _structure(body)
        self.items: list[tuple[int, int]] = []
        self.extra: list[str] = []
        self.depth = 0
        self.in_items = False  # inside the items array: depth 2 is then an item's level
        self.item_from = -1  # where the current item begins (after "[" or ",")
        self.key: tuple[int, int] | None = None  # the last string at depth 1
        self.seen_items = False
        self._next = dict.fromkeys(b"[]{}", -1)  # the next of each bracket found so far

    def _next_bracket(self, pos: int) -> int:
        """Where the next bracket is at or after ``pos``: one find per kind, remembered
        until passed (a regex search is ~60x slower through a long stretch of zeros)."""
        for kind, at in self._next.items():
            if at < pos and at != len(self.scan):
                found = self.scan.find(kind, pos)
                self._next[kind] = len(self.scan) if found < 0 else found
        return min(self._next.values())

    def spans(self) -> list[tuple[int, int]]:
        pos = self._skip_space(0)
        if self.scan[pos : pos + 1] != b"{":
            raise InvalidRequest('body must be a JSON object {"items": [...]}')
        self.depth, pos = 1, pos + 1
        while self.depth:
            token = _BRACKET_RUN.match(self.scan, self._next_bracket(pos)) if self.depth > 2 else None
            token = token or _TOKEN.search(self.scan, pos)
            if token is None:
                raise InvalidRequest("body is not valid JSON")
            pos = self._take(token.start(), token.end())
        if self.body[pos:].strip(_WHITESPACE):
            raise InvalidRequest("body is not valid JSON")
        if not self.seen_items:
            raise InvalidRequest('body must have an "items" list')
        if self.extra:
            named = ", ".join(json.dumps(k)[:40] for k in sorted(self.extra)[:5])
            raise InvalidRequest(f"unknown top-level keys: {named}")
        return self.items

    def _take(self, at: int, end: int) -> int:
        """One token; returns where the scan goes on."""
        c = self.scan[at]
        if c == 0x22:  # a string (at depth 1 or 2)
            if end - at == 1:
                raise InvalidRequest("body is not valid JSON")
            if self.depth == 1:
                self.key = (at, end)
        elif c == 0x3A:  # ":"
            if self.depth == 1:
                return self._value_of_key(end)
        elif c == 0x2C:  # ","
            if self.in_items and self.depth == 2:
                self._add(self.item_from, at)
                self.item_from = end
        elif c in b"[{":
            self.depth += end - at
            if self.in_items and self.depth > 2 + _DOOMED_DEPTH:
                return self._past_deep_part(end)
        else:
            self._close(end - at, end)
        return end

    def _value_of_key(self, after_colon: int) -> int:
        try:
            # No string before the colon: the key was "" (blanked with the empty strings).
            name = json.loads(self.body[self.key[0] : self.key[1]]) if self.key else ""
        except ValueError:
            raise InvalidRequest("body is not valid JSON") from None
        self.key = None
        if name != "items":
            self.extra.append(name)
            return after_colon
        self.seen_items = True
        at = self._skip_space(after_colon)
        if self.body[at : at + 1] != b"[":
            raise InvalidRequest('"items" must be a list')
        if self.scan[at : at + 1] == b"0":  # a small container: "[]" or a few scalars
            end = self.body.index(b"]", at) + 1
            self.in_items, self.item_from, self.depth = True, at + 1, 2
            self._close(1, end)
            return end
        self.in_items, self.item_from, self.depth = True, at + 1, 2
        return at + 1

    def _close(self, run: int, end: int) -> None:
        """A run of closing brackets ending at ``end``."""
        if self.in_items and self.depth > 2:
            inside = min(run, self.depth - 2)
            self.depth, run = self.depth - inside, run - inside
        if run and self.in_items and self.depth == 2:  # the items array closes
            self._add(self.item_from, end - run, last=True)
            self.in_items, self.depth, run = False, 1, run - 1
        self.depth -= run
        if self.depth < 0:
            raise InvalidRequest("body is not valid JSON")

    def _past_deep_part(self, pos: int) -> int:
        """Skip to where the item is back at depth ``2 + _DOOMED_DEPTH``, counting
        brackets in blocks: a block with fewer closing brackets than the depth to
        climb cannot hold the way out."""
        scan, target = self.scan, 2 + _DOOMED_DEPTH
        block = 65_536
        while self.depth > target:
            if pos >= len(scan):
                raise InvalidRequest("body is not valid JSON")
            end = min(pos + block, len(scan))
            closing = scan.count(b"]", pos, end) + scan.count(b"}", pos, end)
            if self.depth - closing > target:
                self.depth += scan.count(b"[", pos, end) + scan.count(b"{", pos, end) - closing
                pos, block = end, min(block * 2, 65_536)
            elif end - pos > 64:
                block = (end - pos) // 2
            else:
                c = scan[pos]
                self.depth += 1 if c in b"[{" else -1 if c in b"]}" else 0
                pos += 1
        return pos

    def _add(self, start: int, end: int, last: bool = False) -> None:
        body = self.body
        while start < end and body[start] in _WHITESPACE:
            start += 1
        while end > start and body[end - 1] in _WHITESPACE:
            end -= 1
        if start == end:
            if last and not self.items:
                return  # "[ ]"
            raise InvalidRequest("body is not valid JSON")
        self.items.append((start, end))
        if len(self.items) > self.max_items:
            raise BatchTooLarge(f"batch has more than {self.max_items} items")

    def _skip_space(self, pos: int) -> int:
        while pos < len(self.body) and self.body[pos] in _WHITESPACE:
            pos += 1
        return pos
