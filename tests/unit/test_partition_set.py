"""A partition's state moves between partition sets and goes on exactly where it stopped."""

from __future__ import annotations

import dataclasses

import pytest

from actors.codec import decode
from actors.delivery import Delivery
from actors.errors import NotOwner
from actors.partition_set import PartitionSet, partition_configs
from actors.partitioning import partition_of
from actors.shard import Shard
from actors.state import StateRules
from tests.support.events import random_batch
from tests.unit.test_shard import deliveries_of

P = 4


def _set(shard_id: int, owned: list[int]) -> PartitionSet:
    rules, items, dedup = partition_configs(P)
    parts = PartitionSet(
        shard_id, P, lambda p: Shard(p, [p], rules, None, None, None, items, dedup)
    )
    for p in owned:
        parts.own(parts.make(p))
    return parts


def test_a_handed_over_partition_ends_where_an_uninterrupted_one_does() -> None:
    first = deliveries_of(random_batch(4000, 300, seed=1), P)
    # Later messages carry higher sequences than the first part's.
    second = [
        dataclasses.replace(d, seq=d.seq + len(first))
        for d in deliveries_of(random_batch(4000, 300, seed=2), P)
    ]
    steady = _set(0, [0, 1, 2, 3])
    steady.apply(first)
    steady.apply(second)

    old, new = _set(0, [0, 1, 2, 3]), _set(1, [])
    old.apply(first)
    released = old.release(2)
    _, blob = released.snapshot(created_ms=0)
    moved = new.make(2)
    moved.restore(blob)
    new.own(moved)
    for parts in (old, new):
        parts.apply(second)  # each applies only what it owns
    old.forget(2)

    users = sorted({u for d in (first + second) for u in _users(d)})
    mine = [u for u in users if steady._holder(_partition(u)) is not None]
    by_owner = {0: old, 1: new}
    for user in mine:
        owner = 1 if _partition(user) == 2 else 0
        assert by_owner[owner].profiles([user]) == steady.profiles([user])
    assert old.applied_events + new.applied_events == steady.applied_events == 8000


def test_a_released_partition_answers_until_forgotten_and_then_says_not_owner() -> None:
    parts = _set(3, [0, 1])
    parts.apply(deliveries_of(random_batch(500, 50, seed=3), P))
    user = next(u for u in (f"u{i}" for i in range(50)) if _partition(u) == 1)
    before = parts.profiles([user])
    parts.release(1)
    assert parts.partitions == [0]
    assert parts.profiles([user]) == before  # still answered from the released state
    skipped = parts.apply(deliveries_of(random_batch(100, 50, seed=4), P))
    assert skipped.applied < 100  # partition 1's events are not applied any more
    parts.forget(1)
    with pytest.raises(NotOwner) as caught:
        parts.profiles([user])
    assert caught.value.shard == 3 and caught.value.partitions == [1]


def test_per_partition_bounds_share_the_stream_wide_ones() -> None:
    rules, items, dedup = partition_configs(64, StateRules(seen_filter_bits=1 << 24))
    assert rules.seen_filter_bits == 1 << 18
    assert items.max_pairs == 4_000_000 // 64 and dedup.max_ids == 20_000_000 // 64


def _partition(user: str) -> int:
    return partition_of(user, P)


def _users(delivery: Delivery) -> list[str]:
    return list(decode(delivery.data).user_id)
