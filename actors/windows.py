"""Event-time windows: bucketing, per-partition watermarks, lateness, retention.

Metrics are kept per bucket of event time (a minute, an hour, a day), never per
arrival time, so a replay of history lands in the same buckets as live traffic.
Each partition has a watermark, the latest event time seen on it minus the
allowed lateness; an event older than the watermark it meets is *late*. Late
events are never silently lost: under :attr:`LatenessPolicy.DROP` they are only
counted, under :attr:`LatenessPolicy.CORRECT` they go to a separate correction
aggregate of their bucket, flagged as late, so readers can choose to include them.

Which events are late depends only on the events of a partition and their
order, not on how the stream is cut into batches; events that arrive out of
order by less than the allowed lateness are never late, so any such shuffle
gives the same numbers as in-order arrival (aggregates are order-free sums).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

import numpy as np


class Granularity(str, Enum):
    """Width of an event-time bucket."""

    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"

    @property
    def width_ms(self) -> int:
        """The bucket width in milliseconds."""
        return _WIDTH_MS[self]


_WIDTH_MS = {Granularity.MINUTE: 60_000, Granularity.HOUR: 3_600_000, Granularity.DAY: 86_400_000}

DEFAULT_RETENTION: dict[Granularity, int] = {
    Granularity.MINUTE: 180,
    Granularity.HOUR: 72,
    Granularity.DAY: 90,
}


class LatenessPolicy(str, Enum):
    """What happens to an event older than its partition's watermark."""

    DROP = "drop"  # counted in ``late_dropped``, not applied
    CORRECT = "correct"  # applied to the bucket's correction aggregate, counted


@dataclass(frozen=True)
class WindowConfig:
    """How windows treat time; plain values handed down from the settings.

    Attributes:
        allowed_lateness_ms: how far behind the newest event of its partition an
            event may be and still count as on time.
        policy: what to do with late events.
        retention: buckets kept per granularity (the newest ones by start).
    """

    allowed_lateness_ms: int = 300_000
    policy: LatenessPolicy = LatenessPolicy.CORRECT
    retention: dict[Granularity, int] = field(default_factory=lambda: dict(DEFAULT_RETENTION))

    def __post_init__(self) -> None:
        if self.allowed_lateness_ms < 0:
            raise ValueError("allowed_lateness_ms must be >= 0")
        if any(n < 1 for n in self.retention.values()):
            raise ValueError("retention must keep at least one bucket per granularity")


def bucket_starts(ts_ms: np.ndarray, granularity: Granularity) -> np.ndarray:
    """Start (epoch ms) of the bucket of each event time; floor division, so exact."""
    width = granularity.width_ms
    return (np.asarray(ts_ms, dtype=np.int64) // width) * width


class Watermarks:
    """The newest event time seen per partition, and from it which events are late."""

    def __init__(self, allowed_lateness_ms: int) -> None:
        self.allowed_lateness_ms = allowed_lateness_ms
        self._newest: dict[int, int] = {}

    def late_mask(self, partition: int, ts_ms: np.ndarray) -> np.ndarray:
        """Mark late events of one partition's batch (in arrival order) and advance.

        An event is late when it is older than the newest event seen before it
        on the partition minus the allowed lateness, so the answer does not
        depend on where batches are cut.
        """
        ts = np.asarray(ts_ms, dtype=np.int64)
        if ts.size == 0:
            return np.zeros(0, dtype=bool)
        newest = self._newest.get(partition, int(ts[0]))
        before = np.empty_like(ts)
        before[0] = newest
        before[1:] = np.maximum(np.maximum.accumulate(ts)[:-1], newest)
        self._newest[partition] = max(newest, int(ts.max()))
        return ts < before - self.allowed_lateness_ms

    def watermark(self, partition: int) -> int | None:
        """The partition's watermark (epoch ms), None before its first event."""
        newest = self._newest.get(partition)
        return None if newest is None else newest - self.allowed_lateness_ms

    def all(self) -> dict[int, int]:
        """Watermarks of every partition seen so far."""
        return {p: t - self.allowed_lateness_ms for p, t in self._newest.items()}


A = TypeVar("A")


class BucketStore(Generic[A]):
    """Aggregates keyed by (granularity, bucket start), pruned to the retention.

    The store only routes events to buckets; the caller folds each group in,
    so that it can reduce a whole batch with a few numpy calls per granularity.
    """

    def __init__(self, factory: Callable[[], A], retention: dict[Granularity, int]) -> None:
        self._factory = factory
        self._retention = retention
        self.buckets: dict[Granularity, dict[int, A]] = {g: {} for g in Granularity}

    def route(self, ts_ms: np.ndarray) -> Iterator[Routed[A]]:
        """Group events by bucket, once per granularity; prunes after each is folded in.

        Yields:
            Per granularity: the bucket aggregates (created when missing), the
            event positions sorted by bucket (arrival order kept within one),
            and the bounds of each bucket's run in that order.
        """
        if len(ts_ms) == 0:
            return
        for granularity, buckets in self.buckets.items():
            keys = bucket_starts(ts_ms, granularity)
            order = np.argsort(keys, kind="stable")
            sorted_keys = keys[order]
            cuts = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
            bounds = np.concatenate(([0], cuts, [len(order)]))
            aggregates = []
            for start in sorted_keys[bounds[:-1]].tolist():
                aggregate = buckets.get(start)
                if aggregate is None:
                    aggregate = buckets[start] = self._factory()
                aggregates.append(aggregate)
            yield Routed(aggregates, order, bounds)
            self._prune(granularity)

    def items(self) -> Iterator[tuple[Granularity, int, A]]:
        """Every (granularity, start, aggregate) held."""
        for granularity, buckets in self.buckets.items():
            for start, aggregate in buckets.items():
                yield granularity, start, aggregate

    def _prune(self, granularity: Granularity) -> None:
        """Drop the oldest buckets beyond the retention (the bound that keeps memory flat)."""
        buckets = self.buckets[granularity]
        excess = len(buckets) - self._retention[granularity]
        if excess > 0:
            for start in sorted(buckets)[:excess]:
                del buckets[start]


@dataclass(frozen=True)
class Routed(Generic[A]):
    """Events of one batch grouped by bucket, for one granularity (see BucketStore.route)."""

    aggregates: list[A]
    order: np.ndarray
    bounds: np.ndarray
