"""Prometheus metrics of a shard, through Ray's metrics API (exported by every Ray node).

Kept at the edge with the actor: :class:`ShardMetrics` turns what one apply
step did into counters, histograms and gauges; Ray's metrics agent serves them
as ``ray_audience_*`` on the node's metrics export port.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterable, Mapping

from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_BOUNDARIES_MS: list[float] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
LAG_EVERY_S = 1.0


class ShardMetrics:
    """The metrics one shard actor reports, tagged with its shard id."""

    def __init__(self, shard_id: int) -> None:
        self._tags = {"shard": str(shard_id)}
        self.applied = Counter(
            "audience_events_applied", "Events applied to per-user state.", tag_keys=("shard",)
        )
        self.rejected = Counter(
            "audience_events_dead_lettered",
            "Events a shard refused and dead-lettered, by reason.",
            tag_keys=("shard", "reason"),
        )
        self.apply_ms = Histogram(
            "audience_apply_latency_ms",
            "Time to decode, check and apply one step of messages.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("shard",),
        )
        self.freshness_ms = Histogram(
            "audience_freshness_ms",
            "Delay from JetStream storing a step's oldest message to its events being applied "
            "(one observation per apply step).",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("shard",),
        )
        self.lag = Gauge(
            "audience_partition_lag",
            "Messages of a partition stored but not yet delivered to its shard.",
            tag_keys=("shard", "partition"),
        )
        self._lag_at = 0.0

    def record_apply(
        self,
        applied: int,
        seconds: float,
        stored_ns: Iterable[int],
        rejected_reasons: Iterable[str],
    ) -> None:
        """Account for one apply step."""
        if applied:
            self.applied.inc(applied, tags=self._tags)
        self.apply_ms.observe(seconds * 1000, tags=self._tags)
        oldest = min(stored_ns, default=None)  # each observation costs: one per step
        if oldest is not None:
            self.freshness_ms.observe((time.time_ns() - oldest) / 1e6, tags=self._tags)
        for reason, n in Tally(rejected_reasons).items():
            self.rejected.inc(n, tags={**self._tags, "reason": reason})

    def record_lag(self, pending: Mapping[int, int]) -> None:
        """Per-partition lag, at most once a second (gauges need no more)."""
        now = time.monotonic()
        if now - self._lag_at < LAG_EVERY_S:
            return
        self._lag_at = now
        for partition, n in pending.items():
            self.lag.set(n, tags={**self._tags, "partition": str(partition)})
