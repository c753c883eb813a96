"""Space-Saving heavy hitters: mergeable top-k with per-key error bounds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from actors.sketches._common import (
    _U64,
    SketchError,
    stable_hash64,
)


class SpaceSaving:
    """Top-k heavy hitters (trending items) with error bounds, decay and merge.

    Keeps at most ``capacity`` counters. For every monitored key the true
    (weighted, decayed) count lies in ``[count - error, count]``; any key not
    monitored has a true count at most :attr:`floor`; every error is at most
    ``total / capacity``. Keys are identified by :func:`stable_hash64` (two keys
    colliding in 64 bits would share a counter; at a million keys the odds are
    about 3e-8).

    A batch is folded in as an exact summary of itself using the mergeable
    Space-Saving merge, which gives the guarantees above at numpy speed rather
    than one heap operation per event.
    """

    def __init__(self, capacity: int) -> None:
        """Create an empty summary.

        Raises:
            SketchError: if ``capacity`` is not a positive int.
        """
        if not (isinstance(capacity, int) and capacity > 0):
            raise SketchError("bad_capacity", f"capacity must be a positive int, got {capacity!r}")
        self._k = capacity
        self._hashes = np.empty(0, dtype=_U64)
        self._keys = np.empty(0, dtype=object)
        self._counts = np.empty(0, dtype=np.float64)
        self._errors = np.empty(0, dtype=np.float64)
        self._total = 0.0

    @property
    def capacity(self) -> int:
        """Maximum number of monitored keys."""
        return self._k

    @property
    def total(self) -> float:
        """Total (decayed) weight added, ``N`` in the ``N / capacity`` error bound."""
        return self._total

    @property
    def floor(self) -> float:
        """Upper bound on the true count of any key not monitored."""
        return float(self._counts.min()) if len(self._counts) >= self._k else 0.0

    def __len__(self) -> int:
        return len(self._keys)

    def add_many(self, keys: Sequence[str], weights: np.ndarray | None = None) -> None:
        """Add a batch of keys, each with weight 1 or its entry in ``weights``.

        Raises:
            SketchError: if ``weights`` has the wrong length or a negative or
                non-finite entry (the bounds only hold for non-negative weights).
        """
        n = len(keys)
        if weights is None:
            w = np.ones(n, dtype=np.float64)
        else:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (n,):
                raise SketchError("bad_weights", f"{w.shape} weights for {n} keys")
            if not bool(np.all(np.isfinite(w) & (w >= 0))):
                raise SketchError("bad_weights", "weights must be finite and non-negative")
        if n == 0:
            return
        uniq, first, inv = np.unique(stable_hash64(keys), return_index=True, return_inverse=True)
        sums = np.bincount(inv.reshape(-1), weights=w, minlength=len(uniq))
        keep = sums > 0
        batch_keys = np.empty(int(keep.sum()), dtype=object)
        batch_keys[:] = [keys[i] for i in first[keep].tolist()]
        self._fold(uniq[keep], batch_keys, sums[keep], np.zeros(len(batch_keys)), 0.0)
        self._total += float(w.sum())

    def merge(self, other: SpaceSaving) -> None:
        """Fold ``other`` (e.g. another shard's summary) into this one.

        Counts of common keys add; a key missing from one side is charged that
        side's :attr:`floor` as both count and error; the top ``capacity`` stay.
        """
        self._fold(other._hashes, other._keys, other._counts, other._errors, other.floor)
        self._total += other._total

    def _fold(
        self, h2: np.ndarray, k2: np.ndarray, c2: np.ndarray, e2: np.ndarray, floor2: float
    ) -> None:
        floor1 = self.floor
        n1 = len(self._hashes)
        uniq, inv = np.unique(np.concatenate([self._hashes, h2]), return_inverse=True)
        inv = inv.reshape(-1)
        inv1, inv2 = inv[:n1], inv[n1:]
        counts = np.full(len(uniq), floor1 + floor2)
        errors = np.full(len(uniq), floor1 + floor2)
        counts[inv1] += self._counts - floor1
        errors[inv1] += self._errors - floor1
        counts[inv2] += c2 - floor2
        errors[inv2] += e2 - floor2
        keys = np.empty(len(uniq), dtype=object)
        keys[inv2] = k2
        keys[inv1] = self._keys
        if len(uniq) > self._k:
            kept = np.lexsort((uniq, -counts))[: self._k]
            uniq, keys, counts, errors = uniq[kept], keys[kept], counts[kept], errors[kept]
        self._hashes, self._keys, self._counts, self._errors = uniq, keys, counts, errors

    def decay(self, factor: float) -> None:
        """Multiply every count, error and the total by ``factor`` in ``(0, 1]``.

        Call it on a timer for an exponentially decayed window: the bounds then
        hold for the decayed true counts.

        Raises:
            SketchError: if ``factor`` is outside ``(0, 1]``.
        """
        if not 0 < factor <= 1:
            raise SketchError("bad_factor", f"decay factor must be in (0, 1], got {factor!r}")
        self._counts *= factor
        self._errors *= factor
        self._total *= factor

    def top(self, n: int) -> list[tuple[str, float, float]]:
        """The ``n`` largest counters as ``(key, count, error)``, largest first.

        A key is certainly in the true top-n when ``count - error`` is at least
        the next counter's ``count``.
        """
        rows = zip(self._keys.tolist(), self._counts.tolist(), self._errors.tolist(), strict=True)
        return sorted(rows, key=lambda r: (-r[1], r[0]))[: max(n, 0)]

    def estimate(self, key: str) -> tuple[float, float]:
        """``(count, error)`` of one key; unmonitored keys get ``(floor, floor)``."""
        hit = np.flatnonzero(self._hashes == stable_hash64([key])[0])
        if hit.size == 0:
            return self.floor, self.floor
        i = int(hit[0])
        return float(self._counts[i]), float(self._errors[i])

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly snapshot."""
        return {
            "version": 1,
            "capacity": self._k,
            "total": self._total,
            "items": [[k, c, e] for k, c, e in self.top(self._k)],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpaceSaving:
        """Restore a snapshot made by :meth:`to_dict`.

        Raises:
            SketchError: if ``data`` is not such a snapshot.
        """
        try:
            sketch = cls(int(data["capacity"]))
            items = [(str(k), float(c), float(e)) for k, c, e in data["items"]]
            total = float(data["total"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SketchError("bad_snapshot", f"not a SpaceSaving snapshot: {exc}") from exc
        hashes = stable_hash64([k for k, _, _ in items])
        counts = np.array([c for _, c, _ in items], dtype=np.float64)
        errors = np.array([e for _, _, e in items], dtype=np.float64)
        if (
            len(items) > sketch._k
            or len(np.unique(hashes)) != len(items)
            or not bool(np.all((errors >= 0) & (errors <= counts)))
        ):
            raise SketchError("bad_snapshot", "too many, duplicate or inconsistent items")
        keys = np.empty(len(items), dtype=object)
        keys[:] = [k for k, _, _ in items]
        sketch._hashes, sketch._keys, sketch._counts, sketch._errors = hashes, keys, counts, errors
        sketch._total = total
        return sketch


# --------------------------------------------------------------------------- Count-Min
