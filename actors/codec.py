"""The wire format: many events per NATS message, as columns.

Version 2 (what :func:`encode` writes): a 12-byte header (magic, event count,
JSON length), an orjson document of the string and map columns
``{"e": [...], "u": [...], "i": [...], "c": [...]}`` (plus ``"tr"``, ``"p"``
when any event has traits or properties), padding to 8 bytes, then the number
columns as little-endian arrays: ``ts`` int64, ``value`` float64 (NaN: none),
``type`` and ``source`` uint8. Strings stay JSON (orjson makes Python strings
faster than anything else); numbers are read with ``np.frombuffer``, with no
per-number Python object. Version 1 (one JSON document ``{"v": 1, ...}`` with
every column as a JSON array) is still read, for streams written before.

:func:`decode` checks structure only (it raises :class:`WireError` for bodies
that are not this format); row-level rules live in :mod:`actors.validation`.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson

from actors.batch import EventBatch
from actors.errors import WireError

WIRE_VERSION = 2
CONTENT_TYPE = "application/x-audience-columns; v=2"
_MAGIC = b"\x00AU2"  # no JSON document starts with a NUL: tells v2 from v1
_HEADER = struct.Struct("<4sII")  # magic, events, JSON length
_NUMBERS = (("ts", "<i8"), ("x", "<f8"), ("t", "u1"), ("s", "u1"))  # in body order
_NUMBER_BYTES = sum(np.dtype(d).itemsize for _, d in _NUMBERS)

_STRING_COLUMNS = ("e", "u")
_OPTIONAL_STRING_COLUMNS = ("i", "c")
_NUMBER_COLUMNS = ("t", "ts", "x", "s")
_MAP_COLUMNS = ("tr", "p")


def encode(batch: EventBatch) -> bytes:
    """Serialise ``batch`` into one message body (version 2)."""
    doc: dict[str, Any] = {
        "e": batch.event_id,
        "u": batch.user_id,
        "i": batch.item_id,
        "c": batch.category,
    }
    if any(t is not None for t in batch.traits):
        doc["tr"] = batch.traits
    if any(p is not None for p in batch.properties):
        doc["p"] = batch.properties
    strings = orjson.dumps(doc)
    pad = -(_HEADER.size + len(strings)) % 8
    columns = {"ts": batch.ts, "x": batch.value, "t": batch.type, "s": batch.source}
    numbers = [np.ascontiguousarray(columns[name], dtype=d).tobytes() for name, d in _NUMBERS]
    head = _HEADER.pack(_MAGIC, len(batch), len(strings))
    return b"".join([head, strings, b"\0" * pad, *numbers])


def decode(body: bytes) -> EventBatch:
    """Parse one message body; raise :class:`WireError` if it is not the wire format."""
    if body[:4] == _MAGIC:
        return _decode_v2(body)
    return _decode_v1(body)


def _decode_v2(body: bytes) -> EventBatch:
    if len(body) < _HEADER.size:
        raise WireError("bad_wire", "truncated header")
    _, n, length = _HEADER.unpack_from(body)
    start = _HEADER.size + length
    start += -start % 8
    if len(body) != start + n * _NUMBER_BYTES:
        raise WireError("bad_wire", f"{len(body)} bytes do not hold {n} events")
    try:
        doc = orjson.loads(memoryview(body)[_HEADER.size : _HEADER.size + length])
    except orjson.JSONDecodeError as exc:
        raise WireError("bad_wire", f"string columns are not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise WireError("bad_wire", "string columns must be an object")
    unknown = set(doc) - {*_STRING_COLUMNS, *_OPTIONAL_STRING_COLUMNS, *_MAP_COLUMNS}
    if unknown:
        raise WireError("bad_wire", f"unknown columns {sorted(unknown)}")
    for name in (*_STRING_COLUMNS, *_OPTIONAL_STRING_COLUMNS):
        if not isinstance(doc.get(name), list) or len(doc[name]) != n:
            raise WireError("bad_wire", f"column {name!r} must hold {n} values")
    _check_strings(doc)
    maps = _maps(doc, n)
    numbers = {}
    for name, dtype in _NUMBERS:
        size = np.dtype(dtype).itemsize * n
        numbers[name] = np.frombuffer(body, dtype=dtype, count=n, offset=start).copy()
        start += size
    return EventBatch(
        event_id=doc["e"],
        user_id=doc["u"],
        type=numbers["t"],
        ts=numbers["ts"].astype(np.int64, copy=False),
        item_id=doc["i"],
        category=doc["c"],
        value=numbers["x"].astype(np.float64, copy=False),
        source=numbers["s"],
        traits=maps["tr"],
        properties=maps["p"],
    )


def _decode_v1(body: bytes) -> EventBatch:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise WireError("bad_wire", f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise WireError("bad_wire", "expected an object with v=1, or a version 2 body")
    unknown = set(doc) - {"v", *_STRING_COLUMNS, *_OPTIONAL_STRING_COLUMNS, *_NUMBER_COLUMNS}
    unknown -= set(_MAP_COLUMNS)
    if unknown:
        raise WireError("bad_wire", f"unknown columns {sorted(unknown)}")
    n = _length(doc)
    _check_strings(doc)
    maps = _maps(doc, n)
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


def _check_strings(doc: dict[str, Any]) -> None:
    for name in _STRING_COLUMNS:
        if not _types(doc[name]) <= {str}:
            raise WireError("bad_wire", f"column {name!r} must hold strings")
    for name in _OPTIONAL_STRING_COLUMNS:
        if not _types(doc[name]) <= {str, type(None)}:
            raise WireError("bad_wire", f"column {name!r} must hold strings or null")


def _maps(doc: dict[str, Any], n: int) -> dict[str, list[Any]]:
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
    return maps


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
