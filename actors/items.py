"""Item state kept in the stream: per-item counts and times, and co-visitation.

Personalization needs to know, for any two items, how often users touched one
shortly after the other (co-visitation), and per item how popular it is and
when it was in use. A shard learns both from its own users, right after each
apply step: an item a user pushes into its recent-items ring is paired with the
``window`` items before it there, weighted ``1/d`` by distance ``d``, in both
directions. Each item also has a heat, the log2 of its events' weights
``2**(ts / half-life)``: comparing heats ranks items by decayed recent activity
(trending) without a reference time, and shards merge them with ``logaddexp2``.
Pair weights wait in a buffer and are folded into sorted
``(key, weight)`` arrays (one key per unordered pair), pruned to the heaviest
``max_pairs`` so memory stays bounded. Shards export partials (top neighbours
per item and the item stats, with item ids as strings) that serving merges
across shards by summing.

A shard's graph holds every partition it owns, each on its own: an item's stats
and pairs are kept per (partition, item), so a partition's part can be exported
and inserted elsewhere, while one flush serves all of them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.batch import EventBatch
from actors.events import TYPE_CODE, EventType
from actors.state import DAY_MS, UserStateTable

_NO_TIME = np.iinfo(np.int64).max
TRENDING_HALF_LIFE_MS = 86_400_000  # an item event counts half as much for trending a day later
_POSITIVE = [
    TYPE_CODE[t]
    for t in (EventType.LIKE, EventType.SHARE, EventType.ADD_TO_CART, EventType.PURCHASE)
]


_LOW = 0xFFFFFFFF  # the later slot of a pair key (a << 32 | b)


@dataclass(frozen=True)
class ItemGraphConfig:
    """Knobs of the item state.

    Attributes:
        window: how many earlier recent items each new item is paired with.
        max_pairs: co-visitation pairs kept per partition; the lightest are pruned beyond it.
        compact_every: buffered pair entries that trigger a fold into the arrays.
        flush_every: observed events that trigger a :meth:`ItemGraph.flush`.
    """

    window: int = 20
    max_pairs: int = 4_000_000
    compact_every: int = 4_000_000
    flush_every: int = 20_000

    def __post_init__(self) -> None:
        if min(self.window, self.max_pairs, self.compact_every, self.flush_every) < 1:
            raise ValueError("window, max_pairs, compact_every and flush_every must be positive")


class ItemGraph:
    """Item statistics and co-visitation for the users of a shard's partitions.

    Items are the :class:`~actors.state.UserStateTable`'s item ids, so nothing
    is interned twice; each (partition, item) has a slot in the stat arrays,
    and partials translate slots to item ids as strings.
    """

    def __init__(self, config: ItemGraphConfig | None = None) -> None:
        self.config = config or ItemGraphConfig()
        self.count = np.zeros(0, dtype=np.int64)
        self.heat = np.zeros(0, dtype=np.float64)  # log2 of sum 2**(ts / half-life): trending
        self.positive = np.zeros(0, dtype=np.int64)  # likes, shares, carts, purchases
        self.first = np.zeros(0, dtype=np.int64)
        self.last = np.zeros(0, dtype=np.int64)
        self.sum_days = np.zeros(0, dtype=np.float64)
        self.sum_days2 = np.zeros(0, dtype=np.float64)
        self.category = np.zeros(0, dtype=np.int64)  # the table's category id, -1 none
        self.item = np.zeros(0, dtype=np.int64)  # item id of each slot
        self.partition = np.zeros(0, dtype=np.int64)  # partition of each slot, -1 free
        self._slots: dict[int, int] = {}  # item * _SPAN + partition -> slot
        self._free: list[int] = []
        self._keys = np.zeros(0, dtype=np.int64)  # sorted (slot a << 32) | slot b, a < b
        self._weights = np.zeros(0, dtype=np.float32)
        self._pending_keys: list[np.ndarray] = []
        self._pending_weights: list[np.ndarray] = []
        self._pending = 0
        self._counts_pending: list[tuple[np.ndarray, ...]] = []
        self._pairs_pending: list[tuple[np.ndarray, ...]] = []
        self._pending_events = 0
        self.observed_steps = 0  # steps with pushes ever observed: the pace flushes keep
        self.pruned_pairs = 0
        # Bumped by every observe of a partition: partials of equal versions are equal.
        self.versions: dict[int, int] = {}

    def __len__(self) -> int:
        """(Partition, item) slots with at least one event (as of the last flush)."""
        return int(np.count_nonzero(self.count))

    @property
    def version(self) -> int:
        """Observes so far, over all partitions."""
        return sum(self.versions.values())

    def observe(
        self,
        table: UserStateTable,
        batch: EventBatch,
        partitions: np.ndarray | None = None,
        auto_flush: bool = True,
    ) -> None:
        """Take in ``batch``, which ``table`` just applied (its ``last_*`` fields).

        ``partitions[i]`` is event ``i``'s partition (all 0 when None). The work
        is deferred to :meth:`flush` (by :meth:`partial`, or the shard's fold):
        many small apply steps then cost a few large numpy calls, not many small
        ones on the freshness path. What is kept are references to arrays that
        the table replaces on its next apply, not views of its state. Without
        ``auto_flush`` the caller flushes when :meth:`due` (a shard, off its apply path).
        """
        parts = np.zeros(len(batch), np.int64) if partitions is None else partitions
        codes = table.last_item_codes
        has = np.flatnonzero(codes >= 0)
        if has.size:
            self._counts_pending.append(
                (
                    codes[has],
                    parts[has],
                    batch.ts[has],
                    table.last_category_codes[has],
                    batch.type[has],
                )
            )
        push_rows, push_codes = table.last_pushes
        if push_rows.size:
            before_rows, before = table.last_recent_before
            self._pairs_pending.append(
                (before_rows, before, push_rows, push_codes, table.partitions_of_rows(push_rows))
            )
            self.observed_steps += 1
        for p in np.flatnonzero(np.bincount(parts)).tolist():
            self.versions[p] = self.versions.get(p, 0) + 1
        self._pending_events += len(batch)
        if auto_flush and self.due():
            self.flush()

    def due(self) -> bool:
        """Whether ``flush_every`` observed events wait for :meth:`flush`."""
        return self._pending_events >= self.config.flush_every

    def flush(
        self, deadline: float | None = None, partition: int | None = None, least: int = 1
    ) -> None:
        """Fold what :meth:`observe` deferred into the item stats and the pair buffer.

        With a ``deadline`` (a ``time.perf_counter()`` value), pairing stops
        there once ``least`` steps are done; the steps left wait for the next call.
        With a ``partition``, only what it observed (before its export): the
        other partitions' entries wait, in their order.
        """
        if partition is not None:
            self._flush_partition(partition)
            return
        counts, self._counts_pending = self._counts_pending, []
        self._pending_events = 0
        if counts:
            codes, parts, ts, categories, types = (
                np.concatenate(c) for c in zip(*counts, strict=True)
            )
            self._count_items(
                self._slot_of(codes, parts), ts, categories, np.isin(types, _POSITIVE)
            )
        done = 0
        while self._pairs_pending:  # each pairs against the rings as they were before it
            self._pair(*self._pairs_pending.pop(0))
            done += 1
            if deadline is not None and done >= least and time.perf_counter() >= deadline:
                break

    def _flush_partition(self, partition: int) -> None:
        counts, self._counts_pending = self._counts_pending, []
        for entry in counts:
            mine = entry[1] == partition
            if mine.any():
                codes, parts, ts, categories, types = (column[mine] for column in entry)
                self._count_items(
                    self._slot_of(codes, parts), ts, categories, np.isin(types, _POSITIVE)
                )
            if not mine.all():
                self._counts_pending.append(tuple(column[~mine] for column in entry))
        steps, self._pairs_pending = self._pairs_pending, []
        for before_rows, before, push_rows, push_codes, push_parts in steps:
            mine = push_parts == partition
            kept = np.isin(before_rows, push_rows[~mine])
            if mine.any():
                self._pair(
                    before_rows[~kept],
                    before[~kept],
                    push_rows[mine],
                    push_codes[mine],
                    push_parts[mine],
                )
            if not mine.all():
                self._pairs_pending.append(
                    (
                        before_rows[kept],
                        before[kept],
                        push_rows[~mine],
                        push_codes[~mine],
                        push_parts[~mine],
                    )
                )

    @property
    def unflushed(self) -> bool:
        """Whether observed steps still wait for :meth:`flush`."""
        return bool(self._pairs_pending or self._counts_pending)

    def _slot_of(self, items: np.ndarray, parts: np.ndarray) -> np.ndarray:
        """The stat slot of each (item, partition), made when missing."""
        keys = items * _SPAN + parts
        unique, inverse = np.unique(keys, return_inverse=True)
        get = self._slots.get
        slots = np.fromiter((get(k, -1) for k in unique.tolist()), np.int64, len(unique))
        for i in np.flatnonzero(slots < 0).tolist():
            slots[i] = self._new_slot(int(unique[i]))
        return slots[inverse]

    def _new_slot(self, key: int) -> int:
        if self._free:
            slot = self._free.pop()
        else:
            slot = len(self._slots)
            self._grow(slot + 1)
        self._slots[key] = slot
        self.item[slot], self.partition[slot] = divmod(key, _SPAN)
        return slot

    def _count_items(
        self, slots: np.ndarray, ts: np.ndarray, categories: np.ndarray, positive: np.ndarray
    ) -> None:
        days = ts / DAY_MS
        np.add.at(self.count, slots, 1)
        np.logaddexp2.at(self.heat, slots, ts / TRENDING_HALF_LIFE_MS)
        np.add.at(self.positive, slots[positive], 1)
        np.minimum.at(self.first, slots, ts)
        np.maximum.at(self.last, slots, ts)
        np.add.at(self.sum_days, slots, days)
        np.add.at(self.sum_days2, slots, days * days)
        known = categories >= 0
        self.category[slots[known]] = categories[known]  # the latest category wins

    def _pair(
        self,
        before_rows: np.ndarray,
        before: np.ndarray,
        push_rows: np.ndarray,
        push_codes: np.ndarray,
        push_parts: np.ndarray,
    ) -> None:
        """Pair each pushed item with the ``window`` items before it in its user's sequence.

        The sequence is the user's ring before the batch (oldest first) followed
        by the batch's pushes in arrival order; pairs among ring items were
        counted when they were pushed, so each pair has a new item. A user's
        items are all of its partition.
        """
        w = self.config.window
        part_of_row = dict(zip(push_rows.tolist(), push_parts.tolist(), strict=True))
        old = before[:, ::-1][:, -w:]  # oldest first, the last w only
        old_rows = np.repeat(before_rows, old.shape[1])
        old_codes = old.reshape(-1)
        keep = old_codes >= 0
        rows = np.concatenate([old_rows[keep], push_rows])
        seq = np.concatenate([old_codes[keep], push_codes.astype(np.int64)])
        new = np.r_[np.zeros(int(keep.sum()), dtype=bool), np.ones(push_rows.size, dtype=bool)]
        order = np.lexsort((np.arange(rows.size), new, rows))  # by row; ring, then pushes
        rows, seq, new = rows[order], seq[order], new[order]
        parts = np.fromiter(map(part_of_row.__getitem__, rows.tolist()), np.int64, rows.size)
        seq = self._slot_of(seq, parts)
        later = np.flatnonzero(new)  # each pair's later item is a new one: look back from those
        keys, weights = [], []
        for d in range(1, w + 1):
            at = later[later >= d]
            if not at.size:
                break
            a, b = seq[at - d], seq[at]
            ok = (rows[at - d] == rows[at]) & (a != b)
            a, b = a[ok], b[ok]
            if a.size:
                keys.append((np.minimum(a, b) << 32) | np.maximum(a, b))  # one key per pair
                weights.append(np.full(a.size, 1.0 / d, dtype=np.float32))
        if keys:
            self._pending_keys.append(np.concatenate(keys))
            self._pending_weights.append(np.concatenate(weights))
            self._pending += len(self._pending_keys[-1])
            if self._pending >= self.config.compact_every:
                self.compact(flush=False)  # called from a flush: the steps left stay deferred

    def compact(self, flush: bool = True) -> None:
        """Fold buffered pairs into the sorted arrays and prune each partition to ``max_pairs``.

        The buffer is summed per key (a sort of the buffer only) and merged into
        the sorted arrays (existing keys add, new ones are inserted in place), so
        a compaction costs about one pass over the pairs held, not a sort of them.
        Without ``flush``, observed steps not paired yet stay deferred.
        """
        if flush and (self._pairs_pending or self._counts_pending):
            self.flush()
        if not self._pending_keys:
            return
        keys, inverse = np.unique(np.concatenate(self._pending_keys), return_inverse=True)
        weights = np.bincount(inverse, weights=np.concatenate(self._pending_weights))
        self._pending_keys, self._pending_weights, self._pending = [], [], 0
        at = np.searchsorted(self._keys, keys)
        held = at < len(self._keys)
        held[held] = self._keys[at[held]] == keys[held]
        self._weights[at[held]] += weights[held].astype(np.float32)
        fresh = ~held
        self._keys = np.insert(self._keys, at[fresh], keys[fresh])
        self._weights = np.insert(self._weights, at[fresh], weights[fresh].astype(np.float32))
        self._prune()

    def _prune(self) -> None:
        """Keep each partition's ``max_pairs`` heaviest pairs."""
        parts = self.partition[self._keys >> 32]
        per = np.bincount(parts, minlength=1)
        if not len(per) or per.max() <= self.config.max_pairs:
            return
        order = np.lexsort((-self._weights, parts))  # by partition, heaviest first
        starts = np.r_[0, np.cumsum(per)[:-1]]
        rank = np.arange(order.size) - starts[parts[order]]
        keep = np.sort(order[rank < self.config.max_pairs])
        self.pruned_pairs += len(self._keys) - len(keep)
        self._keys, self._weights = self._keys[keep], self._weights[keep]

    @property
    def pairs(self) -> int:
        """Distinct co-visitation pairs held (after a :meth:`compact`)."""
        return len(self._keys)

    def nbytes(self) -> int:
        """Bytes held by the item arrays, the pair arrays and the buffer."""
        arrays = (
            self.count,
            self.positive,
            self.first,
            self.last,
            self.sum_days,
            self.sum_days2,
            self.category,
            self.item,
            self.partition,
        )
        held = sum(a.nbytes for a in arrays) + self._keys.nbytes + self._weights.nbytes
        return held + sum(
            k.nbytes + w.nbytes
            for k, w in zip(self._pending_keys, self._pending_weights, strict=True)
        )

    def _mine(self, partition: int) -> np.ndarray:
        """The slots of one partition, ascending."""
        return np.flatnonzero(self.partition[: len(self._slots) + len(self._free)] == partition)

    def partial(
        self, table: UserStateTable, top_n: int = 100, partition: int = 0
    ) -> dict[str, Any]:
        """One partition's item stats and each item's ``top_n`` heaviest neighbours, by name.

        The merge (:func:`models.item_index.ItemIndex.merge`) sums partials of
        several partitions; ``top_n`` bounds what crosses the wire.
        """
        return self.partials(table, top_n, [partition])[partition]

    def partials(
        self, table: UserStateTable, top_n: int, partitions: Sequence[int]
    ) -> dict[int, dict[str, Any]]:
        """:meth:`partial` of each of ``partitions``, with one pass over the pairs for all.

        A shard asked for its partitions' partials on a timer (the serving item index)
        holds its loop while it computes them: splitting the pairs by partition once,
        rather than scanning them all for each partition, keeps that pause short.
        """
        self.flush()
        self.compact()
        lo = (self._keys >> 32).astype(np.int64)
        owner = self.partition[lo]
        by_partition = np.argsort(owner, kind="stable")  # each run keeps its key order
        wanted = np.asarray(partitions, dtype=np.int64)
        sorted_owner = owner[by_partition]
        firsts = np.searchsorted(sorted_owner, wanted).tolist()
        ends = np.searchsorted(sorted_owner, wanted + 1).tolist()
        out = {}
        for partition, first, end in zip(partitions, firsts, ends, strict=True):
            mine = by_partition[first:end]
            out[partition] = self._partial_of(
                table, top_n, partition, lo[mine], self._keys[mine] & _LOW, self._weights[mine]
            )
        return out

    def _partial_of(
        self,
        table: UserStateTable,
        top_n: int,
        partition: int,
        lo: np.ndarray,
        hi: np.ndarray,
        pair_w: np.ndarray,
    ) -> dict[str, Any]:
        """One partition's partial from its pairs (slots ``lo`` < ``hi``, weights)."""
        slots = self._mine(partition)
        items = slots[self.count[slots] > 0]
        names = table.items.names_of(self.item[items])
        by_name = sorted(range(len(names)), key=names.__getitem__)  # whatever order they came in
        items, names = items[by_name], [names[i] for i in by_name]
        hi = hi.astype(np.int64)
        position = np.full(len(self.count), -1, dtype=np.int64)
        position[items] = np.arange(items.size)
        a = position[np.concatenate([lo, hi])]  # both directions, as positions in ``items``
        b = position[np.concatenate([hi, lo])]
        w = np.concatenate([pair_w, pair_w])
        a, b, w = _top_partners(a, b, w, top_n)
        return {
            "items": names,
            "category": [table.category_name(int(c)) for c in self.category[items].tolist()],
            "count": self.count[items],
            "heat": self.heat[items],
            "positive": self.positive[items],
            "first": self.first[items],
            "last": self.last[items],
            "sum_days": self.sum_days[items],
            "sum_days2": self.sum_days2[items],
            "pair_a": a,
            "pair_b": b,
            "pair_w": w,
        }

    def export(self, table: UserStateTable, partition: int) -> dict[str, Any]:
        """One partition's item state as plain data (names, not ids); see :meth:`insert`.

        What the partition observed is flushed first; other partitions' steps stay deferred.
        """
        self.flush(partition=partition)
        self.compact(flush=False)
        slots = self._mine(partition)
        names = table.items.names_of(self.item[slots])
        by_name = sorted(range(len(names)), key=names.__getitem__)  # the partition's own order
        slots = slots[by_name]
        local = np.full(len(self.count), -1, dtype=np.int64)
        local[slots] = np.arange(slots.size)
        lo = (self._keys >> 32).astype(np.int64)
        hi = (self._keys & 0xFFFFFFFF).astype(np.int64)
        mine = self.partition[lo] == partition
        data: dict[str, Any] = {name: getattr(self, name)[slots] for name in _STATS}
        categories = data.pop("category")
        data["category"] = [table.category_name(int(c)) for c in categories.tolist()]
        data["items"] = [names[i] for i in by_name]
        a, b = local[lo[mine]], local[hi[mine]]
        a, b = np.minimum(a, b), np.maximum(a, b)
        order = np.argsort(a * max(slots.size, 1) + b)  # by (a, b); pairs are distinct
        data["pair_a"], data["pair_b"] = a[order], b[order]
        data["pair_w"] = self._weights[mine][order]
        data["version"] = self.versions.get(partition, 0)
        return data

    def insert(self, table: UserStateTable, partition: int, data: dict[str, Any]) -> None:
        """Take over a partition exported by :meth:`export` (not held here)."""
        items = table.items.ids(data["items"])
        slots = self._slot_of(items, np.full(len(items), partition, dtype=np.int64))
        for name in _STATS:
            if name != "category":
                getattr(self, name)[slots] = data[name]
        self.category[slots] = table.categories.ids(data["category"])
        a, b = slots[data["pair_a"]], slots[data["pair_b"]]
        if a.size:
            keys = (np.minimum(a, b) << 32) | np.maximum(a, b)
            merged = np.concatenate([self._keys, keys])
            order = np.argsort(merged, kind="stable")
            self._keys = merged[order]
            self._weights = np.concatenate([self._weights, data["pair_w"]])[order]
        self.versions[partition] = int(data["version"])

    def forget(self, partition: int) -> None:
        """Drop one partition's items and pairs (given to another shard)."""
        self.flush(partition=partition)
        self.compact(flush=False)
        slots = self._mine(partition)
        for slot in slots.tolist():
            del self._slots[int(self.item[slot]) * _SPAN + partition]
        self._reset(slots)
        self._free.extend(slots.tolist())
        keep = self.partition[self._keys >> 32] != -1
        self._keys, self._weights = self._keys[keep], self._weights[keep]
        self.versions.pop(partition, None)

    def _reset(self, slots: np.ndarray) -> None:
        for name, fill in _FILLS.items():
            getattr(self, name)[slots] = fill

    def _grow(self, n: int) -> None:
        have = len(self.count)
        if n <= have:
            return
        size = max(n, 2 * have, 1024)
        for name, fill in _FILLS.items():
            old = getattr(self, name)
            new = np.full(size, fill, dtype=old.dtype)
            new[:have] = old
            setattr(self, name, new)


_SPAN = 1 << 20  # partitions per item id in the slot keys (P is far smaller)
_FILLS = {
    "count": 0,
    "heat": -np.inf,
    "positive": 0,
    "first": _NO_TIME,
    "last": -_NO_TIME,
    "sum_days": 0,
    "sum_days2": 0,
    "category": -1,
    "item": -1,
    "partition": -1,
}
_STATS = ("count", "heat", "positive", "first", "last", "sum_days", "sum_days2", "category")


def _top_partners(
    a: np.ndarray, b: np.ndarray, w: np.ndarray, top_n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs ``(a, b, w)`` keeping each ``a``'s ``top_n`` heaviest partners (lower ``b``
    first on ties), in no particular order.

    Only the pairs of items with more partners than ``top_n`` are sorted: most items
    have fewer, and a sort of every pair is most of what a shard's partial costs.
    """
    if not a.size:
        return a, b, w
    over = np.bincount(a) > top_n
    if not over.any():
        return a, b, w
    heavy = over[a]
    ha, hb, hw = a[heavy], b[heavy], w[heavy]
    order = np.lexsort((hb, -hw, ha))
    ha, hb, hw = ha[order], hb[order], hw[order]
    starts = np.r_[0, np.flatnonzero(ha[1:] != ha[:-1]) + 1]
    rank = np.arange(ha.size) - np.repeat(starts, np.diff(np.r_[starts, ha.size]))
    keep = rank < top_n
    light = ~heavy
    return (
        np.concatenate([a[light], ha[keep]]),
        np.concatenate([b[light], hb[keep]]),
        np.concatenate([w[light], hw[keep]]),
    )
