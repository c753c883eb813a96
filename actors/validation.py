"""Accept or reject events, each rejection with a reason that names a dead-letter subject.

Two entry points share one set of rules:

* :func:`parse_events` for JSON arrays from the outside (HTTP, SDK): a pydantic
  ``TypeAdapter`` over the whole batch, falling back to per-event errors only
  when something is wrong;
* :func:`check_batch` for columnar batches (simulator, replay, and every batch a
  shard consumes, since anyone with publish rights could write to the stream):
  the row rules pydantic cannot express (time window) plus the ones a
  hand-made wire batch could break (codes, empty ids).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import orjson
from pydantic import TypeAdapter, ValidationError

from actors.batch import EventBatch
from actors.events import MAX_ID_LENGTH, N_TYPES, SOURCES, Event

_BATCH_ADAPTER: TypeAdapter[list[Event]] = TypeAdapter(list[Event])

DAY_MS = 86_400_000


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


@dataclass(frozen=True)
class ValidationPolicy:
    """Limits that are settings rather than schema.

    Attributes:
        max_future_ms: how far ahead of the wall clock an event time may be.
        min_ts_ms: the oldest event time accepted (default 1990-01-01, so that
            historical replays such as MovieLens pass).
        max_event_bytes: the largest single event, as JSON.
    """

    max_future_ms: int = DAY_MS
    min_ts_ms: int = 631_152_000_000
    max_event_bytes: int = 16_384


@dataclass(frozen=True)
class Rejection:
    """One refused event: its position in the input, why, and its original bytes."""

    index: int
    reason: RejectReason
    detail: str
    raw: bytes


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
    rejection at index -1 holding the whole body.
    """
    try:
        events = _BATCH_ADAPTER.validate_json(raw)
        return check_batch(EventBatch.from_events(events), policy, at_ms)
    except ValidationError:
        pass
    try:
        items = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Checked(EventBatch.empty(), [_whole(raw, RejectReason.INVALID_JSON, str(exc))])
    if not isinstance(items, list):
        return Checked(EventBatch.empty(), [_whole(raw, RejectReason.SCHEMA, "expected an array")])
    return parse_items(items, policy, at_ms)


def parse_items(items: list[Any], policy: ValidationPolicy, at_ms: int | None = None) -> Checked:
    """Validate already-parsed JSON values one by one, keeping input positions."""
    rejected: list[Rejection] = []
    good: list[Event] = []
    positions: list[int] = []
    for index, item in enumerate(items):
        raw = orjson.dumps(item)
        if len(raw) > policy.max_event_bytes:
            detail = f"{len(raw)} bytes > {policy.max_event_bytes}"
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
    reasons: list[tuple[np.ndarray, RejectReason, str]] = []
    latest = (now_ms() if at_ms is None else at_ms) + policy.max_future_ms
    reasons.append((batch.type >= N_TYPES, RejectReason.UNKNOWN_TYPE, "unknown event type code"))
    reasons.append((batch.source >= len(SOURCES), RejectReason.SCHEMA, "unknown source code"))
    reasons.append(
        (
            (batch.ts < policy.min_ts_ms) | (batch.ts > latest),
            RejectReason.BAD_TIMESTAMP,
            "event time too far in the future or too old",
        )
    )
    reasons.append((np.isinf(batch.value), RejectReason.BAD_VALUE, "value must be finite"))
    reasons.append((_bad_ids(batch.user_id), RejectReason.MISSING_USER, "user_id empty or long"))
    reasons.append(
        (_bad_ids(batch.event_id), RejectReason.MISSING_EVENT_ID, "event_id empty or long")
    )
    bad = np.zeros(n, dtype=bool)
    for mask, _, _ in reasons:
        bad |= mask
    if not bad.any():
        return Checked(batch, [])
    rejected = []
    for i in np.flatnonzero(bad).tolist():
        reason, detail = next((r, d) for mask, r, d in reasons if mask[i])
        rejected.append(Rejection(i, reason, detail, orjson.dumps(batch.event_dict(i))))
    return Checked(batch.take(np.flatnonzero(~bad)), rejected)


def _bad_ids(ids: list[str]) -> np.ndarray:
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    return (lengths == 0) | (lengths > MAX_ID_LENGTH)


def _whole(raw: bytes, reason: RejectReason, detail: str) -> Rejection:
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
