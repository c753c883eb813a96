"""The fold queue hands out bounded chunks, oldest first, never across a deletion."""

from __future__ import annotations

import time

import numpy as np

from actors.fold_queue import FOLD_MIN_EVENTS, Applied, FoldQueue
from tests.support.events import random_batch


def _step(n: int, seed: int) -> Applied:
    """``n`` events over partitions 0, 1, 2 in turn."""
    batch = random_batch(n, 10, seed=seed)
    column = np.arange(n, dtype=np.int64)
    none = np.zeros(0, np.int64)
    return Applied(
        batch, column % 3, column, column, column, column, column, none, time.monotonic()
    )


def test_chunks_are_bounded_in_order_and_stop_at_a_deletion() -> None:
    queue = FoldQueue()
    first, second, third = _step(300, 1), _step(500, 2), _step(200, 3)
    queue.push(first)
    queue.push(second)
    queue.push(Applied.deletion(np.array([4, 7]), np.array([0, 0])))
    queue.push(third)
    assert queue.events == 1000
    chunk = queue.take(400)  # all of the first step, the start of the second
    assert [len(s) for s in chunk.steps] == [300, 100] and chunk.deleted is None
    assert chunk.steps[1].batch.event_id == second.batch.event_id[:100]
    chunk = queue.take(10_000)  # the rest of the second, not past the deletion
    assert [len(s) for s in chunk.steps] == [400]
    assert chunk.steps[0].batch.event_id == second.batch.event_id[100:]
    chunk = queue.take(10_000)
    assert chunk.steps == [] and chunk.deleted is not None and chunk.deleted.tolist() == [4, 7]
    chunk = queue.take(10_000)
    assert [len(s) for s in chunk.steps] == [200] and not queue and queue.events == 0
    assert queue.lag_ms.raw()[0] == 3  # a lag recorded per chunk of events


def test_folding_is_due_when_enough_events_or_an_old_one_waits() -> None:
    queue = FoldQueue()
    assert not queue.due()
    queue.push(_step(10, 4))
    assert not queue.due()
    old = _step(10, 5)
    old.applied_at -= 60
    queue.push(old)
    assert not queue.due()  # the oldest decides: the first step is young
    queue.take(10)
    assert queue.due()  # now the old one is first
    big = FoldQueue()
    for k in range(FOLD_MIN_EVENTS // 1000):
        big.push(_step(1000, 10 + k))
    assert big.due()


def test_one_partition_is_taken_out_in_order_and_the_others_wait_in_theirs() -> None:
    queue = FoldQueue()
    first, second = _step(30, 6), _step(30, 7)
    queue.push(first)
    queue.push(Applied.deletion(np.array([9]), np.array([1])))  # partition 1's
    queue.push(Applied.deletion(np.array([5]), np.array([2])))  # partition 2's
    queue.push(second)
    chunks = queue.take_partition(1)
    assert [c.deleted is not None for c in chunks] == [False, True, False]
    (mine,) = chunks[0].steps
    assert mine.batch.event_id == [e for i, e in enumerate(first.batch.event_id) if i % 3 == 1]
    assert chunks[1].deleted is not None and chunks[1].deleted.tolist() == [9]
    assert queue.events == 40  # partitions 0 and 2 of both steps
    left = [queue.take(1000) for _ in range(3)]
    assert [len(c.steps) for c in left] == [1, 0, 1] and not queue
    assert left[1].deleted is not None and left[1].deleted.tolist() == [5]
    assert set(left[0].steps[0].partitions.tolist()) == {0, 2}
