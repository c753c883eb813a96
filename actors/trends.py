"""Trending and emerging items and categories, as mergeable time-decayed partials.

Each shard folds its batches into a :class:`TrendAggregate`; the serving layer
merges the shards' aggregates (or their :meth:`TrendAggregate.to_dict`
snapshots) and queries the result, so no query scans users or events.

Counts are weighted by event type (:data:`DEFAULT_WEIGHTS`: a purchase says more
than a view) and decay exponentially in *event time*: an event of age ``a``
behind the aggregate's reference time (the latest event time seen, or a later
time given to :meth:`TrendAggregate.advance`) counts ``w * 2 ** (-a / half_life)``.
Events are weighted against the reference time and the sketches are rescaled
when it moves, so the result does not depend on arrival order (late events just
weigh less), up to the Space-Saving error, which only appears once a sketch is
full. Two windows run side by side on each dimension: a short one (trending, an
hour by default) and a long one (the baseline, a day by default).

Emerging score (acceleration against the item's own baseline)::

    rate(window) = decayed count / exposure,
    exposure     = h / ln 2 * (1 - 2 ** (-observed_span / h))
    score        = rate_short(lower bound) / rate_long(upper bound)

``exposure`` is the decayed length of the time observed so far, so a steadily
popular item scores about 1 however long the stream has run, and an item whose
activity is all recent scores up to ``exposure_long / exposure_short``. Only
items whose short-window lower bound reaches ``min_support`` are scored (a few
events make any ratio large), and only scores of at least ``min_acceleration``
are reported. Using the bounds makes the score conservative.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.batch import EventBatch
from actors.events import EventType
from actors.folded import Folded
from actors.sketches import SketchError, SpaceSaving

HOUR_MS = 3_600_000

DEFAULT_WEIGHTS: Mapping[EventType, float] = {
    EventType.PAGE_VIEW: 1.0,
    EventType.CLICK: 1.0,
    EventType.DWELL: 1.0,
    EventType.LIKE: 3.0,
    EventType.COMMENT: 3.0,
    EventType.SHARE: 5.0,
    EventType.ADD_TO_CART: 4.0,
    EventType.PURCHASE: 10.0,
}
"""Weight per event type; types not listed (sessions, identify...) count 0."""

_DIMENSIONS = ("items", "categories")


@dataclass(frozen=True)
class TrendConfig:
    """How trends are counted; only aggregates with equal configs merge.

    Raises:
        SketchError: (reason ``bad_config``) on a non-positive half-life or
            capacity, a baseline not slower than the short window, or a negative
            or non-finite weight.
    """

    half_life_ms: int = HOUR_MS
    baseline_half_life_ms: int = 24 * HOUR_MS
    capacity: int = 512
    baseline_capacity: int = 2048
    min_support: float = 20.0
    min_acceleration: float = 2.0
    weights: Mapping[EventType, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))

    def __post_init__(self) -> None:
        problems = [
            (self.half_life_ms <= 0, "half_life_ms must be positive"),
            (self.baseline_half_life_ms <= self.half_life_ms, "baseline must be slower"),
            (min(self.capacity, self.baseline_capacity) <= 0, "capacities must be positive"),
            (not self.min_support >= 0, "min_support must be non-negative"),
            (not all(math.isfinite(w) and w >= 0 for w in self.weights.values()), "bad weight"),
        ]
        for bad, detail in problems:
            if bad:
                raise SketchError("bad_config", detail)

    def weight_table(self) -> np.ndarray:
        """Weight by wire type code; unknown codes (a bad batch) weigh 0."""
        table = np.zeros(256, dtype=np.float64)
        for i, t in enumerate(EventType):
            table[i] = self.weights.get(t, 0.0)
        return table

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (weights by type name)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "weights"}
        out["weights"] = {t.value: w for t, w in self.weights.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrendConfig:
        """Inverse of :meth:`to_dict`."""
        fields = dict(data)
        fields["weights"] = {EventType(k): float(w) for k, w in data["weights"].items()}
        return cls(**fields)


class TrendAggregate:
    """One shard's decayed heavy hitters of items and categories, short and long window.

    Lifecycle: :meth:`update` per batch, :meth:`advance` on a timer (optional:
    it lets quiet periods decay), :meth:`merge` across shards,
    :meth:`to_dict` / :meth:`from_dict` for snapshots. Keys are dropped by the
    sketches themselves: a faded key is the first to be evicted.
    """

    def __init__(self, config: TrendConfig | None = None) -> None:
        self.config = config or TrendConfig()
        self._weights = self.config.weight_table()
        c = self.config
        self._short = {d: SpaceSaving(c.capacity) for d in _DIMENSIONS}
        self._long = {d: SpaceSaving(c.baseline_capacity) for d in _DIMENSIONS}
        self.ref_ms: int | None = None  # reference ("now") in event time
        self.origin_ms: int | None = None  # earliest event time seen

    def update(self, batch: EventBatch) -> None:
        """Fold a batch in; events without an item (or category) skip that dimension."""
        if len(batch) == 0:
            return
        w = self._weights[batch.type.astype(np.intp)]
        ts = batch.ts.astype(np.int64)
        self.advance(int(ts.max()))
        lo = int(ts.min())
        self.origin_ms = lo if self.origin_ms is None else min(self.origin_ms, lo)
        assert self.ref_ms is not None  # set by advance
        age = (self.ref_ms - ts).astype(np.float64)
        w_short = w * np.exp2(-age / self.config.half_life_ms)
        w_long = w * np.exp2(-age / self.config.baseline_half_life_ms)
        for dim, column in (("items", batch.item_id), ("categories", batch.category)):
            keys, codes = _codes(column)
            counted = (w > 0) & (codes >= 0)
            if not counted.any():
                continue
            rows, n = codes[counted], len(keys)
            short = np.bincount(rows, weights=w_short[counted], minlength=n)
            long = np.bincount(rows, weights=w_long[counted], minlength=n)
            hit = np.flatnonzero(np.bincount(rows, minlength=n)).tolist()
            hit_keys = [keys[i] for i in hit]
            self._short[dim].add_many(hit_keys, short[hit])
            self._long[dim].add_many(hit_keys, long[hit])

    def advance(self, now_ms: int) -> None:
        """Move the reference time forward to ``now_ms`` (never back), decaying every count.

        ``now_ms`` is event time, e.g. the shard's watermark, not the wall clock.
        """
        if self.ref_ms is None:
            self.ref_ms = int(now_ms)
            return
        dt = int(now_ms) - self.ref_ms
        if dt <= 0:
            return
        self.ref_ms = int(now_ms)
        _decay(self._short, dt / self.config.half_life_ms)
        _decay(self._long, dt / self.config.baseline_half_life_ms)

    def merge(self, other: TrendAggregate) -> None:
        """Fold ``other`` (another shard) in, at the later of the two reference times.

        ``other`` is not modified.

        Raises:
            SketchError: (reason ``config_mismatch``) if the configs differ.
        """
        if other.config != self.config:
            raise SketchError("config_mismatch", "trend aggregates need equal configs to merge")
        if other.ref_ms is None or other.origin_ms is None:
            return
        theirs = copy.deepcopy(other)
        theirs.advance(other.ref_ms if self.ref_ms is None else self.ref_ms)
        self.advance(other.ref_ms)
        for dim in _DIMENSIONS:
            self._short[dim].merge(theirs._short[dim])
            self._long[dim].merge(theirs._long[dim])
        mine = self.origin_ms
        self.origin_ms = other.origin_ms if mine is None else min(mine, other.origin_ms)

    def trending_items(self, n: int = 10) -> list[dict[str, Any]]:
        """The ``n`` items with the most decayed weighted activity, busiest first.

        Each entry: ``id``; ``score`` (weighted events per hour over the short
        window); ``count`` (decayed weighted count, an overestimate by at most
        ``error``); ``error``; ``certain`` (the item is surely in the top-n).
        """
        return self._trending("items", n)

    def trending_categories(self, n: int = 10) -> list[dict[str, Any]]:
        """Like :meth:`trending_items`, for categories."""
        return self._trending("categories", n)

    def emerging_items(self, n: int = 10) -> list[dict[str, Any]]:
        """Items accelerating against their own baseline, highest score first.

        Each entry: ``id``, ``score`` (see the module docstring), ``count`` and
        ``error`` of the short window, ``baseline_count`` and ``baseline_error``,
        and both rates per hour.
        """
        return self._emerging("items", n)

    def emerging_categories(self, n: int = 10) -> list[dict[str, Any]]:
        """Like :meth:`emerging_items`, for categories."""
        return self._emerging("categories", n)

    def _exposure_h(self, half_life_ms: int) -> float:
        """Decayed length, in hours, of the span observed so far (see module docstring)."""
        if self.ref_ms is None or self.origin_ms is None:
            return 0.0
        span = max(self.ref_ms - self.origin_ms, 1)
        return (
            half_life_ms / math.log(2) * -math.expm1(-span / half_life_ms * math.log(2)) / HOUR_MS
        )

    def _trending(self, dim: str, n: int) -> list[dict[str, Any]]:
        sketch = self._short[dim]
        rows = sketch.top(n + 1)
        exposure = self._exposure_h(self.config.half_life_ms)
        out = []
        for i, (key, count, raw_error) in enumerate(rows[:n]):
            error = max(0.0, raw_error)  # decay arithmetic can leave a -1e-14
            runner_up = rows[i + 1][1] if i + 1 < len(rows) else sketch.floor
            out.append(
                {
                    "id": key,
                    "score": count / exposure if exposure else 0.0,
                    "count": count,
                    "error": error,
                    "certain": count - error >= runner_up,
                }
            )
        return out

    def _emerging(self, dim: str, n: int) -> list[dict[str, Any]]:
        c = self.config
        short, long = self._short[dim], self._long[dim]
        exp_s, exp_l = self._exposure_h(c.half_life_ms), self._exposure_h(c.baseline_half_life_ms)
        if not exp_s:
            return []
        baseline = {k: (cnt, err) for k, cnt, err in long.top(long.capacity)}
        out: list[dict[str, Any]] = []
        for key, count, raw_error in short.top(short.capacity):
            error = max(0.0, raw_error)  # decay arithmetic can leave a -1e-14
            if count - error < c.min_support:
                continue
            base, base_err = baseline.get(key, (long.floor, long.floor))
            rate, base_rate = (count - error) / exp_s, base / exp_l
            score = rate / base_rate if base_rate > 0 else math.inf
            if score >= c.min_acceleration:
                out.append(
                    {
                        "id": key,
                        "score": score,
                        "count": count,
                        "error": error,
                        "baseline_count": base,
                        "baseline_error": base_err,
                        "rate_per_hour": count / exp_s,
                        "baseline_rate_per_hour": base_rate,
                    }
                )
        out.sort(key=lambda r: (-r["score"], r["id"]))
        return out[: max(n, 0)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly snapshot, also the form shards ship to the merge step."""
        return {
            "version": 1,
            "config": self.config.to_dict(),
            "ref_ms": self.ref_ms,
            "origin_ms": self.origin_ms,
            "short": {d: s.to_dict() for d, s in self._short.items()},
            "long": {d: s.to_dict() for d, s in self._long.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrendAggregate:
        """Restore a snapshot made by :meth:`to_dict`.

        Raises:
            SketchError: if ``data`` is not such a snapshot.
        """
        try:
            agg = cls(TrendConfig.from_dict(data["config"]))
            agg._short = {d: SpaceSaving.from_dict(data["short"][d]) for d in _DIMENSIONS}
            agg._long = {d: SpaceSaving.from_dict(data["long"][d]) for d in _DIMENSIONS}
            ref, origin = data["ref_ms"], data["origin_ms"]
        except (KeyError, TypeError, ValueError) as exc:
            raise SketchError("bad_snapshot", f"not a TrendAggregate snapshot: {exc}") from exc
        agg.ref_ms = None if ref is None else int(ref)
        agg.origin_ms = None if origin is None else int(origin)
        return agg


def _codes(column: list[str | None]) -> tuple[list[str], np.ndarray]:
    """Distinct non-None ids of a column and each row's index among them (-1 for None).

    Summing weights per distinct id first means each id is hashed once per
    batch rather than once per event, the dearest part of an update.
    """
    index: dict[str | None, int] = dict.fromkeys(column, 0)
    index.pop(None, None)
    for i, key in enumerate(index):
        index[key] = i
    index[None] = -1
    codes = np.fromiter(map(index.__getitem__, column), np.int64, len(column))
    return [k for k in index if k is not None], codes


def _decay(sketches: dict[str, SpaceSaving], half_lives: float) -> None:
    """Decay by ``half_lives`` half-lives; past ~1000 the counts are gone, so start over."""
    factor = 2.0**-half_lives
    for dim, sketch in sketches.items():
        if factor > 0:
            sketch.decay(factor)
        else:
            sketches[dim] = SpaceSaving(sketch.capacity)


_DIM_SHIFT = 40  # fold keys: (partition * 2 + dimension) << 40 | item or category id
_FADED = 1e-9  # a count below this in both windows is gone: its slot is freed


class TrendFolds:
    """Trends of a shard's partitions: exact decayed counts per (partition, item or category).

    The fold side of :class:`TrendAggregate`: every partition has its own
    reference time and counts, kept in flat arrays (one scatter per fold for
    all partitions) instead of a Space-Saving sketch per partition, and
    :meth:`partial` writes a partition's :meth:`TrendAggregate.to_dict` (its
    top ``capacity`` keys, exact, so with zero error) for the merge. Counts are
    kept as of each partition's reference time and rescaled when it moves.
    """

    def __init__(self, config: TrendConfig | None = None) -> None:
        self.config = config or TrendConfig()
        self._weights = self.config.weight_table()
        self.ref: dict[int, int] = {}  # partition -> reference time (newest event)
        self.origin: dict[int, int] = {}  # partition -> earliest event time
        self._totals: dict[tuple[int, int], list[float]] = {}  # (partition, dim) -> short, long
        self._slots: dict[tuple[int, str], int] = {}  # (partition * 2 + dim, name) -> slot
        self._owner = np.zeros(0, dtype=np.int64)  # slot -> partition * 2 + dim, -1 free
        self._name: list[str | None] = []
        self._short = np.zeros(0, dtype=np.float64)
        self._long = np.zeros(0, dtype=np.float64)
        self._free: list[int] = []
        self._cache: dict[int, dict[str, Any]] = {}

    def fold(self, f: Folded) -> None:
        """Fold events in; events without an item (or category) skip that dimension."""
        if not len(f):
            return
        c = self.config
        parts = f.partition
        touched = np.unique(parts)
        top = int(touched.max()) + 1
        newest = np.full(top, -(2**62), dtype=np.int64)
        oldest = np.full(top, 2**62, dtype=np.int64)
        np.maximum.at(newest, parts, f.ts)
        np.minimum.at(oldest, parts, f.ts)
        ref = np.zeros(top, dtype=np.int64)
        moved: dict[int, int] = {}
        for p in touched.tolist():
            old = self.ref.get(p)
            new = int(newest[p]) if old is None else max(old, int(newest[p]))
            if old is not None and new > old:
                moved[p] = new - old
            self.ref[p] = ref[p] = new
            lo = int(oldest[p])
            self.origin[p] = lo if p not in self.origin else min(self.origin[p], lo)
            self._cache.pop(p, None)
        if moved:
            self._decay(moved)
        w = self._weights[f.type.astype(np.intp)]
        age = (ref[parts] - f.ts).astype(np.float64)
        w_short = w * np.exp2(-age / c.half_life_ms)
        w_long = w * np.exp2(-age / c.baseline_half_life_ms)
        for dim, ids, names in ((0, f.item, f.item_names), (1, f.category, f.category_names)):
            counted = np.flatnonzero((w > 0) & (ids >= 0))
            if not counted.size:
                continue
            keys = ((parts[counted] * 2 + dim) << _DIM_SHIFT) | ids[counted]
            unique, inverse = np.unique(keys, return_inverse=True)
            mask = (1 << _DIM_SHIFT) - 1
            slots = np.array(
                [self._slot(k >> _DIM_SHIFT, names[k & mask]) for k in unique.tolist()],
                dtype=np.int64,
            )[inverse]
            short, long = w_short[counted], w_long[counted]
            np.add.at(self._short, slots, short)
            np.add.at(self._long, slots, long)
            held, at = np.unique(parts[counted], return_inverse=True)
            sums_s = np.bincount(at, weights=short).tolist()
            sums_l = np.bincount(at, weights=long).tolist()
            for p, a, b in zip(held.tolist(), sums_s, sums_l, strict=True):
                totals = self._totals.setdefault((p, dim), [0.0, 0.0])
                totals[0] += a
                totals[1] += b

    def _slot(self, owner: int, name: str) -> int:
        slot = self._slots.get((owner, name))
        if slot is None:
            if not self._free:
                self._grow()
            slot = self._slots[(owner, name)] = self._free.pop()
            self._owner[slot], self._name[slot] = owner, name
        return slot

    def _grow(self) -> None:
        have = len(self._owner)
        size = max(1024, 2 * have)
        self._owner = np.concatenate([self._owner, np.full(size - have, -1, dtype=np.int64)])
        self._short = np.concatenate([self._short, np.zeros(size - have)])
        self._long = np.concatenate([self._long, np.zeros(size - have)])
        self._name.extend([None] * (size - have))
        self._free.extend(range(size - 1, have - 1, -1))

    def _release(self, slots: np.ndarray) -> None:
        for slot in slots.tolist():
            name = self._name[slot]
            assert name is not None
            del self._slots[(int(self._owner[slot]), name)]
            self._owner[slot], self._name[slot] = -1, None
            self._free.append(slot)
        self._short[slots] = 0.0
        self._long[slots] = 0.0

    def _decay(self, moved: dict[int, int]) -> None:
        """Rescale the counts of partitions whose reference time moved by ``moved[p]`` ms."""
        c = self.config
        dt = np.zeros(max(moved) + 1, dtype=np.float64)
        dt[list(moved)] = list(moved.values())
        part = self._owner >> 1
        steps = np.where((part >= 0) & (part < len(dt)), dt[np.clip(part, 0, len(dt) - 1)], 0.0)
        self._short *= np.exp2(-steps / c.half_life_ms)
        self._long *= np.exp2(-steps / c.baseline_half_life_ms)
        for (p, _), totals in self._totals.items():
            if p in moved:
                totals[0] *= 2.0 ** (-moved[p] / c.half_life_ms)
                totals[1] *= 2.0 ** (-moved[p] / c.baseline_half_life_ms)
        faded = (self._owner >= 0) & (self._long < _FADED) & (self._short < _FADED)
        if faded.any():
            self._release(np.flatnonzero(faded))

    def partitions(self) -> list[int]:
        """Partitions with trend state."""
        return sorted(self.ref)

    def partial(self, partition: int) -> dict[str, Any]:
        """A partition's :meth:`TrendAggregate.to_dict` (kept until the partition changes)."""
        cached = self._cache.get(partition)
        if cached is None:
            cached = self._cache[partition] = self._partial(partition)
        return cached

    def aggregate(self, partition: int) -> TrendAggregate:
        """A partition's trends as a :class:`TrendAggregate`."""
        return TrendAggregate.from_dict(self.partial(partition))

    def _partial(self, partition: int) -> dict[str, Any]:
        c = self.config
        out: dict[str, Any] = {
            "version": 1,
            "config": c.to_dict(),
            "ref_ms": self.ref.get(partition),
            "origin_ms": self.origin.get(partition),
            "short": {},
            "long": {},
        }
        for dim, name in enumerate(_DIMENSIONS):
            slots = np.flatnonzero(self._owner == partition * 2 + dim)
            totals = self._totals.get((partition, dim), [0.0, 0.0])
            for window, counts, capacity, total in (
                ("short", self._short, c.capacity, totals[0]),
                ("long", self._long, c.baseline_capacity, totals[1]),
            ):
                live = slots[counts[slots] > 0]
                names = [self._name[s] for s in live.tolist()]
                rows = sorted(zip(names, counts[live].tolist(), strict=True), key=_busiest)
                out[window][name] = {
                    "version": 1,
                    "capacity": capacity,
                    "total": total,
                    "items": [[k, v, 0.0] for k, v in rows[:capacity]],
                }
        return out

    def export(self, partition: int) -> dict[str, Any]:
        """A partition's trends as plain data (see :meth:`insert`)."""
        dims = []
        for dim in range(len(_DIMENSIONS)):
            slots = np.flatnonzero(self._owner == partition * 2 + dim)
            names = [self._name[s] or "" for s in slots.tolist()]
            order = sorted(range(len(slots)), key=names.__getitem__)
            slots = slots[order]
            dims.append(
                {
                    "names": [self._name[s] for s in slots.tolist()],
                    "short": self._short[slots],
                    "long": self._long[slots],
                    "totals": list(self._totals.get((partition, dim), [0.0, 0.0])),
                }
            )
        return {"ref": self.ref.get(partition), "origin": self.origin.get(partition), "dims": dims}

    def insert(self, partition: int, data: dict[str, Any]) -> None:
        """Take over a partition exported by :meth:`export` (not held here)."""
        if data["ref"] is not None:
            self.ref[partition] = int(data["ref"])
        if data["origin"] is not None:
            self.origin[partition] = int(data["origin"])
        for dim, held in enumerate(data["dims"]):
            slots = [self._slot(partition * 2 + dim, name) for name in held["names"]]
            self._short[slots] = held["short"]
            self._long[slots] = held["long"]
            self._totals[(partition, dim)] = [float(x) for x in held["totals"]]
        self._cache.pop(partition, None)

    def forget(self, partition: int) -> None:
        """Drop a partition."""
        for dim in range(len(_DIMENSIONS)):
            self._release(np.flatnonzero(self._owner == partition * 2 + dim))
            self._totals.pop((partition, dim), None)
        self.ref.pop(partition, None)
        self.origin.pop(partition, None)
        self._cache.pop(partition, None)

    def nbytes(self) -> int:
        """Bytes of the count arrays."""
        return self._owner.nbytes + self._short.nbytes + self._long.nbytes


def _busiest(row: tuple[str, float]) -> tuple[float, str]:
    return -row[1], row[0]
