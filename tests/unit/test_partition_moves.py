"""Partitions are key groups: each one's state is its own, moves whole and goes on exactly."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np
import pytest

from actors.codec import decode
from actors.delivery import Delivery
from actors.errors import NotOwner
from actors.partitioning import partition_of
from actors.shard import Shard, partition_configs
from actors.state import StateRules
from tests.support.events import random_batch
from tests.unit.test_checkpoint import assert_same
from tests.unit.test_shard import deliveries_of

P = 4


def _shard(shard_id: int, owned: list[int]) -> Shard:
    rules, items, dedup = partition_configs(P)
    shard = Shard(shard_id, [], rules, None, None, None, items, dedup, partition_count=P)
    for p in owned:
        shard.add(p)
    return shard


def _stream() -> tuple[list[Delivery], list[Delivery]]:
    first = deliveries_of(random_batch(4000, 300, seed=1), P)
    # Later messages carry higher sequences than the first part's.
    second = [
        dataclasses.replace(d, seq=d.seq + len(first))
        for d in deliveries_of(random_batch(4000, 300, seed=2), P)
    ]
    return first, second


def _comparable(state: dict[str, Any]) -> dict[str, Any]:
    """An export without what depends on how the stream was cut into steps.

    Item versions count steps; segment entries and exits are counted where a
    step evaluates membership (the memberships themselves and sizes are state).
    """
    out = dict(state)
    out["items"] = {k: v for k, v in state["items"].items() if k != "version"}
    out["counters"] = {k: v for k, v in state["counters"].items() if k != "applied_messages"}
    segments = state["segments"]
    out["segments"] = {
        "bits": segments["bits"],
        "size": segments["entered"] - segments["left"],
        "now_ms": segments["now_ms"],
    }
    return out


def test_a_partitions_state_does_not_depend_on_the_partitions_beside_it() -> None:
    first, second = _stream()
    messages = [[d for d in first + second if d.partition == p] for p in range(P)]
    # Steps that mix partitions, each partition's messages cut as they are alone:
    # what a step applies of a user depends on the step's cut, not on its neighbours.
    together = _shard(0, [0, 1, 2, 3])
    for step in itertools.zip_longest(*messages):
        together.apply([d for d in step if d is not None])
    for p in range(P):
        alone = _shard(1, [p])
        for delivery in messages[p]:
            alone.apply([delivery])
        assert_same(_comparable(together.export(p)), _comparable(alone.export(p)))


def test_a_handed_over_partition_ends_where_an_uninterrupted_one_does() -> None:
    first, second = _stream()
    steady = _shard(0, [0, 1, 2, 3])
    steady.apply(first)
    steady.apply(second)

    old, new = _shard(0, [0, 1, 2]), _shard(1, [3])  # new holds another partition already
    old.apply(first)
    new.apply([d for d in first if d.partition == 3])
    old.release(2)
    _, blob = old.snapshot(created_ms=0, partitions=[2])
    _, (state,) = new.decode(blob)
    new.insert(state)
    for shard in (old, new):
        shard.apply(second)  # each applies only what it owns
    old.forget(2)

    users = sorted({u for d in first + second for u in decode(d.data).user_id})
    for user in users:
        owner = new if partition_of(user, P) in (2, 3) else old
        assert owner.profiles([user]) == steady.profiles([user])
    assert old.applied_events + new.applied_events == steady.applied_events == 8000
    for p in (2, 3):
        assert_same(_comparable(new.export(p)), _comparable(steady.export(p)))
    assert old.partitions == [0, 1] and new.partitions == [2, 3]


def test_a_released_partition_answers_until_forgotten_and_then_says_not_owner() -> None:
    shard = _shard(3, [0, 1])
    shard.apply(deliveries_of(random_batch(500, 50, seed=3), P))
    user = next(u for u in (f"u{i}" for i in range(50)) if partition_of(u, P) == 1)
    before = shard.profiles([user])
    shard.release(1)
    assert shard.partitions == [0] and shard.held == [0, 1]
    assert shard.profiles([user]) == before  # still answered from the released state
    skipped = shard.apply(deliveries_of(random_batch(100, 50, seed=4), P))
    assert skipped.applied < 100  # partition 1's events are not applied any more
    shard.forget(1)
    with pytest.raises(NotOwner) as caught:
        shard.profiles([user])
    assert caught.value.shard == 3 and caught.value.partitions == [1]
    assert user not in shard.table


def test_a_user_on_the_wrong_partition_is_a_dead_letter() -> None:
    shard = _shard(0, [0, 1, 2, 3])
    batch = random_batch(200, 20, seed=5)
    wrong = next(p for p in range(P) if p != partition_of(batch.user_id[0], P))
    again = deliveries_of(batch.take([0]), P)[0].data  # its first event, on another partition
    deliveries = [*deliveries_of(batch, P), Delivery(wrong, 10_000, 0, 0, again)]
    result = shard.apply(deliveries)
    assert [r.reason.value for r in result.rejected] == ["wrong_partition"]
    assert result.applied == 200
    assert result.rejected[0].key == f"{wrong}.10000.0"
    assert shard.status()["rejected"] == {"wrong_partition": 1}


def test_per_partition_bounds_share_the_stream_wide_ones() -> None:
    rules, items, dedup = partition_configs(64, StateRules(seen_filter_bits=1 << 24))
    assert rules.seen_filter_bits == 1 << 18
    assert items.max_pairs == 4_000_000 // 64 and dedup.max_ids == 20_000_000 // 64


def test_forgotten_partitions_leave_room_for_new_users() -> None:
    shard = _shard(0, [0, 1])
    shard.apply(deliveries_of(random_batch(2000, 200, seed=6), P))
    high = shard.table.high
    shard.forget(1)
    shard.add(2)
    shard.apply([d for d in deliveries_of(random_batch(2000, 200, seed=7), P) if d.partition == 2])
    assert shard.table.high <= high + 5  # the forgotten rows were taken again
    assert np.all(shard.table.partitions_of_rows(shard.table.rows_of(shard.user_ids(10**6))) != 1)
