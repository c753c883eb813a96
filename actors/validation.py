"""Accept or reject events, each rejection with a reason that names a dead-letter subject.

Two entry points share one set of rules:

* :func:`parse_events` for JSON arrays from the outside (HTTP, SDK): a pydantic
  ``TypeAdapter`` over the whole batch, falling back to per-event errors only
  when something is wrong;
* :func:`check_batch` for columnar batches (simulator, replay, and every batch a
  shard consumes, since anyone with publish rights could write to the stream):
  the row rules pydantic cannot express (time window) plus the ones a
  hand-made wire batch could break (codes, empty or long strings, maps that
  are not small maps of scalars).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import Enum
from itertools import compress
from typing import Any

import numpy as np
import orjson
from pydantic import TypeAdapter, ValidationError

from actors.batch import EventBatch
from actors.events import (
    MAX_CATEGORY_LENGTH,
    MAX_ID_LENGTH,
    MAX_MAP_KEYS,
    MAX_STRING_VALUE,
    N_TYPES,
    SOURCES,
    Event,
)

_BATCH_ADAPTER: TypeAdapter[list[Event]] = TypeAdapter(list[Event])

DAY_MS = 86_400_000
# Revenue or dwell seconds beyond this is no real event; the aggregates keep value
# in integer thousandths, which must not overflow int64.
MAX_ABS_VALUE = 1e12
_INT_RANGE = (-(2**63), 2**64 - 1)  # the integers orjson can write
_UNWRITABLE = "<not serialisable>"  # stands in a dead letter for a map orjson cannot write


class RejectReason(str, Enum):
    """Why an event was refused; the value is the last token of its dead-letter subject."""

    INVALID_JSON = "invalid_json"
    BAD_WIRE = "bad_wire"
    SCHEMA = "schema"
    UNKNOWN_FIELD = "unknown_field"
    UNKNOWN_TYPE = "unknown_type"
    MISSING_USER = "missing_user"
    MISSING_EVENT_ID = "missing_event_id"
    BAD_TIMESTAMP = "bad_timestamp"
    BAD_VALUE = "bad_value"
    OVERSIZED = "oversized"
    WRONG_PARTITION = "wrong_partition"


@dataclass(frozen=True)
class ValidationPolicy:
    """Limits that are settings rather than schema.

    Attributes:
        max_future_ms: how far ahead of the wall clock an event time may be.
        min_ts_ms: the oldest event time accepted (default 1990-01-01, so that
            historical replays such as MovieLens pass).
        max_event_bytes: the largest single event, as JSON.
        max_dead_letter_bytes: the most bytes of a refused input a dead letter
            keeps (a whole bad body, an oversized event): NATS refuses messages
            over its max_payload, 1 MiB by default.
    """

    max_future_ms: int = DAY_MS
    min_ts_ms: int = 631_152_000_000
    max_event_bytes: int = 16_384
    max_dead_letter_bytes: int = 512 * 1024


@dataclass(frozen=True)
class Rejection:
    """One refused event: its position in the input, why, and its original bytes."""

    index: int
    reason: RejectReason
    detail: str
    raw: bytes
    key: str | None = None  # where it came from in the stream; makes its dead letter idempotent


@dataclass
class Checked:
    """The accepted events of an input, and the rejected ones."""

    batch: EventBatch
    rejected: list[Rejection]


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


def parse_events(raw: bytes, policy: ValidationPolicy, at_ms: int | None = None) -> Checked:
    """Validate a JSON array of events (the HTTP/SDK input).

    Raises nothing for bad input: a body that is not a JSON array yields one
    rejection at index -1 holding the whole body (its first
    ``policy.max_dead_letter_bytes``). The body must be standard JSON as orjson
    reads it (no ``NaN``, bytes that are UTF-8), so that an event's verdict never
    depends on the other events of its body.
    """
    try:
        items = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Checked(
            EventBatch.empty(), [_whole(raw, RejectReason.INVALID_JSON, str(exc), policy)]
        )
    if not isinstance(items, list):
        return Checked(
            EventBatch.empty(), [_whole(raw, RejectReason.SCHEMA, "expected an array", policy)]
        )
    try:
        events = _BATCH_ADAPTER.validate_json(raw)
    except ValidationError:
        return parse_items(items, policy, at_ms)
    # No event of a body smaller than the limit can be over it: skip re-serialising.
    if len(raw) > policy.max_event_bytes and any(
        len(orjson.dumps(item)) > policy.max_event_bytes for item in items
    ):
        return parse_items(items, policy, at_ms)  # it says which events are oversized
    batch = EventBatch.from_events(events)
    # Maps as orjson read them: it takes integers beyond 64 bits as floats, as
    # parse_items does, where pydantic would keep an int that cannot be written.
    batch.traits = [item.get("traits") for item in items]
    batch.properties = [item.get("properties") for item in items]
    return check_batch(batch, policy, at_ms)


def parse_items(items: list[Any], policy: ValidationPolicy, at_ms: int | None = None) -> Checked:
    """Validate already-parsed JSON values one by one, keeping input positions."""
    rejected: list[Rejection] = []
    good: list[Event] = []
    positions: list[int] = []
    for index, item in enumerate(items):
        try:
            raw = orjson.dumps(item)
        except TypeError:  # orjson reads 1024 levels of nesting but writes only 254
            detail = "nested too deeply to be an event"
            rejected.append(Rejection(index, RejectReason.SCHEMA, detail, b'"<nested too deeply>"'))
            continue
        if len(raw) > policy.max_event_bytes:
            detail = f"{len(raw)} bytes > {policy.max_event_bytes}"
            raw = raw[: policy.max_dead_letter_bytes]
            rejected.append(Rejection(index, RejectReason.OVERSIZED, detail, raw))
            continue
        try:
            good.append(Event.model_validate_json(raw))
            positions.append(index)
        except ValidationError as exc:
            reason, detail = _explain(exc)
            rejected.append(Rejection(index, reason, detail, raw))
    checked = check_batch(EventBatch.from_events(good), policy, at_ms)
    for r in checked.rejected:  # re-number from batch rows to input positions
        rejected.append(Rejection(positions[r.index], r.reason, r.detail, r.raw))
    rejected.sort(key=lambda r: r.index)
    return Checked(checked.batch, rejected)


def check_batch(batch: EventBatch, policy: ValidationPolicy, at_ms: int | None = None) -> Checked:
    """Apply the row rules to a columnar batch; rows that break one are split off."""
    n = len(batch)
    if n == 0:
        return Checked(batch, [])
    latest = (now_ms() if at_ms is None else at_ms) + policy.max_future_ms
    if _clean(batch, policy, latest):  # the common case, in a few whole-column tests
        return Checked(batch, [])
    reasons: list[tuple[np.ndarray, RejectReason, str]] = []
    reasons.append((batch.type >= N_TYPES, RejectReason.UNKNOWN_TYPE, "unknown event type code"))
    reasons.append((batch.source >= len(SOURCES), RejectReason.SCHEMA, "unknown source code"))
    reasons.append(
        (
            (batch.ts < policy.min_ts_ms) | (batch.ts > latest),
            RejectReason.BAD_TIMESTAMP,
            "event time too far in the future or too old",
        )
    )
    reasons.append(
        (
            np.abs(batch.value) > MAX_ABS_VALUE,  # False for NaN: no value
            RejectReason.BAD_VALUE,
            f"value must be finite and at most {MAX_ABS_VALUE:.0e} in magnitude",
        )
    )
    reasons.append((_bad_ids(batch.user_id), RejectReason.MISSING_USER, "user_id empty or long"))
    reasons.append(
        (_bad_ids(batch.event_id), RejectReason.MISSING_EVENT_ID, "event_id empty or long")
    )
    # What pydantic checks on JSON input, for batches that never were JSON events
    # (a hand-made wire message, an SDK batch).
    reasons.append(
        (_bad_optional(batch.item_id, MAX_ID_LENGTH), RejectReason.SCHEMA, "item_id empty or long")
    )
    reasons.append(
        (
            _bad_optional(batch.category, MAX_CATEGORY_LENGTH),
            RejectReason.SCHEMA,
            "category empty or long",
        )
    )
    for name, column in (("traits", batch.traits), ("properties", batch.properties)):
        detail = f"{name} must map at most {MAX_MAP_KEYS} short keys to short scalars"
        reasons.append((_bad_maps(column), RejectReason.SCHEMA, detail))
    bad = np.zeros(n, dtype=bool)
    for mask, _, _ in reasons:
        bad |= mask
    if not bad.any():
        return Checked(batch, [])
    rejected = []
    for i in np.flatnonzero(bad).tolist():
        reason, detail = next((r, d) for mask, r, d in reasons if mask[i])
        rejected.append(Rejection(i, reason, detail, row_bytes(batch, i)))
    return Checked(batch.take(np.flatnonzero(~bad)), rejected)


def _clean(batch: EventBatch, policy: ValidationPolicy, latest: int) -> bool:
    """Whether no row of ``batch`` breaks a rule (then no per-rule mask is needed)."""
    return (
        int(batch.type.max()) < N_TYPES
        and int(batch.source.max()) < len(SOURCES)
        and int(batch.ts.min()) >= policy.min_ts_ms
        and int(batch.ts.max()) <= latest
        and not bool((np.abs(batch.value) > MAX_ABS_VALUE).any())
        and not _bad_ids(batch.user_id).any()
        and not _bad_ids(batch.event_id).any()
        and not _bad_optional(batch.item_id, MAX_ID_LENGTH).any()
        and not _bad_optional(batch.category, MAX_CATEGORY_LENGTH).any()
        and not any(batch.traits)
        and not any(batch.properties)
    )


def _bad_ids(ids: list[str]) -> np.ndarray:
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    return (lengths == 0) | (lengths > MAX_ID_LENGTH)


def _bad_optional(column: list[str | None], limit: int) -> np.ndarray:
    """Rows whose optional string is empty or longer than ``limit`` (None is fine)."""
    bad = np.zeros(len(column), dtype=bool)
    if "" not in column and max(map(len, filter(None, column)), default=0) <= limit:
        return bad  # the common case, at C speed
    for i, text in enumerate(column):
        bad[i] = text is not None and not 0 < len(text) <= limit
    return bad


def _bad_maps(column: list[Any]) -> np.ndarray:
    """Rows whose traits or properties are not a small map of short scalars (None is fine)."""
    bad = np.zeros(len(column), dtype=bool)
    for i in compress(range(len(column)), column):  # only the rows that carry a map
        bad[i] = not _scalar_map(column[i])
    return bad


def _scalar_map(mapping: Any) -> bool:
    if type(mapping) is not dict or len(mapping) > MAX_MAP_KEYS:
        return False
    for key, value in mapping.items():
        if type(key) is not str or len(key) > MAX_CATEGORY_LENGTH:
            return False
        kind = type(value)
        if kind is str:
            if len(value) > MAX_STRING_VALUE:
                return False
        elif kind is int:
            if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
                return False
        elif kind is float:
            if not math.isfinite(value):
                return False
        elif kind is not bool and value is not None:
            return False
    return True


def row_bytes(batch: EventBatch, i: int) -> bytes:
    """Row ``i`` as JSON; a map that orjson cannot write (a hand-made batch) is replaced."""
    row = batch.event_dict(i)
    try:
        return orjson.dumps(row)
    except TypeError:
        for name in ("traits", "properties"):
            if name in row:
                row[name] = _UNWRITABLE
        return orjson.dumps(row)


def _whole(raw: bytes, reason: RejectReason, detail: str, policy: ValidationPolicy) -> Rejection:
    """A rejection of a whole body, keeping as much of it as a dead letter can hold."""
    if len(raw) > policy.max_dead_letter_bytes:
        detail = (
            f"{detail} (body of {len(raw)} bytes, the first {policy.max_dead_letter_bytes} kept)"
        )
        raw = raw[: policy.max_dead_letter_bytes]
    return Rejection(-1, reason, detail, raw)


_FIELD_REASONS = {
    "type": RejectReason.UNKNOWN_TYPE,
    "user_id": RejectReason.MISSING_USER,
    "event_id": RejectReason.MISSING_EVENT_ID,
    "ts": RejectReason.BAD_TIMESTAMP,
    "value": RejectReason.BAD_VALUE,
}


def _explain(exc: ValidationError) -> tuple[RejectReason, str]:
    """The reason for the first error of one event, and a readable detail."""
    error = exc.errors(include_url=False)[0]
    field = str(error["loc"][0]) if error["loc"] else ""
    detail = f"{field}: {error['msg']}" if field else error["msg"]
    if error["type"] == "extra_forbidden":
        return RejectReason.UNKNOWN_FIELD, detail
    return _FIELD_REASONS.get(field, RejectReason.SCHEMA), detail
