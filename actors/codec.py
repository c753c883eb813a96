"""The wire format: many events per NATS message, as JSON columns.

One message body is an orjson document ``{"v": 1, "e": [...], "u": [...], ...}``
with one array per field. Columns compress the repeated keys of row-wise JSON
away and decode straight into an :class:`EventBatch`, so a consumer pays per
message, not per event, for everything but the strings themselves.

:func:`decode` checks structure only (it raises :class:`WireError` for bodies
that are not this format); row-level rules live in :mod:`actors.validation`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from actors.batch import EventBatch
from actors.errors import WireError

WIRE_VERSION = 1
CONTENT_TYPE = "application/x-audience-columns+json; v=1"

_STRING_COLUMNS = ("e", "u")
_OPTIONAL_STRING_COLUMNS = ("i", "c")
_NUMBER_COLUMNS = ("t", "ts", "x", "s")
_MAP_COLUMNS = ("tr", "p")


def encode(batch: EventBatch) -> bytes:
    """Serialise ``batch`` into one message body."""
    doc: dict[str, Any] = {
        "v": WIRE_VERSION,
        "e": batch.event_id,
        "u": batch.user_id,
        "t": batch.type,
        "ts": batch.ts,
        "i": batch.item_id,
        "c": batch.category,
        "x": batch.value,  # orjson writes NaN as null
        "s": batch.source,
    }
    if any(t is not None for t in batch.traits):
        doc["tr"] = batch.traits
    if any(p is not None for p in batch.properties):
        doc["p"] = batch.properties
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def decode(body: bytes) -> EventBatch:
    """Parse one message body; raise :class:`WireError` if it is not the wire format."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise WireError("bad_wire", f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != WIRE_VERSION:
        raise WireError("bad_wire", f"expected an object with v={WIRE_VERSION}")
    unknown = set(doc) - {"v", *_STRING_COLUMNS, *_OPTIONAL_STRING_COLUMNS, *_NUMBER_COLUMNS}
    unknown -= set(_MAP_COLUMNS)
    if unknown:
        raise WireError("bad_wire", f"unknown columns {sorted(unknown)}")
    n = _length(doc)
    for name in _STRING_COLUMNS:
        if not _types(doc[name]) <= {str}:
            raise WireError("bad_wire", f"column {name!r} must hold strings")
    for name in _OPTIONAL_STRING_COLUMNS:
        if not _types(doc[name]) <= {str, type(None)}:
            raise WireError("bad_wire", f"column {name!r} must hold strings or null")
    maps: dict[str, list[Any]] = {}
    for name in _MAP_COLUMNS:
        column = doc.get(name)
        if column is None:
            maps[name] = [None] * n
            continue
        if not isinstance(column, list) or len(column) != n:
            raise WireError("bad_wire", f"column {name!r} must hold {n} objects or null")
        if not _types(column) <= {dict, type(None)}:
            raise WireError("bad_wire", f"column {name!r} must hold {n} objects or null")
        maps[name] = column
    # numpy would read "1.5", "inf" or true as numbers too: only JSON numbers are.
    if not _types(doc["x"]) <= {int, float, type(None)}:
        raise WireError("bad_wire", "column 'x' must hold numbers or null")
    try:
        types = _ints(doc["t"], np.uint8)
        sources = _ints(doc["s"], np.uint8)
        ts = _ints(doc["ts"], np.int64)
        values = np.array(doc["x"], dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError("bad_wire", f"numeric column: {exc}") from None
    return EventBatch(
        event_id=doc["e"],
        user_id=doc["u"],
        type=types,
        ts=ts,
        item_id=doc["i"],
        category=doc["c"],
        value=values,
        source=sources,
        traits=maps["tr"],
        properties=maps["p"],
    )


def _length(doc: dict[str, Any]) -> int:
    lengths = set()
    for name in (*_STRING_COLUMNS, *_OPTIONAL_STRING_COLUMNS, *_NUMBER_COLUMNS):
        column = doc.get(name)
        if not isinstance(column, list):
            raise WireError("bad_wire", f"column {name!r} missing or not an array")
        lengths.add(len(column))
    if len(lengths) != 1:
        raise WireError("bad_wire", f"columns differ in length: {sorted(lengths)}")
    return lengths.pop()


def _types(column: list[Any]) -> set[type]:
    """The types present in a column (C-speed, unlike a generator over it)."""
    return set(map(type, column))


def _ints(column: list[Any], dtype: type[np.integer[Any]]) -> np.ndarray:
    """An integer column; numpy itself refuses values beyond int64 (OverflowError)."""
    if not _types(column) <= {int}:
        raise TypeError("integers expected")
    info = np.iinfo(dtype)
    # Python's min/max beat two numpy reductions on the short columns of small messages.
    if column and dtype is not np.int64 and (min(column) < info.min or max(column) > info.max):
        raise ValueError(f"out of range for {np.dtype(dtype).name}")
    return np.array(column, dtype=dtype)
