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
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class ItemGraphConfig:
    """Knobs of the item state.

    Attributes:
        window: how many earlier recent items each new item is paired with.
        max_pairs: co-visitation pairs kept; the lightest are pruned beyond it.
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
    """Item statistics and co-visitation for the users of one shard.

    Item codes are the shard's :class:`~actors.state.UserStateTable` codes, so
    nothing is interned twice; partials translate them to item ids.
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
        self.category = np.zeros(0, dtype=np.int32)
        self._keys = np.zeros(0, dtype=np.int64)  # sorted (a << 32) | b
        self._weights = np.zeros(0, dtype=np.float32)
        self._pending_keys: list[np.ndarray] = []
        self._pending_weights: list[np.ndarray] = []
        self._pending = 0
        self._counts_pending: list[tuple[np.ndarray, ...]] = []
        self._pairs_pending: list[tuple[np.ndarray, ...]] = []
        self._pending_events = 0
        self.pruned_pairs = 0
        self.version = 0  # bumped by every observe: partials of equal versions are equal

    def __len__(self) -> int:
        """Items with at least one event (as of the last flush)."""
        return int(np.count_nonzero(self.count))

    def observe(self, table: UserStateTable, batch: EventBatch) -> None:
        """Take in ``batch``, which ``table`` just applied (its ``last_*`` fields).

        The work is deferred to :meth:`flush` (by :meth:`partial`, or the shard's
        fold): many small apply steps then cost a few large numpy calls, not
        many small ones on the freshness path. What is kept are references to
        arrays that the table replaces on its next apply, not views of its state.
        """
        codes = table.last_item_codes
        has = np.flatnonzero(codes >= 0)
        if has.size:
            self._counts_pending.append(
                (codes[has], batch.ts[has], table.last_category_codes[has], batch.type[has])
            )
        push_rows, push_codes = table.last_pushes
        if push_rows.size:
            before_rows, before = table.last_recent_before
            self._pairs_pending.append((before_rows, before, push_rows, push_codes))
        self._pending_events += len(batch)
        self.version += 1
        if self._pending_events >= self.config.flush_every:
            self.flush()

    def flush(self) -> None:
        """Fold what :meth:`observe` deferred into the item stats and the pair buffer."""
        counts, self._counts_pending = self._counts_pending, []
        pairs, self._pairs_pending = self._pairs_pending, []
        self._pending_events = 0
        if counts:
            codes, ts, categories, types = (np.concatenate(c) for c in zip(*counts, strict=True))
            self._count_items(codes, ts, categories, np.isin(types, _POSITIVE))
        for step in pairs:  # each step pairs against the rings as they were before it
            self._pair(*step)

    def _count_items(
        self, codes: np.ndarray, ts: np.ndarray, categories: np.ndarray, positive: np.ndarray
    ) -> None:
        self._grow(int(codes.max()) + 1)
        days = ts / DAY_MS
        np.add.at(self.count, codes, 1)
        np.logaddexp2.at(self.heat, codes, ts / TRENDING_HALF_LIFE_MS)
        np.add.at(self.positive, codes[positive], 1)
        np.minimum.at(self.first, codes, ts)
        np.maximum.at(self.last, codes, ts)
        np.add.at(self.sum_days, codes, days)
        np.add.at(self.sum_days2, codes, days * days)
        known = categories >= 0
        self.category[codes[known]] = categories[known]  # the latest category wins

    def _pair(
        self,
        before_rows: np.ndarray,
        before: np.ndarray,
        push_rows: np.ndarray,
        push_codes: np.ndarray,
    ) -> None:
        """Pair each pushed item with the ``window`` items before it in its user's sequence.

        The sequence is the user's ring before the batch (oldest first) followed
        by the batch's pushes in arrival order; pairs among ring items were
        counted when they were pushed, so each pair has a new item.
        """
        w = self.config.window
        old = before[:, ::-1][:, -w:]  # oldest first, the last w only
        old_rows = np.repeat(before_rows, old.shape[1])
        old_codes = old.reshape(-1)
        keep = old_codes >= 0
        rows = np.concatenate([old_rows[keep], push_rows])
        seq = np.concatenate([old_codes[keep], push_codes.astype(np.int64)])
        new = np.r_[np.zeros(int(keep.sum()), dtype=bool), np.ones(push_rows.size, dtype=bool)]
        order = np.lexsort((np.arange(rows.size), new, rows))  # by row; ring, then pushes
        rows, seq, new = rows[order], seq[order], new[order]
        keys, weights = [], []
        for d in range(1, w + 1):
            if d >= rows.size:
                break
            a, b = seq[:-d], seq[d:]
            ok = (rows[:-d] == rows[d:]) & new[d:] & (a != b)
            a, b = a[ok], b[ok]
            if a.size:
                keys.append((np.minimum(a, b) << 32) | np.maximum(a, b))  # one key per pair
                weights.append(np.full(a.size, 1.0 / d, dtype=np.float32))
        if keys:
            self._pending_keys.append(np.concatenate(keys))
            self._pending_weights.append(np.concatenate(weights))
            self._pending += len(self._pending_keys[-1])
            if self._pending >= self.config.compact_every:
                self.compact()

    def compact(self) -> None:
        """Fold buffered pairs into the sorted arrays and prune to ``max_pairs``."""
        if self._pairs_pending or self._counts_pending:
            self.flush()
        if not self._pending_keys:
            return
        keys = np.concatenate([self._keys, *self._pending_keys])
        weights = np.concatenate([self._weights, *self._pending_weights])
        self._pending_keys, self._pending_weights, self._pending = [], [], 0
        self._keys, inverse = np.unique(keys, return_inverse=True)
        self._weights = np.bincount(inverse, weights=weights).astype(np.float32)
        excess = len(self._keys) - self.config.max_pairs
        if excess > 0:
            keep = np.sort(np.argpartition(self._weights, excess)[excess:])
            self._keys, self._weights = self._keys[keep], self._weights[keep]
            self.pruned_pairs += excess

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
        )
        held = sum(a.nbytes for a in arrays) + self._keys.nbytes + self._weights.nbytes
        return held + sum(
            k.nbytes + w.nbytes
            for k, w in zip(self._pending_keys, self._pending_weights, strict=True)
        )

    def partial(self, table: UserStateTable, top_n: int = 100) -> dict[str, Any]:
        """Item stats and each item's ``top_n`` heaviest neighbours, with item ids as strings.

        The merge (:func:`models.item_index.ItemIndex.merge`) sums partials of
        several shards; ``top_n`` bounds what crosses the wire.
        """
        self.flush()
        self.compact()
        items = np.flatnonzero(self.count)
        lo = (self._keys >> 32).astype(np.int64)
        hi = (self._keys & 0xFFFFFFFF).astype(np.int64)
        a, b = np.concatenate([lo, hi]), np.concatenate([hi, lo])  # both directions
        w = np.concatenate([self._weights, self._weights])
        order = np.lexsort((-w, a))
        a, b, w = a[order], b[order], w[order]
        if a.size:
            starts = np.r_[0, np.flatnonzero(a[1:] != a[:-1]) + 1]
            rank = np.arange(a.size) - np.repeat(starts, np.diff(np.r_[starts, a.size]))
            keep = rank < top_n
            a, b, w = a[keep], b[keep], w[keep]
        position = np.full(len(self.count), -1, dtype=np.int64)
        position[items] = np.arange(items.size)
        return {
            "items": [table.item_name(int(c)) for c in items.tolist()],
            "category": [table.category_name(int(c)) for c in self.category[items].tolist()],
            "count": self.count[items],
            "heat": self.heat[items],
            "positive": self.positive[items],
            "first": self.first[items],
            "last": self.last[items],
            "sum_days": self.sum_days[items],
            "sum_days2": self.sum_days2[items],
            "pair_a": position[a],
            "pair_b": position[b],
            "pair_w": w,
        }

    def _grow(self, n: int) -> None:
        have = len(self.count)
        if n <= have:
            return
        size = max(n, 2 * have, 1024)
        for name, fill in (
            ("count", 0),
            ("heat", -np.inf),
            ("positive", 0),
            ("first", _NO_TIME),
            ("last", -_NO_TIME),
            ("sum_days", 0),
            ("sum_days2", 0),
            ("category", -1),
        ):
            old = getattr(self, name)
            new = np.full(size, fill, dtype=old.dtype)
            new[:have] = old
            setattr(self, name, new)
