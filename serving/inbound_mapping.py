"""A vendor's delivery to the platform's events, through its source's field mapping.

:func:`map_delivery` turns the parsed body of a verified delivery into
event-shaped dicts (which then go through the platform's own validation, like
any ``POST /v1/events`` body) and a :class:`~actors.validation.Rejection` per
item it cannot map, with the reason that names its dead-letter subject. Bad
items are data, not exceptions: only a body with no list of items at all
raises :class:`UnusableDelivery`.

Event ids are deterministic per delivery item: ``wh.<source>.<vendor id>`` when
the mapping names the vendor's id, else ``wh.<source>.<digest of the body>.<position>``.
A delivery replayed or retried with the same body (even re-signed at another
time) gives the same ids, so the shards' event-id de-duplication drops it
whichever API replica took it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson

from actors.events import MAX_ID_LENGTH, MAX_STRING_VALUE, EventType, Source
from actors.validation import Rejection, RejectReason, ValidationPolicy
from serving.inbound_config import SOURCE_PROPERTY, SourceConfig, TimeFormat

_MISSING = object()


class UnusableDelivery(ValueError):
    """The body holds no list of items where the source's mapping says it is."""


@dataclass
class Mapped:
    """The events mapped from one delivery, and the items that could not be.

    Attributes:
        events: event-shaped dicts, ready for :func:`~actors.validation.parse_events`.
        positions: the delivery item each event came from.
        rejected: one per unmappable item, indexed by item position.
        skipped: items left out on purpose (an unknown vendor event name, ``skip`` policy).
        items: how many items the delivery held.
    """

    events: list[dict[str, Any]] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    skipped: int = 0
    items: int = 0


class _Unmappable(Exception):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def lookup(doc: Any, path: str) -> Any:
    """The value at ``path`` in ``doc``, or :data:`_MISSING`.

    ``path`` is dotted (``data.items.0.id``: a number indexes a list) or a JSON
    pointer (``/data/items/0/id``, ``~1`` for ``/`` and ``~0`` for ``~`` in keys).
    """
    if path.startswith("/"):
        parts = [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]
    else:
        parts = path.split(".")
    node = doc
    for part in parts:
        if isinstance(node, dict):
            node = node.get(part, _MISSING)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
        if node is _MISSING:
            return node
    return node


def items_of(source: SourceConfig, doc: Any) -> list[Any]:
    """The delivery's items: the list at the source's ``items`` path (or the body).

    Raises:
        UnusableDelivery: nothing, or no list or object, is where the items should be.
    """
    found = doc if source.items is None else lookup(doc, source.items)
    if isinstance(found, list):
        return found
    if isinstance(found, dict):
        return [found]
    where = "the body" if source.items is None else f"{source.items!r}"
    what = "nothing" if found is _MISSING else type(found).__name__
    raise UnusableDelivery(f"expected a list of items (or one object) at {where}, found {what}")


def parse_time(value: Any, fmt: TimeFormat) -> int:
    """Epoch milliseconds of a vendor time written in ``fmt``.

    Raises:
        ValueError: not a time in that format (or out of any sane range).
    """
    if fmt is TimeFormat.ISO:
        if not isinstance(value, str):
            raise ValueError(f"expected an RFC 3339 string, got {type(value).__name__}")
        parsed = datetime.fromisoformat(value)
        if parsed.utcoffset() is None:
            raise ValueError(f"{value[:64]!r} has no timezone")
        return int(parsed.timestamp() * 1000)
    number = _number(value)
    if number is None:
        raise ValueError(f"expected a number of {fmt.value}, got {_short(value)}")
    ms = number * 1000 if fmt is TimeFormat.EPOCH_S else number
    if not -1e15 < ms < 1e15:  # about 31,700 years either side of 1970
        raise ValueError(f"{_short(value)} is out of range for {fmt.value}")
    return int(ms)


def iso_of(ms: int) -> str:
    """RFC 3339 UTC with milliseconds, as the event contract takes it.

    Raises:
        ValueError: beyond the years a datetime holds.
    """
    try:
        stamp = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    except (OverflowError, OSError) as exc:
        raise ValueError(f"{ms} ms is out of range") from exc
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def map_delivery(
    name: str,
    source: SourceConfig,
    items: list[Any],
    body_digest: str,
    sent_ms: int,
    policy: ValidationPolicy,
) -> Mapped:
    """Map each item of a verified delivery; never raises for a bad item.

    Args:
        name: the source's name (event-id prefix and the ``webhook`` property).
        source: its configuration.
        items: the delivery's items (see :func:`items_of`).
        body_digest: a digest of the raw body, for derived event ids.
        sent_ms: the delivery's send time, the event time of items without one.
        policy: validation limits (the dead letter of an item keeps its first bytes).
    """
    mapped = Mapped(items=len(items))
    for index, item in enumerate(items):
        try:
            event = _map_item(name, source, item, index, body_digest, sent_ms)
        except _Unmappable as exc:
            raw = _item_bytes(item)[: policy.max_dead_letter_bytes]
            detail = f"webhook {name} item {index}: {exc.detail}"
            mapped.rejected.append(Rejection(index, exc.reason, detail, raw))
            continue
        if event is None:
            mapped.skipped += 1
            continue
        mapped.events.append(event)
        mapped.positions.append(index)
    return mapped


def _map_item(
    name: str, source: SourceConfig, item: Any, index: int, body_digest: str, sent_ms: int
) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        raise _Unmappable(RejectReason.SCHEMA, f"expected an object, got {type(item).__name__}")
    fields = source.fields
    event_type = _event_type(source, item)
    if event_type is None:
        return None
    user = _identifier(item, fields.user_id)
    if user is None:
        detail = f"no user id at {fields.user_id!r} (a string or integer, 1-{MAX_ID_LENGTH} chars)"
        raise _Unmappable(RejectReason.MISSING_USER, detail)
    event: dict[str, Any] = {
        "event_id": _event_id(name, source, item, index, body_digest),
        "user_id": user,
        "type": event_type.value,
        "ts": iso_of(_event_ms(source, item, sent_ms)),
        "source": Source.WEBHOOK.value,
    }
    for key, path in (("item_id", fields.item_id), ("category", fields.category)):
        if path is not None and (found := _identifier(item, path)) is not None:
            event[key] = found
    if fields.value is not None and (found := lookup(item, fields.value)) not in (_MISSING, None):
        number = _number(found)
        if number is None or not math.isfinite(number):
            raise _Unmappable(RejectReason.BAD_VALUE, f"value {_short(found)} is no finite number")
        event["value"] = number
    properties = _scalars(item, fields.properties)
    properties[SOURCE_PROPERTY] = name
    event["properties"] = properties
    if fields.traits:
        event["traits"] = _scalars(item, fields.traits)
    return event


def _event_type(source: SourceConfig, item: dict[str, Any]) -> EventType | None:
    """The item's event type; None to skip it. Raises _Unmappable for an unknown name."""
    path = source.fields.type
    vendor = None if path is None else lookup(item, path)
    if vendor is None or vendor is _MISSING:
        if source.default_type is not None:
            return source.default_type
        raise _Unmappable(RejectReason.UNKNOWN_TYPE, f"no event name at {path!r}")
    text = vendor if isinstance(vendor, str) else orjson.dumps(vendor).decode()
    if source.event_types:
        found = source.event_types.get(text)
    else:
        found = next((t for t in EventType if t.value == text), None)
    if found is not None:
        return found
    if source.default_type is not None:
        return source.default_type
    if source.unknown_types == "skip":
        return None
    raise _Unmappable(RejectReason.UNKNOWN_TYPE, f"event name {_short(vendor)} maps to no type")


def _event_id(
    name: str, source: SourceConfig, item: dict[str, Any], index: int, body_digest: str
) -> str:
    path = source.fields.event_id
    if path is None:
        return f"wh.{name}.{body_digest}.{index}"
    vendor = _identifier(item, path, limit=None)
    if vendor is None:
        raise _Unmappable(RejectReason.MISSING_EVENT_ID, f"no id (string or integer) at {path!r}")
    event_id = f"wh.{name}.{vendor}"
    if len(event_id) > MAX_ID_LENGTH:  # still deterministic, and within the contract
        digest = hashlib.blake2b(vendor.encode(), digest_size=16).hexdigest()
        event_id = f"wh.{name}.h.{digest}"
    return event_id


def _event_ms(source: SourceConfig, item: dict[str, Any], sent_ms: int) -> int:
    path = source.fields.ts
    if path is None:
        return sent_ms
    found = lookup(item, path)
    if found is _MISSING or found is None:
        raise _Unmappable(RejectReason.BAD_TIMESTAMP, f"no event time at {path!r}")
    try:
        ms = parse_time(found, source.ts_format)
        iso_of(ms)
    except ValueError as exc:
        raise _Unmappable(RejectReason.BAD_TIMESTAMP, f"{path}: {exc}") from None
    return ms


def _identifier(item: dict[str, Any], path: str, limit: int | None = MAX_ID_LENGTH) -> str | None:
    """A string or integer at ``path`` as a non-empty string (None: absent or of another type)."""
    found = lookup(item, path)
    if isinstance(found, bool) or not isinstance(found, str | int):
        return None
    text = str(found)
    if not text or (limit is not None and len(text) > limit):
        return None
    return text


def _number(value: Any) -> float | None:
    """An int, float or numeric string as a float (vendors often send amounts as strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and len(value) <= 64:
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _scalars(item: dict[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    """The scalars at ``paths`` (other values left out), strings cut to the contract's limit."""
    out: dict[str, Any] = {}
    for key, path in paths.items():
        found = lookup(item, path)
        if isinstance(found, str):
            out[key] = found[:MAX_STRING_VALUE]
        elif isinstance(found, float) and not math.isfinite(found):
            continue
        elif found is None or isinstance(found, bool | int | float):
            out[key] = found
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _item_bytes(item: Any) -> bytes:
    try:
        return orjson.dumps(item)
    except TypeError:  # orjson reads 1024 levels of nesting but writes only 254
        return b'"<nested too deeply>"'
