"""Event de-duplication by ``event_id`` within a horizon of stream time, in bounded memory.

JetStream drops a re-sent *message* within its duplicate window, but the same
event can come back in another message: a producer that retries a whole batch
after a crash, a webhook delivered twice, an SDK that re-sends. A shard keeps a
64-bit hash of every event id it applied, tagged with the *stream time* bucket
(when JetStream stored the message that carried it) and the partition; a
partition's buckets older than the horizon behind its newest stream time are
dead, and its oldest ones die early if its hashes would exceed ``max_ids``. So:
an event id is applied once when its repeats reach the stream within the
horizon of the first (exactly once there); a repeat later than that is applied
again (at least once). Stream time, not event time: a re-send happens soon after
the first send whatever the event's own time says, and stored times come back
unchanged when a shard replays its partitions, so the replay rebuilds this state
and takes the same decisions.

Every partition decides alone (its ids, its buckets, its bounds), so a partition
can be exported and inserted elsewhere; one step looks up the events of all its
partitions at once. The hashes live in a few sorted runs of growing size: a
step's new hashes become a run, and runs merge (dropping dead entries) while the
newest is at least a quarter of the one before, so a lookup is one binary search
per run and no step pays for re-sorting everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.sketches import stable_hash64

_PART_BITS = 12  # the low bits of a key hold the partition: P is at most 4096
_PART_MASK = np.uint64((1 << _PART_BITS) - 1)
MAX_PARTITIONS = 1 << _PART_BITS


@dataclass(frozen=True)
class DedupConfig:
    """Knobs of the de-duplication.

    Attributes:
        horizon_ms: how long after the first copy reached the stream a repeat is caught.
        buckets: the horizon is kept in this many stream-time buckets.
        max_ids: most hashes held per partition; its oldest buckets go first beyond it.
    """

    horizon_ms: int = 24 * 3_600_000
    buckets: int = 8
    max_ids: int = 20_000_000

    def __post_init__(self) -> None:
        if self.horizon_ms <= 0 or self.buckets < 1 or self.max_ids < 1:
            raise ValueError("horizon_ms, buckets and max_ids must be positive")


@dataclass
class _Partition:
    """One partition's bounds: its newest stream time and the live hashes per bucket."""

    newest: int | None = None
    floor: int = -(2**62)  # buckets below it are dead
    counts: dict[int, int] | None = None  # live bucket -> hashes
    total: int = 0  # the sum of counts
    duplicates: int = 0
    evicted_early: int = 0  # buckets dropped before the horizon to stay under max_ids


class EventDeduper:
    """Which events of a batch were applied before (or repeat within the batch)."""

    def __init__(self, config: DedupConfig | None = None) -> None:
        self.config = config or DedupConfig()
        self._width = max(1, self.config.horizon_ms // self.config.buckets)
        self._keys: list[np.ndarray] = []  # sorted uint64 runs, largest first
        self._buckets: list[np.ndarray] = []  # int64 bucket of each key, aligned
        self._parts: dict[int, _Partition] = {}
        self._floors = np.full(0, -(2**62), dtype=np.int64)  # by partition number

    def __len__(self) -> int:
        """Live hashes held."""
        return sum(sum((p.counts or {}).values()) for p in self._parts.values())

    @property
    def duplicates(self) -> int:
        """Events found to repeat an earlier one, over all partitions."""
        return sum(p.duplicates for p in self._parts.values())

    @property
    def evicted_early(self) -> int:
        """Buckets dropped before the horizon to stay under ``max_ids``."""
        return sum(p.evicted_early for p in self._parts.values())

    def fresh(
        self, event_ids: Sequence[str], ts: np.ndarray, partitions: np.ndarray | None = None
    ) -> np.ndarray:
        """A keep-mask: True for events seen for the first time, which are then remembered.

        ``ts`` is each event's stream time (epoch ms its message was stored at),
        ``partitions`` each event's partition (all 0 when None).
        """
        n = len(event_ids)
        keep = np.ones(n, dtype=bool)
        if not n:
            return keep
        parts = np.zeros(n, np.int64) if partitions is None else partitions.astype(np.int64)
        if int(parts.max()) >= MAX_PARTITIONS:
            raise ValueError(f"partitions must be below {MAX_PARTITIONS}")
        keys = (stable_hash64(event_ids) & ~_PART_MASK) | parts.astype(np.uint64)
        unique, first = np.unique(keys, return_index=True)  # sorted: cache-friendly lookups
        self._ensure_partitions(int(parts.max()) + 1)
        floors = self._floors[parts[first]]
        seen = np.zeros(len(unique), dtype=bool)
        for run, buckets in zip(self._keys, self._buckets, strict=True):
            if not len(run):
                continue
            at = np.minimum(np.searchsorted(run, unique), len(run) - 1)
            seen |= (run[at] == unique) & (buckets[at] >= floors)
        new = first[~seen]  # a repeat inside the batch: its first copy counts
        keep[:] = False
        keep[new] = True
        if len(new) < n:
            dropped = np.bincount(parts[~keep], minlength=len(self._floors))
            for p in np.flatnonzero(dropped).tolist():
                self._partition(p).duplicates += int(dropped[p])
        self._remember(unique[~seen], ts[new] // self._width, parts[new], ts[new])
        return keep

    def _partition(self, p: int) -> _Partition:
        state = self._parts.get(p)
        if state is None:
            state = self._parts[p] = _Partition(counts={})
        return state

    def _ensure_partitions(self, n: int) -> None:
        if n > len(self._floors):
            grown = np.full(n, -(2**62), dtype=np.int64)
            grown[: len(self._floors)] = self._floors
            self._floors = grown

    def _remember(
        self, keys: np.ndarray, buckets: np.ndarray, parts: np.ndarray, ts: np.ndarray
    ) -> None:
        if not len(keys):
            return
        self._add_run(keys, buckets)  # keys came sorted from np.unique
        low = int(buckets.min())
        span = int(buckets.max()) - low + 1  # a step spans a bucket or two
        counts = np.bincount(parts * span + (buckets - low))
        pairs = np.flatnonzero(counts)
        for pair, count in zip(pairs.tolist(), counts[pairs].tolist(), strict=True):
            p, bucket = divmod(pair, span)
            state = self._partition(p)
            assert state.counts is not None
            state.counts[bucket + low] = state.counts.get(bucket + low, 0) + count
            state.total += count
        newest = np.full(int(parts.max()) + 1, np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(newest, parts, ts)
        for p in np.flatnonzero(newest > np.iinfo(np.int64).min).tolist():
            state = self._partition(p)
            top = int(newest[p])
            state.newest = top if state.newest is None else max(state.newest, top)
            self._expire(p, state)

    def _expire(self, p: int, state: _Partition) -> None:
        assert state.newest is not None and state.counts is not None
        floor = max(state.floor, (state.newest - self.config.horizon_ms) // self._width)
        counts = state.counts
        if counts and min(counts) < floor:
            for bucket in [b for b in counts if b < floor]:
                state.total -= counts.pop(bucket)
        while len(counts) > 1 and state.total > self.config.max_ids:
            oldest = min(counts)
            state.total -= counts.pop(oldest)
            floor = max(floor, oldest + 1)
            state.evicted_early += 1
        state.floor = floor
        self._floors[p] = floor

    def _add_run(self, keys: np.ndarray, buckets: np.ndarray) -> None:
        while self._keys and len(self._keys[-1]) <= 4 * len(keys):
            older, older_buckets = self._keys.pop(), self._buckets.pop()
            at = np.searchsorted(older, keys)  # a linear merge of two sorted runs
            keys, buckets = np.insert(older, at, keys), np.insert(older_buckets, at, buckets)
            alive = buckets >= self._floors[(keys & _PART_MASK).astype(np.int64)]
            if not alive.all():
                keys, buckets = keys[alive], buckets[alive]
        self._keys.append(keys)
        self._buckets.append(buckets)

    def export(self, partition: int) -> dict[str, Any]:
        """One partition's live hashes and bounds, as plain data (see :meth:`insert`)."""
        state = self._parts.get(partition) or _Partition(counts={})
        keys, buckets = self._live(partition)
        return {
            "keys": keys,
            "buckets": buckets,
            "newest": state.newest,
            "floor": state.floor,
            "counts": dict(state.counts or {}),
            "duplicates": state.duplicates,
            "evicted_early": state.evicted_early,
        }

    def insert(self, partition: int, data: dict[str, Any]) -> None:
        """Take over a partition exported by :meth:`export` (not held here)."""
        self._ensure_partitions(partition + 1)
        self._parts[partition] = _Partition(
            newest=data["newest"],
            floor=int(data["floor"]),
            counts={int(b): int(c) for b, c in data["counts"].items()},
            total=sum(int(c) for c in data["counts"].values()),
            duplicates=int(data["duplicates"]),
            evicted_early=int(data["evicted_early"]),
        )
        self._floors[partition] = int(data["floor"])
        keys = np.asarray(data["keys"], dtype=np.uint64)
        if len(keys):
            self._add_run(keys, np.asarray(data["buckets"], dtype=np.int64))

    def forget(self, partition: int) -> None:
        """Drop a partition's hashes (its new owner has them)."""
        if self._parts.pop(partition, None) is None:
            return
        keys, buckets = [], []
        for run, tags in zip(self._keys, self._buckets, strict=True):
            other = (run & _PART_MASK) != np.uint64(partition)
            if other.any():
                keys.append(run[other])
                buckets.append(tags[other])
        self._keys, self._buckets = keys, buckets
        self._floors[partition] = -(2**62)

    def _live(self, partition: int) -> tuple[np.ndarray, np.ndarray]:
        """The live keys (sorted) and buckets of one partition."""
        if partition >= len(self._floors):
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        floor = self._floors[partition]
        keys, buckets = [], []
        for run, tags in zip(self._keys, self._buckets, strict=True):
            mine = ((run & _PART_MASK) == np.uint64(partition)) & (tags >= floor)
            keys.append(run[mine])
            buckets.append(tags[mine])
        if not keys:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        all_keys, all_buckets = np.concatenate(keys), np.concatenate(buckets)
        order = np.argsort(all_keys, kind="stable")
        return all_keys[order], all_buckets[order]

    def nbytes(self) -> int:
        """Bytes of the hashes and buckets held (live or awaiting a merge)."""
        return sum(k.nbytes + b.nbytes for k, b in zip(self._keys, self._buckets, strict=True))
