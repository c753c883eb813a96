"""Hypothesis strategies for wrong input, each case with the verdict it must get.

Two shapes of input reach the platform: JSON event arrays (HTTP, SDK) and wire
batches (a NATS message a shard consumes). The strategies here start from
something valid and break it in one known way, so a test checks not only that
nothing crashes but that each event gets the reason it deserves.

Good events are stamped in 2022 (no other test of the shared integration
platform uses that year, and it is well inside the accepted time window), their
users start with ``fuzz-``, and their ids are :data:`FRESH_ID`, which a test
replaces with unique ids before sending.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import orjson
from hypothesis import strategies as st

from actors.batch import EventBatch
from actors.codec import encode
from actors.events import (
    MAX_CATEGORY_LENGTH,
    MAX_ID_LENGTH,
    MAX_MAP_KEYS,
    MAX_STRING_VALUE,
    N_TYPES,
    SOURCES,
    EventType,
    Source,
)
from actors.validation import MAX_ABS_VALUE, RejectReason

FRESH_ID = "fuzz-fresh-id"  # stands for a unique event id the test fills in
GOOD_FROM = datetime(2022, 1, 1)
GOOD_TO = datetime(2022, 12, 31)
GOOD_FROM_MS = int(GOOD_FROM.replace(tzinfo=timezone.utc).timestamp() * 1000)
GOOD_TO_MS = int(GOOD_TO.replace(tzinfo=timezone.utc).timestamp() * 1000)
ANCIENT_BEFORE_MS = 631_152_000_000 - 1  # the policy's floor is 1990-01-01
FUTURE_AFTER_MS = 1_893_456_000_000  # 2030-01-01: far beyond now + a day
FIELDS = (
    "event_id",
    "user_id",
    "type",
    "ts",
    "item_id",
    "category",
    "value",
    "source",
    "traits",
    "properties",
)
DELETE = object()  # as a mutated field's value: remove the field
_DEEP = "\x00deep\x00"  # placeholder replaced by deeply nested arrays in the body
_TOKEN = "\x00token\x00"  # placeholder replaced by a raw token that is not JSON
BAD_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80", b"\xf8\x88\x80\x80\x80")

# Text without lone surrogates: what valid JSON (UTF-8) can carry.
text = st.text(st.characters(codec="utf-8"), max_size=24)
short_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=16)
finite = st.floats(allow_nan=False, allow_infinity=False)
big_int = st.integers(min_value=-(10**30), max_value=10**30)  # beyond 64 bits, still finite
good_value = st.floats(-MAX_ABS_VALUE, MAX_ABS_VALUE) | st.integers(-(10**12), 10**12)
huge_value = st.one_of(
    st.floats(MAX_ABS_VALUE, exclude_min=True, allow_infinity=False),
    st.floats(max_value=-MAX_ABS_VALUE, exclude_max=True, allow_infinity=False),
    st.integers(10**12 + 1, 10**30),
    st.integers(-(10**30), -(10**12) - 1),
)
scalar = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | finite | text
json_value = st.recursive(
    st.none() | st.booleans() | big_int | finite | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
scalar_map = st.dictionaries(short_text, scalar, max_size=5)  # what a batch can carry
# In JSON, integers beyond 64 bits too: orjson reads them as floats.
json_scalar_map = st.dictionaries(short_text, scalar | big_int, max_size=5)


def _iso(moment: datetime, offset_min: int) -> str:
    """``moment`` (UTC) in RFC 3339 at a UTC offset of ``offset_min`` minutes."""
    zone = timezone(timedelta(minutes=offset_min))
    return moment.replace(tzinfo=timezone.utc).astimezone(zone).isoformat()


def _times(low: datetime, high: datetime) -> st.SearchStrategy[str]:
    return st.builds(_iso, st.datetimes(low, high), st.sampled_from([0, 330, -480]))


good_ts = _times(GOOD_FROM, GOOD_TO)
ancient_ts = st.builds(
    lambda m: m.replace(tzinfo=timezone.utc).isoformat(),
    st.datetimes(datetime(1, 1, 2), datetime(1989, 12, 30)),
)
future_ts = st.builds(
    lambda m: m.replace(tzinfo=timezone.utc).isoformat(),
    st.datetimes(datetime(2030, 1, 1), datetime(9999, 12, 30)),
)


@st.composite
def good_events(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event of a ``fuzz-`` user in 2022, with a random set of optional fields."""
    event: dict[str, Any] = {
        "event_id": FRESH_ID,
        "user_id": "fuzz-" + draw(short_text),
        "type": draw(st.sampled_from([t.value for t in EventType])),
        "ts": draw(good_ts),
    }
    optional: dict[str, st.SearchStrategy[Any]] = {
        "item_id": short_text.map(lambda s: "fuzz-item-" + s),
        "category": short_text,
        "value": good_value,
        "source": st.sampled_from([s.value for s in Source]),
        "traits": json_scalar_map,
        "properties": json_scalar_map,
    }
    for name in draw(st.lists(st.sampled_from(list(optional)), unique=True)):
        event[name] = draw(optional[name])
    return event


def _too_long(limit: int) -> st.SearchStrategy[str]:
    return st.integers(limit + 1, limit + 40).map(lambda n: "x" * n)


_BY_KIND: dict[type, st.SearchStrategy[Any]] = {
    type(None): st.none(),
    bool: st.booleans(),
    int: big_int,
    float: finite,
    str: text,
    list: st.lists(json_value, max_size=4),
    dict: st.dictionaries(text, json_value, max_size=4),
}


def _other_than(*kinds: type) -> st.SearchStrategy[Any]:
    """JSON values of none of ``kinds`` (bool counts as int, as in Python)."""
    return st.one_of([values for kind, values in _BY_KIND.items() if not issubclass(kind, kinds)])


def _bad_dicts() -> st.SearchStrategy[dict[str, Any]]:
    """Objects that are no small map of short scalars: nested, too many keys, long strings."""
    nested = st.lists(json_value, max_size=3) | st.dictionaries(text, json_value, max_size=3)
    return st.one_of(
        st.dictionaries(short_text, nested, min_size=1, max_size=3),
        st.integers(MAX_MAP_KEYS + 1, MAX_MAP_KEYS + 8).map(
            lambda n: {f"k{i}": i for i in range(n)}
        ),
        _too_long(MAX_CATEGORY_LENGTH).map(lambda k: {k: 1}),
        _too_long(MAX_STRING_VALUE).map(lambda v: {"k": v}),
        st.just({"deep": _DEEP}),  # spliced in as 200-1000 nested arrays
    )


def _bad_maps() -> st.SearchStrategy[Any]:
    """Values for traits/properties that are not a small map of short scalars."""
    return _other_than(dict, type(None)) | _bad_dicts()


_SOURCES = {s.value for s in Source}
_TYPES = {t.value for t in EventType}

# One way to break a good event per reason: the fields it sets (DELETE removes one).
MUTATIONS: dict[RejectReason, st.SearchStrategy[dict[str, Any]]] = {
    RejectReason.UNKNOWN_TYPE: st.fixed_dictionaries(
        {"type": st.just(DELETE) | _other_than(str) | text.filter(lambda s: s not in _TYPES)}
    ),
    RejectReason.MISSING_USER: st.fixed_dictionaries(
        {"user_id": st.just(DELETE) | st.just("") | _too_long(MAX_ID_LENGTH) | _other_than(str)}
    ),
    RejectReason.MISSING_EVENT_ID: st.fixed_dictionaries(
        {"event_id": st.just(DELETE) | st.just("") | _too_long(MAX_ID_LENGTH) | _other_than(str)}
    ),
    RejectReason.BAD_TIMESTAMP: st.fixed_dictionaries(
        {
            "ts": st.one_of(
                st.just(DELETE),
                ancient_ts,
                future_ts,
                good_ts.map(lambda s: s[:19]),  # no timezone
                text.map(lambda s: "not a time " + s),
                _other_than(str),
            )
        }
    ),
    RejectReason.BAD_VALUE: st.fixed_dictionaries(
        {"value": st.booleans() | _other_than(int, float, type(None)) | huge_value}
    ),
    RejectReason.UNKNOWN_FIELD: st.dictionaries(
        text.filter(lambda k: k not in FIELDS), json_value, min_size=1, max_size=1
    ),
    RejectReason.SCHEMA: st.one_of(
        st.fixed_dictionaries(
            {"source": _other_than(str) | text.filter(lambda s: s not in _SOURCES)}
        ),
        st.fixed_dictionaries(
            {"item_id": st.just("") | _too_long(MAX_ID_LENGTH) | _other_than(str, type(None))}
        ),
        st.fixed_dictionaries(
            {
                "category": st.just("")
                | _too_long(MAX_CATEGORY_LENGTH)
                | _other_than(str, type(None))
            }
        ),
        st.fixed_dictionaries({"properties": _bad_maps()}),
        st.fixed_dictionaries({"traits": _bad_maps()}),
    ),
    RejectReason.OVERSIZED: st.just(
        {
            "properties": {f"p{i}": "x" * MAX_STRING_VALUE for i in range(MAX_MAP_KEYS)},
            "traits": {f"t{i}": "y" * MAX_STRING_VALUE for i in range(MAX_MAP_KEYS)},
        }
    ),
}


@st.composite
def bad_events(draw: st.DrawFn) -> tuple[Any, RejectReason]:
    """An event broken in one way, and the reason it must be rejected for."""
    reason = draw(st.sampled_from(list(MUTATIONS)))
    event = draw(good_events())
    for name, value in draw(MUTATIONS[reason]).items():
        if value is DELETE:
            event.pop(name, None)
        else:
            event[name] = value
    return event, reason


not_an_object = _other_than(dict).map(lambda v: (v, RejectReason.SCHEMA))
deep_item = st.just((_DEEP, RejectReason.SCHEMA))  # spliced in as 200-1000 nested arrays


@st.composite
def event_items(draw: st.DrawFn, max_size: int = 12) -> list[tuple[Any, RejectReason | None]]:
    """A list of (JSON item, expected reason or None for accepted)."""
    good = good_events().map(lambda e: (e, None))
    item = st.one_of(good, good, bad_events(), not_an_object, deep_item)
    return draw(st.lists(item, max_size=max_size))


@dataclass(frozen=True)
class Body:
    """A request body and what must come of it.

    Attributes:
        raw: the bytes to send.
        expected: per item of a JSON event array, None (accepted) or its reason;
            None when the body is no event array.
        whole: the one reason of a body that is no event array (index -1), or
            None where either outcome is fine (arbitrary bytes).
    """

    raw: bytes
    expected: list[RejectReason | None] | None
    whole: RejectReason | None = None


def dumps(value: Any) -> bytes:
    """JSON as anyone might write it: big integers as they are, non-ASCII as UTF-8."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def _splice(raw: bytes, placeholder: str, replacement: bytes) -> bytes:
    return raw.replace(dumps(placeholder), replacement)


def with_fresh_ids(raw: bytes) -> bytes:
    """``raw`` with each :data:`FRESH_ID` replaced by a unique ``fuzz-`` event id."""
    return re.sub(re.escape(dumps(FRESH_ID)), lambda _: dumps(f"fuzz-{uuid.uuid4()}"), raw)


@st.composite
def event_array_bodies(draw: st.DrawFn, wrapped: bool = False) -> Body:
    """A JSON array of good and broken events, the verdict each must get.

    With ``wrapped``, some arrays come as ``{"events": [...]}`` (the HTTP API takes both).
    """
    pairs = draw(event_items())
    items = [item for item, _ in pairs]
    raw = dumps({"events": items} if wrapped and draw(st.booleans()) else items)
    depth = draw(st.integers(200, 1000))
    raw = _splice(raw, _DEEP, b"[" * depth + b"]" * depth)
    return Body(raw, [reason for _, reason in pairs])


@st.composite
def invalid_json_bodies(draw: st.DrawFn) -> Body:
    """An event array made invalid JSON: bad UTF-8, NaN, a lone surrogate, too deep, cut short."""
    items = [item for item, _ in draw(event_items(max_size=4))]
    how = draw(st.sampled_from(["utf8", "token", "surrogate", "too_deep", "cut"]))
    if how == "utf8":  # bad bytes at a character boundary, inside a string or between tokens
        body = dumps(items).decode("utf-8")
        at = draw(st.integers(0, len(body)))
        raw = body[:at].encode() + draw(st.sampled_from(BAD_UTF8)) + body[at:].encode()
    elif how == "cut":
        raw = dumps(items)[:-1]
    else:
        token = {
            "token": draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999"])),
            "surrogate": draw(st.sampled_from([b'"\\ud800"', b'"x\\udfff"', b'"\\ud83d"'])),
            "too_deep": b"[" * 1100 + b"]" * 1100,
        }[how]
        where = draw(st.integers(0, len(items)))
        in_value: bool = draw(st.booleans())  # as an event's value, or as an item
        if items and in_value and isinstance(items[where - 1], dict):
            items[where - 1]["value"] = _TOKEN
        else:
            items.insert(where, _TOKEN)
        raw = _splice(dumps(items), _TOKEN, token)
    raw = _splice(raw, _DEEP, b"[]")
    return Body(raw, None, RejectReason.INVALID_JSON)


not_an_array_bodies = (
    _other_than(list)
    .filter(lambda v: not (isinstance(v, dict) and set(v) == {"events"}))  # the API unwraps those
    .map(lambda v: Body(dumps(v), None, RejectReason.SCHEMA))
)
arbitrary_bodies = st.binary(max_size=200).map(lambda raw: Body(raw, None, None))


def json_bodies(wrapped: bool = False) -> st.SearchStrategy[Body]:
    """Every kind of body the JSON ingest path must take without crashing."""
    return st.one_of(
        event_array_bodies(wrapped),
        event_array_bodies(wrapped),
        invalid_json_bodies(),
        not_an_array_bodies,
        arbitrary_bodies,
    )


# --- wire batches ----------------------------------------------------------------


@st.composite
def batches(draw: st.DrawFn, valid: bool = True, max_rows: int = 6) -> EventBatch:
    """A columnar batch; ``valid`` keeps it within every row rule (2022 times, known codes)."""
    n = draw(st.integers(0 if not valid else 1, max_rows))
    ids = short_text if valid else text
    maybe = st.none() | short_text
    if valid:
        codes, sources = st.integers(0, N_TYPES - 1), st.integers(0, len(SOURCES) - 1)
        times = st.integers(GOOD_FROM_MS, GOOD_TO_MS)
    else:
        codes = sources = st.integers(0, 255)
        times = st.integers(-(2**63), 2**63 - 1)
    value = (good_value if valid else finite) | st.just(float("nan"))

    def column(strategy: st.SearchStrategy[Any]) -> list[Any]:
        return draw(st.lists(strategy, min_size=n, max_size=n))

    return EventBatch(
        event_id=column(ids),
        user_id=column(ids.map(lambda s: "fuzz-" + s)),
        type=np.array(column(codes), dtype=np.uint8),
        ts=np.array(column(times), dtype=np.int64),
        item_id=column(maybe),
        category=column(maybe),
        value=np.array(column(value), dtype=np.float64),
        source=np.array(column(sources), dtype=np.uint8),
        traits=column(st.none() | scalar_map),
        properties=column(st.none() | scalar_map),
    )


BAD_WIRE = "bad_wire"


@dataclass(frozen=True)
class WireCase:
    """A message body and what must come of it.

    Attributes:
        body: the bytes of the message.
        rows: rows of the batch it was made from.
        outcome: ``"bad_wire"`` (decode must refuse it), ``(row, reason)`` (that
            row rejected for that reason, the rest accepted), ``"ok"`` (every row
            accepted) or None (decode may refuse it; rows go either way).
    """

    body: bytes
    rows: int
    outcome: str | tuple[int, RejectReason] | None


# Per wire column, values for one cell and what they earn: a reason, "ok", or bad_wire.
_CELLS: dict[str, list[tuple[st.SearchStrategy[Any], Any]]] = {
    "t": [
        (st.integers(N_TYPES, 255), RejectReason.UNKNOWN_TYPE),
        (st.integers(256, 2**64 - 1) | st.integers(-(2**63), -1), BAD_WIRE),
        (_other_than(int) | st.booleans(), BAD_WIRE),
    ],
    "s": [
        (st.integers(len(SOURCES), 255), RejectReason.SCHEMA),
        (st.integers(256, 2**64 - 1) | st.integers(-(2**63), -1), BAD_WIRE),
        (_other_than(int) | st.booleans(), BAD_WIRE),
    ],
    "ts": [
        (st.integers(-(2**63), ANCIENT_BEFORE_MS), RejectReason.BAD_TIMESTAMP),
        (st.integers(FUTURE_AFTER_MS, 2**63 - 1), RejectReason.BAD_TIMESTAMP),
        (st.integers(2**63, 2**64 - 1) | st.integers(-(10**30), -(2**63) - 1), BAD_WIRE),
        (_other_than(int) | st.booleans(), BAD_WIRE),
    ],
    "x": [
        (good_value | st.none(), "ok"),
        (huge_value | st.integers(10**12 + 1, 2**64 - 1), RejectReason.BAD_VALUE),
        (_other_than(int, float, type(None)) | st.booleans(), BAD_WIRE),
    ],
    "e": [
        (st.just("") | _too_long(MAX_ID_LENGTH), RejectReason.MISSING_EVENT_ID),
        (_other_than(str), BAD_WIRE),
    ],
    "u": [
        (st.just("") | _too_long(MAX_ID_LENGTH), RejectReason.MISSING_USER),
        (_other_than(str), BAD_WIRE),
    ],
    "i": [
        (st.just("") | _too_long(MAX_ID_LENGTH), RejectReason.SCHEMA),
        (st.none() | short_text, "ok"),
        (_other_than(str, type(None)), BAD_WIRE),
    ],
    "c": [
        (st.just("") | _too_long(MAX_CATEGORY_LENGTH), RejectReason.SCHEMA),
        (_other_than(str, type(None)), BAD_WIRE),
    ],
    "tr": [
        (_bad_dicts(), RejectReason.SCHEMA),
        (st.none() | scalar_map, "ok"),
        (_other_than(dict, type(None)), BAD_WIRE),
    ],
    "p": [
        (_bad_dicts(), RejectReason.SCHEMA),
        (_other_than(dict, type(None)), BAD_WIRE),
    ],
}


def v1_document(batch: EventBatch) -> dict[str, Any]:
    """``batch`` as a version 1 wire document (every column JSON): still read by shards."""
    doc = {
        "v": 1,
        "e": batch.event_id,
        "u": batch.user_id,
        "t": batch.type.tolist(),
        "ts": batch.ts.tolist(),
        "i": batch.item_id,
        "c": batch.category,
        "x": [None if x != x else x for x in batch.value.tolist()],
        "s": batch.source.tolist(),
    }
    if any(t is not None for t in batch.traits):
        doc["tr"] = batch.traits
    if any(p is not None for p in batch.properties):
        doc["p"] = batch.properties
    return doc


@st.composite
def wire_cases(draw: st.DrawFn) -> WireCase:
    """A valid version 1 wire batch broken in one way: a cell, a column, the document, or its
    bytes (version 2 bodies are broken by :func:`v2_bodies`)."""
    batch = draw(batches(valid=True))
    n = len(batch)
    depth = draw(st.integers(200, 1000))
    doc: dict[str, Any] = orjson.loads(orjson.dumps(v1_document(batch)))
    for name in ("tr", "p"):
        doc.setdefault(name, [None] * n)
    how = draw(st.sampled_from(["cell", "cell", "column", "document", "bytes"]))
    outcome: str | tuple[int, RejectReason] | None = None
    if how == "cell":
        name = draw(st.sampled_from(sorted(_CELLS)))
        cells, effect = draw(st.sampled_from(_CELLS[name]))
        row = draw(st.integers(0, n - 1))
        doc[name][row] = draw(cells)
        outcome = effect if isinstance(effect, str) else (row, effect)
    elif how == "column":  # replaced by anything, made longer or shorter, or dropped
        name = draw(st.sampled_from(sorted(doc)))
        change = draw(st.sampled_from(["replace", "grow", "shrink", "drop"]))
        if change == "replace":
            doc[name] = draw(json_value)
        elif change == "grow" and isinstance(doc[name], list):
            doc[name].append(draw(json_value))
            outcome = BAD_WIRE
        elif change == "shrink" and isinstance(doc[name], list):
            doc[name].pop()
            outcome = BAD_WIRE
        else:
            del doc[name]
            outcome = "ok" if name in ("tr", "p") else BAD_WIRE
    elif how == "document":
        doc = draw(
            st.one_of(
                st.just({**doc, "v": 2}),
                st.dictionaries(text, json_value, max_size=3).map(lambda extra: {**doc, **extra}),
                _other_than(dict),
            )
        )
        outcome = None
    body = _splice(dumps(doc), _DEEP, b"[" * depth + b"]" * depth)
    if how == "bytes":  # cut short, bad UTF-8, NaN or infinity, single quotes
        cut = draw(st.integers(0, len(body) - 1))
        token = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999"]))
        body = draw(
            st.sampled_from(
                [
                    body[:cut],
                    body[:cut] + draw(st.sampled_from(BAD_UTF8)) + body[cut:],
                    body.replace(b'"x": [', b'"x": [' + token + b", ", 1),
                    body.replace(b'"', b"'", 1),
                ]
            )
        )
        outcome = BAD_WIRE
    return WireCase(body, n, outcome)


@st.composite
def v2_bodies(draw: st.DrawFn) -> bytes:
    """A valid version 2 body, then maybe cut, extended, or with bytes overwritten anywhere
    (the header's counts and lengths included)."""
    body = bytearray(encode(draw(batches(valid=True))))
    how = draw(st.sampled_from(["intact", "cut", "extend", "overwrite", "overwrite"]))
    if how == "cut":
        del body[draw(st.integers(0, len(body) - 1)) :]
    elif how == "extend":
        body += draw(st.binary(min_size=1, max_size=24))
    elif how == "overwrite":
        at = draw(st.integers(0, len(body) - 1))
        patch = draw(st.binary(min_size=1, max_size=8))
        body[at : at + len(patch)] = patch
    return bytes(body)
