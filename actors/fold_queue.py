"""Applied steps waiting for the insight aggregates: folded oldest first, in chunks, on time.

A shard applies events to per-user state at once (what freshness measures) and
queues what the aggregates need of each step (:class:`Applied`: the events and
what the state table knew of them). :class:`FoldQueue` says when folding is due
(enough events or old enough) and hands out chunks of bounded size, so folding
runs in small slices between steps instead of bursts. A deletion is a mark in
the queue: a chunk never crosses it, so row-keyed aggregates (the funnel) see a
deleted user's events before the user's row is handed to anyone else.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from actors.batch import EventBatch
from actors.folded import Folded
from actors.latency import LatencyRing
from actors.sketches import stable_hash64

FOLD_INTERVAL_S = 0.5  # applied events wait at most about this long for the aggregates
FOLD_MIN_EVENTS = 20_000  # ... or until this many are waiting
_NO_ROWS = np.zeros(0, dtype=np.int64)


@dataclass
class Applied:
    """A step applied to the state table and not yet folded into the aggregates."""

    batch: EventBatch
    partitions: np.ndarray
    rows: np.ndarray
    first_seen: np.ndarray
    session_gaps_ms: np.ndarray  # per event, the session time it adds (the table's rule)
    items: np.ndarray  # the table's item id per event
    categories: np.ndarray  # the table's category id per event
    deleted: np.ndarray  # rows a deletion freed (the step's last event); no events then
    applied_at: float  # monotonic time of the apply

    def __len__(self) -> int:
        return len(self.batch)

    @classmethod
    def deletion(cls, rows: np.ndarray, partitions: np.ndarray) -> Applied:
        """A deletion's mark in the queue: its freed ``rows`` (of ``partitions``), no events."""
        none = _NO_ROWS
        return cls(
            EventBatch.empty(), partitions, none, none, none, none, none, rows, time.monotonic()
        )

    def select(self, mask: np.ndarray) -> Applied:
        """The events where ``mask`` holds, in order (not for a deletion's mark)."""
        at = np.flatnonzero(mask)
        return Applied(
            self.batch.take(at),
            self.partitions[at],
            self.rows[at],
            self.first_seen[at],
            self.session_gaps_ms[at],
            self.items[at],
            self.categories[at],
            self.deleted,
            self.applied_at,
        )

    def slice(self, start: int, stop: int) -> Applied:
        return Applied(
            self.batch.slice(start, stop),
            self.partitions[start:stop],
            self.rows[start:stop],
            self.first_seen[start:stop],
            self.session_gaps_ms[start:stop],
            self.items[start:stop],
            self.categories[start:stop],
            self.deleted,
            self.applied_at,
        )


def folded(steps: Sequence[Applied], items: Sequence[str], categories: Sequence[str]) -> Folded:
    """Steps as the aligned columns every aggregate folds (user ids hashed once here)."""
    batches = [s.batch for s in steps]
    return Folded(
        stable_hash64(list(chain.from_iterable(b.user_id for b in batches))),
        np.concatenate([b.ts for b in batches]),
        np.concatenate([b.type for b in batches]),
        np.concatenate([b.value for b in batches]),
        np.concatenate([s.partitions for s in steps]),
        np.concatenate([s.rows for s in steps]),
        np.concatenate([s.first_seen for s in steps]),
        np.concatenate([s.session_gaps_ms for s in steps]),
        np.concatenate([s.items for s in steps]),
        np.concatenate([s.categories for s in steps]),
        items,
        categories,
    )


@dataclass
class Chunk:
    """What to fold next: steps (their events), or a deletion's freed rows."""

    steps: list[Applied]
    deleted: np.ndarray | None
    oldest: float  # monotonic time the oldest of it was applied


class FoldQueue:
    """The steps no aggregate has seen yet, oldest first."""

    def __init__(self) -> None:
        self._steps: deque[Applied] = deque()
        self.events = 0
        self.pushed = 0  # events ever pushed: the pace folds must keep
        self.lag_ms = LatencyRing()  # apply-to-fold delay of each chunk's oldest event

    def __bool__(self) -> bool:
        return bool(self._steps)

    def push(self, step: Applied) -> None:
        """Queue a step (or a deletion's mark, :meth:`Applied.deletion`)."""
        self._steps.append(step)
        self.events += len(step)
        self.pushed += len(step)

    def lag_s(self) -> float:
        """How long the oldest waiting step has waited (0 when none waits)."""
        return time.monotonic() - self._steps[0].applied_at if self._steps else 0.0

    def due(self) -> bool:
        """Whether :data:`FOLD_MIN_EVENTS` wait or the oldest has waited :data:`FOLD_INTERVAL_S`."""
        return bool(self._steps) and (
            self.events >= FOLD_MIN_EVENTS or self.lag_s() >= FOLD_INTERVAL_S
        )

    def take(self, most: int) -> Chunk:
        """Up to ``most`` events of steps in order, up to the next deletion; or that deletion."""
        oldest = self._steps[0].applied_at
        if self._steps[0].deleted.size:
            return Chunk([], self._steps.popleft().deleted, oldest)
        steps: list[Applied] = []
        count = 0
        while self._steps and count < most and not self._steps[0].deleted.size:
            step = self._steps[0]
            if count + len(step) > most:
                self._steps[0] = step.slice(most - count, len(step))
                step = step.slice(0, most - count)
            else:
                self._steps.popleft()
            steps.append(step)
            count += len(step)
        self.events -= count
        self.lag_ms.add((time.monotonic() - oldest) * 1000)
        return Chunk(steps, None, oldest)

    def take_partition(self, partition: int) -> list[Chunk]:
        """All that waits of one partition, in order, as chunks (events split at deletions).

        The other partitions' steps stay queued in their order: aggregates are
        per partition, and a row a deletion freed is not reused before its
        mark is folded, so folding one partition ahead changes nothing.
        """
        chunks: list[Chunk] = []
        steps: list[Applied] = []
        kept: deque[Applied] = deque()
        for step in self._steps:
            mine = step.partitions == partition
            if step.deleted.size:
                if mine.any():
                    if steps:
                        chunks.append(Chunk(steps, None, steps[0].applied_at))
                        steps = []
                    chunks.append(Chunk([], step.deleted, step.applied_at))
                else:
                    kept.append(step)
            elif mine.all():
                steps.append(step)
            elif mine.any():
                steps.append(step.select(mine))
                kept.append(step.select(~mine))
            else:
                kept.append(step)
        if steps:
            chunks.append(Chunk(steps, None, steps[0].applied_at))
        self._steps = kept
        self.events = sum(len(s) for s in kept)
        return chunks
