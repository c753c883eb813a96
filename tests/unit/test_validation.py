"""Every way an event can be wrong yields a rejection with the right reason; good ones pass."""

import numpy as np
import orjson
import pytest

from actors.codec import encode
from actors.events import TYPE_CODE, EventType
from actors.validation import RejectReason, ValidationPolicy, check_batch, parse_events
from tests.support.events import event, random_batch

POLICY = ValidationPolicy()
NOW = 1_767_225_600_000  # 2026-01-01


def parse(items: object) -> tuple[int, list[tuple[int, str]]]:
    checked = parse_events(orjson.dumps(items), POLICY, at_ms=NOW)
    return len(checked.batch), [(r.index, r.reason.value) for r in checked.rejected]


def test_a_valid_batch_is_accepted_whole_with_its_fields() -> None:
    items = [
        event("u1", "purchase", item_id="i1", category="books", value=12.5, source="mobile"),
        event("u2", "identify", traits={"plan": "pro", "age": 40}),
    ]
    checked = parse_events(orjson.dumps(items), POLICY, at_ms=NOW)
    assert checked.rejected == []
    batch = checked.batch
    assert batch.user_id == ["u1", "u2"]
    assert batch.type.tolist() == [TYPE_CODE[EventType.PURCHASE], TYPE_CODE[EventType.IDENTIFY]]
    assert batch.value[0] == 12.5 and np.isnan(batch.value[1])
    assert batch.ts[0] == 1_714_564_800_000
    assert batch.traits[1] == {"plan": "pro", "age": 40}


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (event(type="teleport"), RejectReason.UNKNOWN_TYPE),
        (event(user_id=""), RejectReason.MISSING_USER),
        ({k: v for k, v in event().items() if k != "user_id"}, RejectReason.MISSING_USER),
        (event(event_id="x" * 500), RejectReason.MISSING_EVENT_ID),
        (event(ts="2024-05-01T12:00:00"), RejectReason.BAD_TIMESTAMP),
        (event(ts="yesterday"), RejectReason.BAD_TIMESTAMP),
        (event(ts="2999-01-01T00:00:00Z"), RejectReason.BAD_TIMESTAMP),
        (event(ts="1970-01-02T00:00:00Z"), RejectReason.BAD_TIMESTAMP),
        (event(value="12"), RejectReason.BAD_VALUE),
        (event(color="red"), RejectReason.UNKNOWN_FIELD),
        (event(user_id=42), RejectReason.MISSING_USER),
        (event(source="carrier-pigeon"), RejectReason.SCHEMA),
        (event(properties={f"k{i}": i for i in range(100)}), RejectReason.SCHEMA),
        (event(properties={"blob": "x" * 20_000}), RejectReason.OVERSIZED),
        ("just a string", RejectReason.SCHEMA),
    ],
)
def test_a_bad_event_is_rejected_with_its_reason_and_the_rest_pass(
    bad: object, reason: RejectReason
) -> None:
    accepted, rejected = parse([event("a"), bad, event("b")])
    assert accepted == 2
    assert rejected == [(1, reason.value)]


def test_a_body_that_is_not_json_is_one_rejection_holding_the_body() -> None:
    checked = parse_events(b"{oops", POLICY, at_ms=NOW)
    assert len(checked.batch) == 0
    (rejection,) = checked.rejected
    assert (rejection.index, rejection.reason, rejection.raw) == (
        -1,
        RejectReason.INVALID_JSON,
        b"{oops",
    )


def test_a_json_value_that_is_not_an_array_is_a_schema_rejection() -> None:
    checked = parse_events(b'{"event_id": "x"}', POLICY, at_ms=NOW)
    assert [r.reason for r in checked.rejected] == [RejectReason.SCHEMA]


def test_rejections_carry_the_original_event_bytes() -> None:
    bad = event(type="teleport")
    checked = parse_events(orjson.dumps([bad]), POLICY, at_ms=NOW)
    assert orjson.loads(checked.rejected[0].raw) == bad


def test_check_batch_splits_bad_rows_of_a_columnar_batch() -> None:
    batch = random_batch(10, 3, t0=NOW - 5 * 86_400_000)
    batch.type[2] = 200
    batch.ts[4] = NOW + 10 * 86_400_000
    batch.user_id[6] = ""
    batch.value[8] = np.inf
    checked = check_batch(batch, POLICY, at_ms=NOW)
    assert [(r.index, r.reason) for r in checked.rejected] == [
        (2, RejectReason.UNKNOWN_TYPE),
        (4, RejectReason.BAD_TIMESTAMP),
        (6, RejectReason.MISSING_USER),
        (8, RejectReason.BAD_VALUE),
    ]
    assert checked.batch.event_id == [batch.event_id[i] for i in (0, 1, 3, 5, 7, 9)]


# Regressions found by tests/unit/test_fuzz_codec.py: the verdict on an event never
# depends on its neighbours, and nothing a body holds makes parsing raise.


def test_an_event_too_big_is_oversized_even_when_every_event_of_its_body_is_valid() -> None:
    big = event(properties={f"p{i}": "x" * 512 for i in range(32)})
    assert parse([big]) == (0, [(0, "oversized")])
    assert parse([event("a"), big, event(type="warp")]) == (
        1,
        [(1, "oversized"), (2, "unknown_type")],
    )


def test_integers_beyond_64_bits_in_a_map_are_read_as_floats_whatever_the_neighbours() -> None:
    huge = orjson.dumps([event("a", properties={"n": 1})]).replace(b'"n":1', b'"n":' + b"9" * 30)
    for body in (huge, huge[:-1] + b',{"oops":1}]'):
        checked = parse_events(body, POLICY, at_ms=NOW)
        assert len(checked.batch) == 1 and checked.batch.properties == [{"n": 1e30}]
        encode(checked.batch)  # raised TypeError: Integer exceeds 64-bit range


@pytest.mark.parametrize("depth", [253, 300, 1000])
def test_an_item_nested_deeper_than_orjson_writes_is_a_schema_rejection(depth: int) -> None:
    body = b"[" + orjson.dumps(event("a")) + b"," + b"[" * depth + b"]" * depth + b"]"
    checked = parse_events(body, POLICY, at_ms=NOW)  # raised TypeError: Recursion limit reached
    assert len(checked.batch) == 1
    assert [(r.index, r.reason) for r in checked.rejected] == [(1, RejectReason.SCHEMA)]


def test_nan_anywhere_makes_the_whole_body_invalid_json_whatever_the_neighbours() -> None:
    for items in ([event("a")], [event("a"), event(type="warp")]):
        body = orjson.dumps([*items, event("b", properties={"x": 1})]).replace(b'"x":1', b'"x":NaN')
        checked = parse_events(body, POLICY, at_ms=NOW)  # the first was accepted with null
        assert len(checked.batch) == 0
        assert [(r.index, r.reason) for r in checked.rejected] == [(-1, RejectReason.INVALID_JSON)]


def test_a_dead_letter_keeps_no_more_of_a_body_or_event_than_nats_can_carry() -> None:
    policy = ValidationPolicy(max_dead_letter_bytes=1000)
    (whole,) = parse_events(b"x" * 5000, policy, at_ms=NOW).rejected
    assert whole.raw == b"x" * 1000 and "5000 bytes" in whole.detail
    big = event(properties={f"p{i}": "x" * 512 for i in range(32)})
    (oversized,) = parse_events(orjson.dumps([big]), policy, at_ms=NOW).rejected
    assert oversized.reason is RejectReason.OVERSIZED and len(oversized.raw) == 1000


def test_a_value_the_aggregates_cannot_hold_is_a_bad_value() -> None:
    assert parse([event(value=1e13), event(value=-1e300), event(value=1e12)]) == (
        1,
        [(0, "bad_value"), (1, "bad_value")],
    )


def test_check_batch_refuses_rows_that_no_json_event_could_have_been() -> None:
    n = 9
    batch = random_batch(n, 3, t0=NOW - 5 * 86_400_000)
    batch.item_id[0] = ""
    batch.category[1] = "c" * 65
    batch.traits[2] = {"nested": {"a": [1]}}
    batch.properties[3] = {f"k{i}": i for i in range(33)}
    batch.properties[4] = {"long": "x" * 513}
    batch.traits[5] = {"huge": 2**70}
    batch.properties[6] = {"deep": orjson.loads(b"[" * 300 + b"]" * 300)}
    batch.traits[7] = {"nan": float("nan")}
    checked = check_batch(batch, POLICY, at_ms=NOW)  # row 6 raised TypeError when dumped
    assert [(r.index, r.reason) for r in checked.rejected] == [
        (i, RejectReason.SCHEMA) for i in range(8)
    ]
    assert orjson.loads(checked.rejected[6].raw)["properties"] == "<not serialisable>"
    assert checked.batch.event_id == [batch.event_id[8]]
