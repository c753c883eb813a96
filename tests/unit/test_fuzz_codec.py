"""Bad input is data: fuzzing the codec, the row rules, a shard and the JSON ingest path.

Whatever the bytes, :func:`~actors.codec.decode` returns a batch or raises
:class:`~actors.errors.WireError`; every row of a batch and every event of a
JSON body is accepted or rejected with a reason (the one its defect earns);
what the JSON path accepts, a shard accepts too; a shard takes any delivery
without raising and moves its positions on.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.batch import EventBatch
from actors.codec import decode, encode
from actors.delivery import Delivery
from actors.errors import WireError
from actors.events import Event
from actors.shard import Shard
from actors.state import iso_ms
from actors.validation import Checked, RejectReason, ValidationPolicy, check_batch, parse_events
from tests.support.bad_input import (
    BAD_WIRE,
    Body,
    WireCase,
    batches,
    json_bodies,
    v2_bodies,
    wire_cases,
)

POLICY = ValidationPolicy()
NOW = 1_767_225_600_000  # 2026-01-01
NOW_NS = time.time_ns()
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def assert_split(batch: EventBatch, checked: Checked) -> None:
    """Each row accepted or rejected (once, with a reason), accepted rows in their order."""
    at = [r.index for r in checked.rejected]
    assert at == sorted(set(at)) and all(0 <= i < len(batch) for i in at)
    kept = [i for i in range(len(batch)) if i not in set(at)]
    assert checked.batch.event_id == [batch.event_id[i] for i in kept]
    for r in checked.rejected:
        assert isinstance(r.reason, RejectReason) and r.detail
        orjson.loads(r.raw)  # a dead letter holds the row as JSON


def as_event(batch: EventBatch, i: int) -> Event:
    """Row ``i`` through the JSON contract: accepted wire rows must pass it too."""
    row = batch.event_dict(i)
    row["ts"] = iso_ms(row["ts"])
    return Event.model_validate_json(orjson.dumps(row))


@FUZZ
@given(st.binary(max_size=500) | wire_cases().map(lambda case: case.body) | v2_bodies())
def test_decoding_any_bytes_gives_a_batch_or_a_wire_error(body: bytes) -> None:
    try:
        batch = decode(body)
    except WireError as exc:
        assert exc.reason == RejectReason.BAD_WIRE.value and exc.detail
        return
    n = len(batch)
    assert len(batch.user_id) == len(batch.item_id) == len(batch.category) == n
    assert batch.type.shape == batch.ts.shape == batch.value.shape == batch.source.shape == (n,)
    assert len(batch.traits) == len(batch.properties) == n


@FUZZ
@given(wire_cases())
def test_a_broken_wire_batch_is_refused_whole_or_row_by_row_with_the_right_reason(
    case: WireCase,
) -> None:
    try:
        batch = decode(case.body)
    except WireError as exc:
        assert case.outcome in (BAD_WIRE, None), f"refused as {exc}"
        return
    assert case.outcome != BAD_WIRE, f"decoded {len(batch)} rows"
    checked = check_batch(batch, POLICY, at_ms=NOW)
    assert_split(batch, checked)
    if case.outcome == "ok":
        assert checked.rejected == [] and len(checked.batch) == case.rows
    elif isinstance(case.outcome, tuple):
        assert [(r.index, r.reason) for r in checked.rejected] == [case.outcome]
    for i in range(len(checked.batch)):
        as_event(checked.batch, i)


@FUZZ
@given(batches(valid=False, max_rows=20))
def test_any_batch_survives_encode_and_decode(batch: EventBatch) -> None:
    back = decode(encode(batch))
    assert back.event_id == batch.event_id and back.user_id == batch.user_id
    assert back.item_id == batch.item_id and back.category == batch.category
    assert back.traits == batch.traits and back.properties == batch.properties
    np.testing.assert_array_equal(back.type, batch.type)
    np.testing.assert_array_equal(back.ts, batch.ts)
    np.testing.assert_array_equal(back.source, batch.source)
    np.testing.assert_array_equal(back.value, batch.value)  # NaN == NaN here


deliveries = st.builds(
    Delivery,
    partition=st.integers(0, 5),  # the shard owns 0-3
    seq=st.integers(1, 12),
    stored_ns=st.integers(0, 10**12).map(lambda back: NOW_NS - back),
    pending=st.integers(0, 100),
    data=st.one_of(
        wire_cases().map(lambda case: case.body),
        batches(valid=True).map(encode),
        v2_bodies(),
        st.binary(max_size=100),
    ),
)


def _rows(body: bytes) -> int | None:
    try:
        return len(decode(body))
    except WireError:
        return None


@pytest.mark.filterwarnings("error::RuntimeWarning")  # an overflowing cast is a bug too
@FUZZ
@given(st.lists(deliveries, max_size=8))
def test_a_shard_takes_any_deliveries_and_accounts_for_every_row(sent: list[Delivery]) -> None:
    shard = Shard(0, range(4))
    positions, taken, skipped = dict(shard.positions), [], 0
    for d in sent:
        if d.partition not in positions or d.seq <= positions[d.partition]:
            skipped += 1
            continue
        positions[d.partition] = d.seq
        taken.append(d)

    result = shard.apply(sent)

    assert result.skipped_messages == skipped
    assert shard.positions == positions
    whole = [r for r in result.rejected if r.index == -1]
    assert [(r.reason, r.raw) for r in whole] == [
        (RejectReason.BAD_WIRE, d.data) for d in taken if _rows(d.data) is None
    ]
    rows = sum(_rows(d.data) or 0 for d in taken)
    row_rejections = sum(r.index >= 0 for r in result.rejected)
    assert result.applied + row_rejections + shard.dedup.duplicates == rows
    assert all(isinstance(r.reason, RejectReason) and r.detail for r in result.rejected)
    assert shard.rejected == Counter(r.reason.value for r in result.rejected)
    assert shard.applied_events == result.applied
    shard.insights_partials()  # the aggregates take whatever was accepted
    assert shard.status()["applied_events"] == result.applied
    again = shard.apply(sent)
    assert again.skipped_messages == len(sent) and again.applied == 0


def _array_length(raw: bytes) -> int | None:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return len(value) if isinstance(value, list) else None


@FUZZ
@given(json_bodies())
def test_parsing_any_body_gives_every_event_the_verdict_its_defect_earns(body: Body) -> None:
    checked = parse_events(body.raw, POLICY, at_ms=NOW)
    verdicts = [(r.index, r.reason) for r in checked.rejected]
    for r in checked.rejected:
        assert r.detail and len(r.raw) <= POLICY.max_dead_letter_bytes
    if body.expected is not None:
        assert verdicts == [(i, why) for i, why in enumerate(body.expected) if why is not None]
        assert len(checked.batch) == body.expected.count(None)
    elif body.whole is not None:
        assert verdicts == [(-1, body.whole)] and len(checked.batch) == 0
    n = _array_length(body.raw)
    if n is None:  # arbitrary bytes: no array, one rejection of the whole body
        assert len(verdicts) == 1 and verdicts[0][0] == -1 and len(checked.batch) == 0
    else:
        assert len(checked.batch) + len(verdicts) == n
        assert [i for i, _ in verdicts] == sorted({i for i, _ in verdicts})
    # What the JSON path accepts goes over the wire, and a shard accepts all of it.
    again = check_batch(decode(encode(checked.batch)), POLICY, at_ms=NOW)
    assert again.rejected == [] and again.batch.event_id == checked.batch.event_id
