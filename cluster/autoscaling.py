"""How many shard actors the stream needs: one policy from lag and busy time.

Plain Python, fed with samples a controller takes from the shards (the
cumulative busy seconds each shard spent applying, and the messages each
partition still has on the server). The rules follow Kubernetes' HPA, which
operators already know:

* **Utilisation.** ``desired = ceil(busy shards' work / target utilisation)``:
  with two shards each 90% busy and a 60% target, three shards would carry it.
* **Lag.** When the stream's backlog grows over the window, or is more than the
  shards can drain in ``drain_target_s`` at their measured rate, one more shard
  than utilisation asks for (busy time alone misses a shard that is starved of
  CPU or waiting on NATS).
* **Tolerance.** A change inside ±``tolerance`` of the target does nothing.
* **Stabilisation.** A scale-up takes the lowest recommendation of the last
  ``up_window_s`` (a short spike does not add shards); a scale-down the highest
  of the last ``down_window_s`` (one quiet minute does not remove them).
* **Bounds.** Between ``min_shards`` and ``max_shards`` (at most the partitions).

The policy recommends; actuation (moving partitions) is the pool's.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScalingPolicy:
    """Bounds, target and windows of the shard count."""

    min_shards: int = 1
    max_shards: int = 8
    target_utilisation: float = 0.6
    tolerance: float = 0.1
    drain_target_s: float = 30.0
    up_window_s: float = 30.0
    down_window_s: float = 300.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_shards <= self.max_shards:
            raise ValueError("need 1 <= min_shards <= max_shards")
        if not 0 < self.target_utilisation <= 1:
            raise ValueError("target_utilisation must be in (0, 1]")
        if self.up_window_s < 0 or self.down_window_s < 0 or self.drain_target_s <= 0:
            raise ValueError("windows must be >= 0 and drain_target_s > 0")


@dataclass(frozen=True)
class LoadSample:
    """What the shards reported at one moment.

    Attributes:
        at_s: when (seconds, any monotonic origin).
        busy_s: per shard, cumulative seconds spent applying events.
        applied: per shard, cumulative messages applied.
        backlog: messages stored but not yet applied, over all partitions.
    """

    at_s: float
    busy_s: tuple[float, ...]
    applied: tuple[int, ...]
    backlog: int


@dataclass(frozen=True)
class Decision:
    """One recommendation and why, for ``audience status`` and the dashboard."""

    at_s: float
    current: int
    desired: int
    utilisation: float
    backlog: int
    reason: str

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "at_s": round(self.at_s, 3),
            "current": self.current,
            "desired": self.desired,
            "utilisation": round(self.utilisation, 3),
            "backlog": self.backlog,
            "reason": self.reason,
        }


@dataclass
class ShardAutoscaler:
    """Turns successive load samples into a stabilised desired shard count."""

    policy: ScalingPolicy
    partitions: int
    _previous: LoadSample | None = None
    _first_at: float | None = None
    _raw: deque[tuple[float, int]] = field(default_factory=deque)  # (at_s, unstabilised)
    _backlogs: deque[tuple[float, int]] = field(default_factory=deque)

    def observe(self, sample: LoadSample) -> Decision | None:
        """Feed one sample; a decision once two samples give rates (None before)."""
        previous, self._previous = self._previous, sample
        if self._first_at is None:
            self._first_at = sample.at_s
        self._backlogs.append((sample.at_s, sample.backlog))
        if previous is None or len(previous.busy_s) != len(sample.busy_s):
            return None  # the first sample, or the shard count just changed: rates unknown
        elapsed = sample.at_s - previous.at_s
        if elapsed <= 0:
            return None
        current = len(sample.busy_s)
        busy = sum(max(0.0, b - a) for a, b in zip(previous.busy_s, sample.busy_s, strict=True))
        utilisation = busy / elapsed / current
        applied = sum(max(0, b - a) for a, b in zip(previous.applied, sample.applied, strict=True))
        raw, reason = self._recommend(current, utilisation, applied / elapsed, sample)
        self._raw.append((sample.at_s, raw))
        first_at = sample.at_s if self._first_at is None else self._first_at
        desired = self._stabilised(current, sample.at_s, first_at)
        if desired != raw:
            reason += f"; stabilised to {desired}"
        return Decision(sample.at_s, current, desired, utilisation, sample.backlog, reason)

    def _recommend(
        self, current: int, utilisation: float, rate: float, sample: LoadSample
    ) -> tuple[int, str]:
        """The unstabilised shard count for this sample, and why."""
        p = self.policy
        ratio = utilisation / p.target_utilisation
        if abs(ratio - 1) <= p.tolerance:
            want, reason = current, f"utilisation {utilisation:.0%} near target"
        else:
            want = max(1, math.ceil(current * ratio))
            reason = f"utilisation {utilisation:.0%} vs target {p.target_utilisation:.0%}"
        growing = self._backlog_growing(sample.at_s)
        drain_s = sample.backlog / rate if rate > 0 else (math.inf if sample.backlog else 0.0)
        if sample.backlog and (growing or drain_s > p.drain_target_s):
            if want <= current:
                want = current + 1
            why = "growing" if growing else f"{drain_s:.0f} s to drain"
            reason += f"; backlog {sample.backlog} messages ({why})"
        upper = min(p.max_shards, self.partitions)
        bounded = min(max(want, p.min_shards), upper)
        if bounded != want:
            reason += f"; bounded to [{p.min_shards}, {upper}]"
        return bounded, reason

    def _backlog_growing(self, now_s: float) -> bool:
        """Whether the backlog rose over the scale-up window (oldest sample in it vs now)."""
        while len(self._backlogs) > 2 and self._backlogs[1][0] <= now_s - self.policy.up_window_s:
            self._backlogs.popleft()
        return len(self._backlogs) >= 2 and self._backlogs[-1][1] > self._backlogs[0][1]

    def _stabilised(self, current: int, now_s: float, first_at: float) -> int:
        """Lowest recent recommendation for going up, highest for going down."""
        p = self.policy
        horizon = max(p.up_window_s, p.down_window_s)
        while self._raw and self._raw[0][0] < now_s - horizon:
            self._raw.popleft()
        up = [n for at, n in self._raw if at >= now_s - p.up_window_s]
        down = [n for at, n in self._raw if at >= now_s - p.down_window_s]
        if min(up) > current:
            return min(up)
        # Down only once the window is covered: no history is no evidence of quiet.
        if max(down) < current and now_s - first_at >= p.down_window_s:
            return max(down)
        return current
