"""A body's items, validated: the valid ones with their index in the request, and
each invalid one rejected on its own (index and reason, the item as sent).

What the JSON parsers may build is bounded (``WHOLE_BODY_VALUES``), so any body within
the size limits is handled within the function's memory (bench/memory.py). A body
refused as a whole raises ``BodyRefused`` with the excerpt the operator keeps."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import TypeAdapter, ValidationError

from fleet.config import IngestConfig
from fleet.errors import BatchTooLarge, BodyRefused, InvalidRequest
from fleet.ingest.codec import AsSent, envelope_validator, envelopes, in_utc
from fleet.ingest.records import Reject, payload_text
from fleet.ingest.spans import item_spans, json_values
from fleet.models import ITEM_MODELS, BatchType, Measurement, error_message

# What the JSON parsers may build for one request. A body is parsed whole only when it
# holds at most this many JSON values (counted from its bytes: commas and opening
# brackets, an upper bound); otherwise item by item, and an item over the bound is
# rejected unparsed. At 60-110 bytes a value in pydantic-core's or json's trees this
# keeps a parse under ~55 MB; nesting is bounded by pydantic-core's recursion limit.
WHOLE_BODY_VALUES = 500_000
_ONE = {bt: TypeAdapter(model) for bt, model in ITEM_MODELS.items()}
_FIELDS = {bt: frozenset(model.__annotations__) for bt, model in ITEM_MODELS.items()}


@dataclass
class Parsed:
    batch_type: BatchType
    valid: list[Any]  # unique by key for the upserts
    positions: list[int]  # the index in the request of each of ``valid``
    valid_total: int
    rejects: list[Reject]
    payload: Callable[[int], str]  # the item at an index as sent, for the quarantine


class NotAllValid(Exception):
    """A part of a batch in parts holds something only the whole body's parse judges."""


class BodyParser:
    """The items of decompressed bodies, by the limits of ``cfg``."""

    def __init__(self, cfg: IngestConfig) -> None:
        self.cfg = cfg
        self._envelopes = {bt: envelope_validator(bt, cfg.max_items) for bt in BatchType}

    def parse(self, batch_type: BatchType, body: bytes) -> Parsed:
        whole = json_values(body) <= WHOLE_BODY_VALUES
        # Fast path: the whole batch is valid; parsed and validated in one pass. Not for
        # a body with an escaped NUL (see codec.envelope_validator). A backslash is
        # looked for first: one memchr, where a search for the six bytes takes 0.4 ms.
        if whole and (b"\\" not in body or b"\\u0000" not in body):
            try:
                items = self._envelopes[batch_type].validate_json(body)["items"]
            except ValidationError:
                pass
            else:
                as_sent = AsSent(body)
                return self._finish(batch_type, items, list(range(len(items))), [], as_sent.payload)
        # Slow path: find out exactly what is wrong, item by item.
        if whole:
            try:
                raw_items = _envelope(body)
            except RecursionError:
                pass  # nested too deep for a parse of the whole: item by item from the bytes
            else:
                if len(raw_items) > self.cfg.max_items:
                    raise BatchTooLarge(f"batch has {len(raw_items)} items; the limit is {self.cfg.max_items}")
                return self._validate(batch_type, raw_items)
        return self._validate_spans(batch_type, body)

    def valid_parts(self, body: bytes, cuts: list[int]) -> Iterator[list[Measurement]]:
        """The items of a measurements body cut at ``cuts`` (codec.part_cuts), part by
        part, each validated as the whole body would be; raises NotAllValid at the
        first part with anything the whole path must look at."""
        envelope = self._envelopes[BatchType.MEASUREMENTS]
        limit = datetime.now(UTC) + timedelta(seconds=self.cfg.max_future_seconds)
        count = 0
        for part in envelopes(body, cuts):
            try:
                items: list[Measurement] = envelope.validate_json(part)["items"]
            except ValidationError:
                raise NotAllValid from None
            count += len(items)
            if count > self.cfg.max_items or in_utc(items) or max(m["time"] for m in items) > limit:
                raise NotAllValid
            yield items

    def _validate(self, batch_type: BatchType, items: list[Any]) -> Parsed:
        """Each item on its own, through the same JSON validation as the fast path."""
        adapter = _ONE[batch_type]
        valid: list[Any] = []
        indexes: list[int] = []
        rejects: list[Reject] = []
        for index, item in enumerate(items):
            payload = payload_text(item)
            try:
                valid.append(adapter.validate_json(payload))
                indexes.append(index)
            except ValidationError as exc:
                outcome = _judged_again(batch_type, item, exc)
                if isinstance(outcome, str):
                    rejects.append(Reject(index, outcome, payload))
                else:
                    valid.append(outcome)
                    indexes.append(index)
        return self._finish(batch_type, valid, indexes, rejects, lambda i: payload_text(items[i]))

    def _validate_spans(self, batch_type: BatchType, body: bytes) -> Parsed:
        """Item by item from the bytes, for a body too large to parse whole: each item
        is parsed on its own, so what the parser builds is bounded by one item, and an
        item over that bound is rejected without being parsed."""
        if not body.isascii():
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest("body is not UTF-8") from None
        try:
            spans = item_spans(body, self.cfg.max_items)
        except InvalidRequest as refused:
            raise BodyRefused(refused.message, refused.message, body.decode("utf-8")) from None
        adapter = _ONE[batch_type]
        valid: list[Any] = []
        indexes: list[int] = []
        rejects: list[Reject] = []
        for index, (start, end) in enumerate(spans):
            if json_values(body, start, end) > WHOLE_BODY_VALUES:
                reason = f"item: holds more than {WHOLE_BODY_VALUES} JSON values"
                rejects.append(Reject(index, reason, body[start:end].decode("utf-8")))
                continue
            try:
                valid.append(adapter.validate_json(body[start:end]))
                indexes.append(index)
            except ValidationError as exc:
                item: Any = None
                if _parser_refused(exc):
                    try:  # what json accepts and pydantic-core's parser does not: lone surrogates
                        item = json.loads(body[start:end])
                    except ValueError:
                        raise BodyRefused("body is not valid JSON", "not JSON", body.decode("utf-8")) from None
                    except RecursionError:
                        pass  # nested too deep for json as well: rejected with the parser's reason
                outcome = _judged_again(batch_type, item, exc)
                if isinstance(outcome, str):
                    rejects.append(Reject(index, outcome, body[start:end].decode("utf-8")))
                else:
                    valid.append(outcome)
                    indexes.append(index)
        return self._finish(batch_type, valid, indexes, rejects, lambda i: body[slice(*spans[i])].decode("utf-8"))

    def _finish(
        self,
        batch_type: BatchType,
        valid: list[Any],
        indexes: list[int],
        rejects: list[Reject],
        payload: Callable[[int], str],
    ) -> Parsed:
        if batch_type is BatchType.MEASUREMENTS:
            valid, indexes, late = self._times(valid, indexes, payload)
            if late:
                rejects = sorted([*rejects, *late], key=_reject_order)
        total = len(valid)
        valid, indexes = _unique(batch_type, valid, indexes)
        return Parsed(batch_type, valid, indexes, total, rejects, payload)

    def _times(
        self, models: list[Measurement], indexes: list[int], payload: Callable[[int], str]
    ) -> tuple[list[Measurement], list[int], list[Reject]]:
        """Times moved to UTC; those that cannot be (before year 1 or after 9999 in
        UTC) or lie too far in the future are rejected."""
        unmovable = in_utc(models)
        limit = datetime.now(UTC) + timedelta(seconds=self.cfg.max_future_seconds)
        if not unmovable and max((m["time"] for m in models), default=limit) <= limit:
            return models, indexes, []
        kept: list[Measurement] = []
        kept_at: list[int] = []
        rejects: list[Reject] = []
        late = f"time: more than {self.cfg.max_future_seconds} s in the future"
        for position, (m, i) in enumerate(zip(models, indexes, strict=True)):
            if position in unmovable:
                rejects.append(Reject(i, "time: outside the years 1 to 9999 in UTC", payload(i)))
            elif m["time"] > limit:
                rejects.append(Reject(i, late, payload(i)))
            else:
                kept.append(m)
                kept_at.append(i)
        return kept, kept_at, rejects


def _envelope(body: bytes) -> list[Any]:
    """``{"items": [...]}`` or a refusal of the whole body.

    RecursionError (nesting deeper than the json module goes) is left to the caller,
    which then takes the body item by item."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("body is not UTF-8") from None
    try:
        doc = json.loads(text)
    except ValueError:
        raise BodyRefused("body is not valid JSON", "not JSON", text) from None
    if not isinstance(doc, dict):
        raise BodyRefused('body must be a JSON object {"items": [...]}', "not a JSON object", text)
    if "items" not in doc:
        raise BodyRefused('body must have an "items" list', "no items", text)
    if not isinstance(doc["items"], list):
        raise BodyRefused('"items" must be a list', "items not a list", text)
    if extra := [k for k in doc if k != "items"]:
        # Named as JSON (escaped): a key may hold a NUL or a lone surrogate.
        named = ", ".join(json.dumps(k)[:40] for k in sorted(extra)[:5])
        raise BodyRefused(f"unknown top-level keys: {named}", "unknown keys", text)
    return doc["items"]


def _parser_refused(exc: ValidationError) -> bool:
    """pydantic-core's JSON parser refused the item (not its nesting depth)."""
    return any(e["type"] == "json_invalid" and "recursion" not in e["msg"] for e in exc.errors())


_SURROGATE = re.compile("[\ud800-\udfff]")  # in text from json.loads: always alone


def _judged_again(batch_type: BatchType, item: Any, exc: ValidationError) -> Any:
    """An item the validation refused with ``exc``: the valid item, or the reason (a
    str) it is rejected for. ``item`` is what json.loads made of it, when pydantic-core's
    parser refused what json takes: a lone surrogate escape such as ``\\ud800`` (valid
    JSON, not valid Unicode). Unknown fields are ignored, whatever they hold: the item
    is validated without them. A known field that holds one rejects the item with a
    reason (PostgreSQL cannot store it), together with anything else wrong with it."""
    if not _parser_refused(exc) or not isinstance(item, dict):
        return _reasons(exc)
    known = {key: value for key, value in item.items() if key in _FIELDS[batch_type]}
    unstorable: list[str] = []
    for key, value in known.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if _SURROGATE.search(text):
            unstorable.append(
                f"{key}: holds a lone UTF-16 surrogate (an escape such as \\ud800 without its pair),"
                " which is not text PostgreSQL can store"
            )
            # The same length in characters, for the field's other checks.
            fixed = _SURROGATE.sub("\ufffd", text)
            known[key] = fixed if isinstance(value, str) else json.loads(fixed)
    if not unstorable and len(known) == len(item):
        return _reasons(exc)  # not what json takes and the parser does not
    try:
        model = _ONE[batch_type].validate_json(payload_text(known))
    except ValidationError as again:
        return "; ".join([*unstorable, _reasons(again)])
    return "; ".join(unstorable) if unstorable else model


def _reasons(exc: ValidationError) -> str:
    reasons = []
    for err in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "item"
        reasons.append(f"{where}: {error_message(err)}")
    return "; ".join(reasons)


def _reject_order(reject: Reject) -> int:
    return reject.index if reject.index is not None else -1


def _unique(batch_type: BatchType, models: list[Any], positions: list[int]) -> tuple[list[Any], list[int]]:
    """One row per key for the upserts: the last site or device (the newest description),
    the last digest of a device-day."""
    if batch_type is BatchType.MEASUREMENTS:
        # Repeats inside the batch are left to ON CONFLICT DO NOTHING, which keeps
        # the first and counts the rest as duplicates.
        return models, positions
    latest: dict[Any, tuple[Any, int]] = {}
    for item, position in zip(models, positions, strict=True):
        key = (item["device_id"], item["day"]) if batch_type is BatchType.DIGESTS else item["id"]
        latest.pop(key, None)  # re-inserted: the dict keeps the order of the last
        latest[key] = (item, position)
    return [m for m, _ in latest.values()], [p for _, p in latest.values()]
