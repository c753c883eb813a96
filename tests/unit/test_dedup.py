"""Event de-duplication: an event id is applied once within the horizon, memory stays bounded."""

from __future__ import annotations

import numpy as np
import pytest

from actors.codec import encode
from actors.dedup import DedupConfig, EventDeduper
from actors.delivery import Delivery
from actors.shard import Shard
from tests.support.events import random_batch

HOUR = 3_600_000


def test_repeats_in_a_batch_and_across_batches_are_dropped_once_seen() -> None:
    dedup = EventDeduper()
    ts = np.full(4, 10 * HOUR, dtype=np.int64)
    assert dedup.fresh(["a", "b", "a", "c"], ts).tolist() == [True, True, False, True]
    assert dedup.fresh(["c", "d"], ts[:2]).tolist() == [False, True]
    assert dedup.duplicates == 2 and len(dedup) == 4


def test_repeats_older_than_the_horizon_are_forgotten_and_memory_is_bounded() -> None:
    dedup = EventDeduper(DedupConfig(horizon_ms=4 * HOUR, buckets=4))
    dedup.fresh(["old"], np.array([0], dtype=np.int64))
    dedup.fresh(["new"], np.array([10 * HOUR], dtype=np.int64))  # 'old' falls out
    assert dedup.fresh(["old"], np.array([0], dtype=np.int64)).tolist() == [True]
    assert dedup.fresh(["new"], np.array([10 * HOUR], dtype=np.int64)).tolist() == [False]
    small = EventDeduper(DedupConfig(horizon_ms=100 * HOUR, buckets=100, max_ids=50))
    for hour in range(20):
        small.fresh([f"e{hour}-{i}" for i in range(10)], np.full(10, hour * HOUR))
    assert len(small) <= 50 and small.evicted_early > 0


@pytest.mark.parametrize("seed", [1, 2])
def test_a_shard_applies_resent_events_once(seed: int) -> None:
    batch = random_batch(600, users=20, seed=seed)
    once, twice = Shard(0, [0]), Shard(0, [0])
    once.apply([Delivery(0, 1, 0, 0, encode(batch))])
    halves = [batch.slice(0, 400), batch.slice(200, 600)]  # 200 events sent twice
    twice.apply([Delivery(0, i + 1, 0, 0, encode(b)) for i, b in enumerate(halves)])
    assert twice.applied_events == once.applied_events == 600
    assert twice.dedup.duplicates == 200
    users = sorted(set(batch.user_id))
    assert np.array_equal(once.table.user_rows(users).counts, twice.table.user_rows(users).counts)
