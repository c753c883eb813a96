"""The wire format round-trips batches and refuses anything else with a reason."""

import numpy as np
import orjson
import pytest

from actors.batch import EventBatch
from actors.codec import decode, encode
from actors.errors import WireError
from tests.support.bad_input import v1_document
from tests.support.events import random_batch


def assert_same(a: EventBatch, b: EventBatch) -> None:
    assert a.event_id == b.event_id
    assert a.user_id == b.user_id
    assert a.item_id == b.item_id
    assert a.category == b.category
    assert a.traits == b.traits
    assert a.properties == b.properties
    np.testing.assert_array_equal(a.type, b.type)
    np.testing.assert_array_equal(a.ts, b.ts)
    np.testing.assert_array_equal(a.source, b.source)
    np.testing.assert_array_equal(a.value, b.value)  # NaN == NaN here


def test_a_batch_survives_encode_and_decode() -> None:
    batch = random_batch(500, 50)
    batch.value[::7] = np.nan
    batch.item_id[3] = None
    batch.traits[5] = {"plan": "pro", "age": 31}
    batch.properties[9] = {"ab": True}
    assert_same(decode(encode(batch)), batch)


def test_an_empty_batch_round_trips() -> None:
    assert len(decode(encode(EventBatch.empty()))) == 0


def test_columns_make_the_wire_smaller_than_row_json() -> None:
    batch = random_batch(1000, 100)
    rows = orjson.dumps([batch.event_dict(i) for i in range(len(batch))])
    assert len(encode(batch)) < 0.7 * len(rows)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2, 3]",
        b'{"v": 2}',
        b'{"v": 1, "e": ["a"], "u": ["b"]}',
        b'{"v":1,"e":["a"],"u":["b"],"t":[0,1],"ts":[1],"i":[null],"c":[null],"x":[null],"s":[0]}',
        b'{"v":1,"e":[1],"u":["b"],"t":[0],"ts":[1],"i":[null],"c":[null],"x":[null],"s":[0]}',
        b'{"v":1,"e":["a"],"u":["b"],"t":["x"],"ts":[1],"i":[null],"c":[null],"x":[null],"s":[0]}',
        b'{"v":1,"e":["a"],"u":["b"],"t":[999],"ts":[1],"i":[null],"c":[null],"x":[null],"s":[0]}',
        b'{"v":1,"e":["a"],"u":["b"],"t":[0],"ts":[1],"i":[null],"c":[null],"x":["a"],"s":[0]}',
        b'{"v":1,"e":["a"],"u":["b"],"t":[0],"ts":[1],"i":[null],"c":[null],"x":[null],"s":[0],'
        b'"zz":[1]}',
        b'{"v":1,"e":["a"],"u":["b"],"t":[0],"ts":[1],"i":[null],"c":[null],"x":[null],"s":[0],'
        b'"tr":[5]}',
        b"\xff\xfe\x00",
    ],
)
def test_a_body_that_is_not_the_wire_format_is_refused_as_bad_wire(body: bytes) -> None:
    with pytest.raises(WireError) as info:
        decode(body)
    assert info.value.reason == "bad_wire"
    assert info.value.detail


@pytest.mark.parametrize("cell", [b'"1.5"', b'"nan"', b'"inf"', b"true", b"[1]", b"{}"])
def test_a_value_column_holding_anything_but_numbers_or_null_is_bad_wire(cell: bytes) -> None:
    body = (
        b'{"v":1,"e":["a"],"u":["b"],"t":[0],"ts":[1],"i":[null],"c":[null],"x":['
        + cell
        + b'],"s":[0]}'
    )
    with pytest.raises(WireError) as info:  # numpy read "1.5", "inf" and true as numbers
        decode(body)
    assert "'x'" in info.value.detail


def test_the_written_format_is_version_2_and_version_1_bodies_are_still_read() -> None:
    batch = random_batch(50, 10)
    body = encode(batch)
    assert body[:4] == b"\x00AU2"
    assert_same(decode(body), batch)
    v1 = orjson.dumps(v1_document(batch))
    assert_same(decode(v1), batch)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda b: b[:-1], "bytes do not hold"),
        (lambda b: b[:10], "truncated header"),
        (lambda b: b[:4] + (10**6).to_bytes(4, "little") + b[8:], "bytes do not hold"),
        (lambda b: b.replace(b'"e":["', b'"e":[7,"', 1), "bytes do not hold"),
    ],
)
def test_a_damaged_version_2_body_is_bad_wire_with_a_reason(damage, reason: str) -> None:
    body = encode(random_batch(20, 5))
    with pytest.raises(WireError) as info:
        decode(damage(body))
    assert info.value.reason == "bad_wire" and reason in info.value.detail


def test_a_version_2_string_column_of_numbers_is_bad_wire() -> None:
    batch = random_batch(3, 2)
    body = encode(batch)
    strings = orjson.dumps(
        {"e": [1, 2, 3], "u": batch.user_id, "i": batch.item_id, "c": batch.category}
    )
    head = b"\x00AU2" + (3).to_bytes(4, "little") + len(strings).to_bytes(4, "little")
    numbers = body[-3 * 18 :]
    pad = b"\0" * (-(12 + len(strings)) % 8)
    with pytest.raises(WireError, match="'e' must hold strings"):
        decode(head + strings + pad + numbers)
