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

Buckets are kept per partition (:class:`BucketSlots`), so a partition's windows
can move to another shard, while one fold of many partitions' events costs a
few numpy calls per granularity.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from actors.sketches import HyperLogLog
from actors.state import _segmented_cummax


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
        """Mark late events of one partition's batch (in arrival order) and advance."""
        ts = np.asarray(ts_ms, dtype=np.int64)
        return self.late(np.full(len(ts), partition, dtype=np.int64), ts)

    def late(self, partitions: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
        """Mark late events of a batch (each partition's in arrival order) and advance.

        An event is late when it is older than the newest event seen before it
        on its partition minus the allowed lateness, so the answer does not
        depend on where batches are cut, nor on which partitions share one.
        """
        ts = np.asarray(ts_ms, dtype=np.int64)
        n = len(ts)
        if n == 0:
            return np.zeros(0, dtype=bool)
        order = np.argsort(partitions, kind="stable")
        parts, t = np.asarray(partitions, dtype=np.int64)[order], ts[order]
        head = np.r_[True, parts[1:] != parts[:-1]]
        starts = np.flatnonzero(head)
        gid = np.cumsum(head) - 1
        keys = parts[starts].tolist()
        prior = np.array(
            [self._newest.get(p, f) for p, f in zip(keys, t[starts].tolist(), strict=True)],
            dtype=np.int64,
        )
        before = np.empty(n, dtype=np.int64)
        before[1:] = _segmented_cummax(t, gid)[:-1]
        before[starts] = prior  # a partition's first event meets only what came before the batch
        before = np.maximum(before, prior[gid])
        newest = np.maximum(prior, np.maximum.reduceat(t, starts))
        self._newest.update(zip(keys, newest.tolist(), strict=True))
        late = np.empty(n, dtype=bool)
        late[order] = t < before - self.allowed_lateness_ms
        return late

    def watermark(self, partition: int) -> int | None:
        """The partition's watermark (epoch ms), None before its first event."""
        newest = self._newest.get(partition)
        return None if newest is None else newest - self.allowed_lateness_ms

    def all(self) -> dict[int, int]:
        """Watermarks of every partition seen so far."""
        return {p: t - self.allowed_lateness_ms for p, t in self._newest.items()}

    def export(self, partition: int) -> int | None:
        """A partition's newest event time (see :meth:`insert`)."""
        return self._newest.get(partition)

    def insert(self, partition: int, newest: int | None) -> None:
        """Take over a partition's newest event time."""
        if newest is not None:
            self._newest[partition] = int(newest)

    def forget(self, partition: int) -> None:
        """Drop a partition."""
        self._newest.pop(partition, None)


GRANULARITIES: tuple[Granularity, ...] = tuple(Granularity)  # minute first: the finest
_KEY_SHIFT = 42  # bucket numbers (start // width) stay far below 2**42
MAX_SKETCH_CELLS = 256  # cells whose sketches are built in one scratch matrix (4 KiB each)


@dataclass(frozen=True)
class Cells:
    """Events grouped by (partition, minute), and each cell's bucket slot per granularity."""

    inverse: np.ndarray  # the cell of each event
    slots: np.ndarray  # int64[len(GRANULARITIES), cells]

    @property
    def count(self) -> int:
        return self.slots.shape[1]

    def only(self, events: np.ndarray) -> Cells:
        """The cells of the events selected by the mask ``events`` (same slots)."""
        return Cells(self.inverse[events], self.slots)


class BucketSlots:
    """Sums, distinct-user sketches and top-id counters per (partition, granularity, start).

    Each bucket has a *slot*: a row of every column array, of the register
    matrix and of the counter list. A fold routes all its events at once
    (:meth:`route`), then adds each column with one ``bincount``
    (:meth:`add`), the users with one scatter (:meth:`add_users`) and ids with
    one ``unique`` (:meth:`count`). A partition keeps its newest
    ``retention[g]`` buckets per granularity (:meth:`prune`, after a fold).

    Args:
        retention: buckets kept per partition and granularity.
        columns: int64 column name -> width (values per bucket).
        precision: HyperLogLog precision of the users sketch (None: no sketch).
        counted: names of the bounded id counters per bucket.
        max_tracked: ids a counter holds before it is trimmed to its busiest half.
    """

    def __init__(
        self,
        retention: dict[Granularity, int],
        columns: dict[str, int],
        precision: int | None = None,
        counted: tuple[str, ...] = (),
        max_tracked: int = 2000,
    ) -> None:
        self.retention = retention
        self.widths = dict(columns)
        self.precision = precision
        self.counted = counted
        self.max_tracked = max_tracked
        self._m = 1 << precision if precision else 0
        self._cap = 0
        self.columns: dict[str, np.ndarray] = {}
        self.registers = np.zeros((0, self._m), dtype=np.uint8)
        self.counters: dict[str, list[Counter[str] | None]] = {name: [] for name in counted}
        self._slot: dict[int, int] = {}  # packed (partition, granularity, bucket) -> slot
        self._index: dict[int, dict[int, dict[int, int]]] = {}  # partition -> g -> start -> slot
        self._free: list[int] = []
        self._grown: set[tuple[int, int]] = set()  # (partition, g) given buckets this fold
        self.changed: set[int] = set()  # slots changed since the owner last cleared it
        self._grow(64)

    def cells(self, partitions: np.ndarray, ts: np.ndarray) -> Cells:
        """Group events into (partition, minute) cells and give each cell its bucket slots.

        A minute lies in one hour and one day, so the cells' slots serve every
        granularity: sums are reduced per cell once, then added to a few slots.
        Slots are made when missing.
        """
        parts = np.asarray(partitions, dtype=np.int64)
        minute = GRANULARITIES[0].width_ms
        keys = (parts << _KEY_SHIFT) | (np.asarray(ts, dtype=np.int64) // minute)
        unique, inverse = np.unique(keys, return_inverse=True)
        cell_parts, cell_minutes = unique >> _KEY_SHIFT, unique & ((1 << _KEY_SHIFT) - 1)
        slots = np.empty((len(GRANULARITIES), len(unique)), dtype=np.int64)
        get = self._slot.get
        for gi, g in enumerate(GRANULARITIES):
            buckets = cell_minutes * minute // g.width_ms
            keys = ((cell_parts * len(GRANULARITIES) + gi) << _KEY_SHIFT) | buckets
            found = np.fromiter((get(k, -1) for k in keys.tolist()), np.int64, len(keys))
            for i in np.flatnonzero(found < 0).tolist():
                found[i] = self._slot.get(int(keys[i]), -1)  # made by an earlier cell
                if found[i] < 0:
                    found[i] = self._new_slot(int(keys[i]))
            slots[gi] = found
        self.changed.update(slots.reshape(-1).tolist())
        return Cells(inverse.reshape(-1), slots)

    def _new_slot(self, key: int) -> int:
        if not self._free:
            self._grow(2 * self._cap)
        slot = self._free.pop()
        self._slot[key] = slot
        pg, bucket = key >> _KEY_SHIFT, key & ((1 << _KEY_SHIFT) - 1)
        partition, gi = divmod(pg, len(GRANULARITIES))
        start = bucket * GRANULARITIES[gi].width_ms
        self._index.setdefault(partition, {}).setdefault(gi, {})[start] = slot
        self._grown.add((partition, gi))
        return slot

    def add(
        self,
        column: str,
        cells: Cells,
        values: np.ndarray | None = None,
        sub: np.ndarray | None = None,
    ) -> None:
        """Add ``values`` (1 each when None) of events into ``column`` (at ``sub`` in its
        width), in the buckets of their cells, every granularity."""
        if not cells.inverse.size:
            return
        target = self.columns[column]
        width = target.shape[1]
        flat = cells.inverse * width + (0 if sub is None else sub)
        per_cell = np.bincount(flat, weights=values, minlength=cells.count * width)
        per_cell = per_cell.reshape(cells.count, width).astype(np.int64)
        for slots in cells.slots:
            np.add.at(target, slots, per_cell)

    def add_users(self, cells: Cells, hashes: np.ndarray) -> None:
        """Add users (their stable hashes) to the sketches of their cells' buckets."""
        if not cells.inverse.size:
            return
        idx, rank = hll_slots(hashes, self.precision or 0)
        m = self._m
        if cells.count <= MAX_SKETCH_CELLS:  # one scatter, then a row-wise max per granularity
            per_cell = np.zeros((cells.count, m), dtype=np.uint8)
            np.maximum.at(per_cell.reshape(-1), cells.inverse * m + idx, rank)
            for slots in cells.slots:
                np.maximum.at(self.registers, slots, per_cell)
        else:  # events spread over many minutes (a replay): scatter each granularity
            flat = self.registers.reshape(-1)
            for slots in cells.slots:
                np.maximum.at(flat, slots[cells.inverse] * m + idx, rank)

    def count(self, name: str, cells: Cells, codes: np.ndarray, names: Sequence[str]) -> None:
        """Count ids (``codes`` >= 0 into ``names``) per bucket, in the bounded counters."""
        has = codes >= 0
        if not has.any():
            return
        pairs, counts = np.unique(
            (cells.inverse[has] << 32) | codes[has], return_counts=True
        )  # (cell, id) pairs: one row per pair, not per event
        cell_of, code_of = pairs >> 32, pairs & 0xFFFFFFFF
        counters = self.counters[name]
        for slots in cells.slots:
            keys, inverse = np.unique((slots[cell_of] << 32) | code_of, return_inverse=True)
            sums = np.bincount(inverse, weights=counts).astype(np.int64).tolist()
            slot_of, id_of = (keys >> 32).tolist(), (keys & 0xFFFFFFFF).tolist()
            bounds = np.flatnonzero(np.diff(keys >> 32)) + 1
            for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), len(keys)], strict=True):
                counter = counters[slot_of[lo]]
                if counter is None:
                    counter = counters[slot_of[lo]] = Counter()
                ids = [names[c] for c in id_of[lo:hi]]
                counter.update(dict(zip(ids, sums[lo:hi], strict=True)))
                if len(counter) > self.max_tracked:
                    kept = _busiest(counter, self.max_tracked // 2)
                    counter.clear()
                    counter.update(kept)

    def prune(self) -> None:
        """Drop each partition's oldest buckets beyond the retention (memory stays flat)."""
        for partition, gi in self._grown:
            starts = self._index[partition][gi]
            excess = len(starts) - self.retention[GRANULARITIES[gi]]
            for start in sorted(starts)[: max(0, excess)]:
                self._drop(partition, gi, start)
        self._grown.clear()

    def _drop(self, partition: int, gi: int, start: int) -> None:
        slot = self._index[partition][gi].pop(start)
        del self._slot[self._key(partition, gi, start)]
        self._clear(slot)
        self._free.append(slot)

    @staticmethod
    def _key(partition: int, gi: int, start: int) -> int:
        width = GRANULARITIES[gi].width_ms
        return ((partition * len(GRANULARITIES) + gi) << _KEY_SHIFT) | (start // width)

    def buckets(self, partition: int) -> dict[Granularity, dict[int, int]]:
        """A partition's buckets: granularity -> start -> slot."""
        held = self._index.get(partition, {})
        return {g: dict(held.get(gi, {})) for gi, g in enumerate(GRANULARITIES)}

    def partitions(self) -> list[int]:
        """Partitions holding at least one bucket."""
        return sorted(p for p, held in self._index.items() if any(held.values()))

    def sketch(self, slot: int) -> bytes:
        """The users sketch of one slot, as :meth:`HyperLogLog.to_bytes` writes it."""
        return hll_bytes(self.registers[slot], self.precision or 0)

    def top(self, name: str, slot: int, n: int) -> dict[str, int]:
        """The ``n`` busiest ids of one slot's counter."""
        counter = self.counters[name][slot]
        return _busiest(counter, n) if counter else {}

    def export(self, partition: int) -> dict[str, Any]:
        """A partition's buckets as plain data (see :meth:`insert`)."""
        where = [
            (gi, start, slot)
            for gi, starts in sorted(self._index.get(partition, {}).items())
            for start, slot in sorted(starts.items())
        ]
        slots = np.array([slot for _, _, slot in where], dtype=np.int64)
        return {
            "granularity": [gi for gi, _, _ in where],
            "start": [start for _, start, _ in where],
            "columns": {name: column[slots] for name, column in self.columns.items()},
            "registers": self.registers[slots],
            "counters": {
                name: [dict(c) if (c := counters[s]) else {} for s in slots.tolist()]
                for name, counters in self.counters.items()
            },
        }

    def insert(self, partition: int, data: dict[str, Any]) -> None:
        """Take over a partition exported by :meth:`export` (not held here)."""
        slots = np.array(
            [
                self._new_slot(self._key(partition, int(gi), int(start)))
                for gi, start in zip(data["granularity"], data["start"], strict=True)
            ],
            dtype=np.int64,
        )
        for name, column in self.columns.items():
            column[slots] = data["columns"][name]
        self.registers[slots] = data["registers"]
        for name, counters in self.counters.items():
            for slot, counts in zip(slots.tolist(), data["counters"][name], strict=True):
                counters[slot] = Counter(counts) if counts else None
        self.changed.update(slots.tolist())

    def forget(self, partition: int) -> None:
        """Drop a partition's buckets."""
        for gi, starts in list(self._index.get(partition, {}).items()):
            for start in list(starts):
                self._drop(partition, gi, start)
        self._index.pop(partition, None)

    def _clear(self, slot: int) -> None:
        for column in self.columns.values():
            column[slot] = 0
        self.registers[slot] = 0
        for counters in self.counters.values():
            counters[slot] = None
        self.changed.add(slot)

    def _grow(self, cap: int) -> None:
        old = self._cap
        for name, width in self.widths.items():
            grown = np.zeros((cap, width), dtype=np.int64)
            if old:
                grown[:old] = self.columns[name]
            self.columns[name] = grown
        registers = np.zeros((cap, self._m), dtype=np.uint8)
        registers[:old] = self.registers
        self.registers = registers
        for counters in self.counters.values():
            counters.extend([None] * (cap - old))
        self._free.extend(range(cap - 1, old - 1, -1))  # lowest slots first
        self._cap = cap

    def nbytes(self) -> int:
        """Bytes of the column and register arrays."""
        return sum(c.nbytes for c in self.columns.values()) + self.registers.nbytes


def _busiest(counter: Counter[str], n: int) -> dict[str, int]:
    """The ``n`` largest counts, ties by id: the same whatever order ids were counted in."""
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:n])


def hll_slots(hashes: np.ndarray, precision: int) -> tuple[np.ndarray, np.ndarray]:
    """Register index and rank of each hash, exactly as ``HyperLogLog.add_hashes`` does."""
    h = np.asarray(hashes, dtype=np.uint64)
    tail = 64 - precision
    idx = (h >> np.uint64(tail)).astype(np.int64)
    rest = (h & np.uint64((1 << tail) - 1)) | np.uint64(1 << tail)
    rank = np.frexp((rest & (~rest + np.uint64(1))).astype(np.float64))[1].astype(np.uint8)
    return idx, rank


def hll_bytes(registers: np.ndarray, precision: int) -> bytes:
    """Registers as :meth:`HyperLogLog.to_bytes` writes them (so merges read them back)."""
    return HyperLogLog._MAGIC + bytes([precision]) + registers.tobytes()
