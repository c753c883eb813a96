"""Count-Min: mergeable frequency estimates that never undercount."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np

from actors.sketches._common import (
    _GOLDEN,
    _U64,
    SketchError,
    _fmix64,
    stable_hash64,
)


class CountMin:
    """Frequency of any key in ``width * depth`` counters, never underestimated.

    Bound: ``estimate(key) <= true + epsilon * total`` with probability at least
    ``1 - delta`` per key, where ``epsilon = e / width`` and ``delta = exp(-depth)``
    (Cormode and Muthukrishnan). Use :meth:`from_error` to size from the bound.
    Rows hash with the ``seed``; only sketches with equal shape and seed merge.
    """

    _MAGIC = b"CMS\x01"

    def __init__(self, width: int = 2048, depth: int = 5, seed: int = 0) -> None:
        """Create an empty sketch.

        Raises:
            SketchError: if width or depth is not a positive int.
        """
        if not (isinstance(width, int) and isinstance(depth, int) and width > 0 and depth > 0):
            raise SketchError(
                "bad_shape", f"width and depth must be positive ints: {width}, {depth}"
            )
        self._width = width
        self._depth = depth
        self._seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        salts = np.arange(1, depth + 1, dtype=_U64) * _GOLDEN ^ _U64(self._seed)
        self._salts = _fmix64(salts)
        self._offsets = (np.arange(depth, dtype=np.int64) * width)[:, None]
        self._table = np.zeros((depth, width), dtype=np.int64)

    @classmethod
    def from_error(cls, epsilon: float, delta: float, seed: int = 0) -> CountMin:
        """The smallest sketch with overestimate ``<= epsilon * total`` w.p. ``>= 1 - delta``."""
        if not (0 < epsilon < 1 and 0 < delta < 1):
            raise SketchError("bad_bound", f"need 0 < epsilon, delta < 1: {epsilon}, {delta}")
        return cls(math.ceil(math.e / epsilon), math.ceil(math.log(1 / delta)), seed)

    @property
    def width(self) -> int:
        """Counters per row."""
        return self._width

    @property
    def depth(self) -> int:
        """Number of rows (independent hashes)."""
        return self._depth

    @property
    def epsilon(self) -> float:
        """Overestimate bound as a fraction of :attr:`total`."""
        return math.e / self._width

    @property
    def delta(self) -> float:
        """Probability, per key, that the overestimate exceeds ``epsilon * total``."""
        return math.exp(-self._depth)

    @property
    def total(self) -> int:
        """Total count added, ``N`` in the bound."""
        return int(self._table[0].sum())

    def _cells(self, keys: Sequence[str]) -> np.ndarray:
        """Flat table indices, shape ``(depth, len(keys))``."""
        h = stable_hash64(keys)[None, :] ^ self._salts[:, None]
        return (_fmix64(h) % _U64(self._width)).astype(np.int64) + self._offsets

    def add_many(self, keys: Sequence[str], counts: np.ndarray | None = None) -> None:
        """Add a batch of keys, each counted once or by its entry in ``counts``.

        Raises:
            SketchError: if ``counts`` has the wrong length or a negative entry.
        """
        if len(keys) == 0:
            return
        cells = self._cells(keys).reshape(-1)
        flat = self._table.reshape(-1)
        if counts is None:
            flat += np.bincount(cells, minlength=flat.size)
            return
        c = np.asarray(counts)
        if c.shape != (len(keys),) or not np.issubdtype(c.dtype, np.integer) or (c < 0).any():
            raise SketchError("bad_counts", "counts must be non-negative ints, one per key")
        np.add.at(flat, cells, np.tile(c.astype(np.int64), self._depth))

    def estimate(self, key: str) -> int:
        """Estimated count of ``key``: never below the true count."""
        return int(self.estimate_many([key])[0])

    def estimate_many(self, keys: Sequence[str]) -> np.ndarray:
        """Estimates of many keys at once, as int64."""
        if len(keys) == 0:
            return np.empty(0, dtype=np.int64)
        return self._table.reshape(-1)[self._cells(keys)].min(axis=0)

    def merge(self, other: CountMin) -> None:
        """Fold ``other`` into this sketch: afterwards it counts both streams.

        Raises:
            SketchError: if width, depth or seed differ (cells would not line up).
        """
        ours = (self._width, self._depth, self._seed)
        theirs = (other._width, other._depth, other._seed)
        if ours != theirs:
            raise SketchError("shape_mismatch", f"(width, depth, seed) {theirs} into {ours}")
        self._table += other._table

    def to_bytes(self) -> bytes:
        """Snapshot: magic, width, depth, seed, then the little-endian int64 table."""
        header = struct.pack("<4sIIQ", self._MAGIC, self._width, self._depth, self._seed)
        return header + self._table.astype("<i8").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> CountMin:
        """Restore a snapshot made by :meth:`to_bytes`.

        Raises:
            SketchError: if ``data`` is not such a snapshot.
        """
        head = struct.calcsize("<4sIIQ")
        if len(data) < head:
            raise SketchError("bad_snapshot", "too short for a CountMin snapshot")
        magic, width, depth, seed = struct.unpack_from("<4sIIQ", data)
        if magic != cls._MAGIC or len(data) != head + 8 * width * depth:
            raise SketchError("bad_snapshot", "not a CountMin snapshot or wrong length")
        sketch = cls(width, depth, seed)
        table = np.frombuffer(data, dtype="<i8", offset=head).reshape(depth, width)
        sketch._table[:] = table
        return sketch
