"""Event de-duplication by ``event_id`` within a horizon of stream time, in bounded memory.

JetStream drops a re-sent *message* within its duplicate window, but the same
event can come back in another message: a producer that retries a whole batch
after a crash, a webhook delivered twice, an SDK that re-sends. A shard keeps a
64-bit hash of every event id it applied, in buckets of *stream time* (when
JetStream stored the message that carried it); a bucket is dropped once it is
older than the horizon behind the newest stream time, and the oldest ones early
if the hashes would exceed ``max_ids``. So: an event id is applied once when its
repeats reach the stream within the horizon of the first (exactly once there);
a repeat later than that is applied again (at least once). Stream time, not
event time: a re-send happens soon after the first send whatever the event's
own time says, and stored times come back unchanged when a shard replays its
partitions, so the replay rebuilds this state and takes the same decisions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from actors.sketches import stable_hash64


@dataclass(frozen=True)
class DedupConfig:
    """Knobs of the de-duplication.

    Attributes:
        horizon_ms: how long after the first copy reached the stream a repeat is caught.
        buckets: the horizon is kept in this many stream-time buckets.
        max_ids: most hashes held; the oldest buckets go first beyond it.
    """

    horizon_ms: int = 24 * 3_600_000
    buckets: int = 8
    max_ids: int = 20_000_000

    def __post_init__(self) -> None:
        if self.horizon_ms <= 0 or self.buckets < 1 or self.max_ids < 1:
            raise ValueError("horizon_ms, buckets and max_ids must be positive")


class _Bucket:
    """The hashes of one slice of stream time, as a few sorted runs of growing size.

    A batch's new hashes become a run; while the newest run is at least a quarter
    of the one before, the two merge (a stable sort of two sorted runs is a
    linear merge). So a bucket holds O(log n) runs, a lookup is one binary
    search per run, and no batch pays for re-sorting the whole bucket.
    """

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []  # sorted uint64 arrays, largest first

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        found = np.zeros(len(hashes), dtype=bool)
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, hashes), len(run) - 1)
            found |= run[at] == hashes
        return found

    def add(self, hashes: np.ndarray) -> None:
        run = np.sort(hashes)
        while self.runs and len(self.runs[-1]) <= 4 * len(run):
            run = np.sort(np.concatenate([self.runs.pop(), run]), kind="stable")
        self.runs.append(run)


class EventDeduper:
    """Which events of a batch were applied before (or repeat within the batch)."""

    def __init__(self, config: DedupConfig | None = None) -> None:
        self.config = config or DedupConfig()
        self._width = max(1, self.config.horizon_ms // self.config.buckets)
        self._buckets: dict[int, _Bucket] = {}
        self._newest: int | None = None
        self.duplicates = 0
        self.evicted_early = 0  # buckets dropped before the horizon to stay under max_ids

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def fresh(self, event_ids: Sequence[str], ts: np.ndarray) -> np.ndarray:
        """A keep-mask: True for events seen for the first time, which are then remembered.

        ``ts`` is each event's stream time (epoch ms its message was stored at).
        """
        n = len(event_ids)
        keep = np.ones(n, dtype=bool)
        if not n:
            return keep
        hashes = stable_hash64(event_ids)
        unique, first = np.unique(hashes, return_index=True)  # sorted: cache-friendly lookups
        seen = np.zeros(len(unique), dtype=bool)
        for bucket in self._buckets.values():
            seen |= bucket.contains(unique)
        new = first[~seen]  # a repeat inside the batch: its first copy counts
        keep[:] = False
        keep[new] = True
        self._remember(unique[~seen], ts[new])
        self.duplicates += int(n - len(new))
        return keep

    def _remember(self, hashes: np.ndarray, ts: np.ndarray) -> None:
        if not len(hashes):
            return
        newest = int(ts.max())
        self._newest = newest if self._newest is None else max(self._newest, newest)
        slots = ts // self._width
        for slot in np.unique(slots).tolist():
            self._buckets.setdefault(slot, _Bucket()).add(hashes[slots == slot])
        self._expire()

    def _expire(self) -> None:
        assert self._newest is not None
        oldest_kept = (self._newest - self.config.horizon_ms) // self._width
        for slot in [s for s in self._buckets if s < oldest_kept]:
            del self._buckets[slot]
        while len(self._buckets) > 1 and len(self) > self.config.max_ids:
            del self._buckets[min(self._buckets)]
            self.evicted_early += 1

    def nbytes(self) -> int:
        """Bytes of the hashes held."""
        return 8 * len(self)
