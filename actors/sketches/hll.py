"""HyperLogLog: mergeable distinct counts with a stated relative error."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from actors.sketches._common import (
    _U64,
    SketchError,
    stable_hash64,
)


def _ertl_sigma(x: float) -> float:
    """Ertl (2017), eq. for sigma: the small-range term of the improved estimator."""
    if x == 1.0:
        return math.inf
    y, z = 1.0, x
    while True:
        x *= x
        z_old = z
        z += x * y
        y += y
        if z == z_old:
            return z


def _ertl_tau(x: float) -> float:
    """Ertl (2017), eq. for tau: the large-range term of the improved estimator."""
    if x in (0.0, 1.0):
        return 0.0
    y, z = 1.0, 1.0 - x
    while True:
        x = math.sqrt(x)
        z_old = z
        y *= 0.5
        z -= (1 - x) ** 2 * y
        if z == z_old:
            return z / 3


class HyperLogLog:
    """Distinct counts (DAU/WAU/MAU, cohort sizes) in ``2**precision`` bytes.

    Standard error is ``1.04 / sqrt(2**precision)`` (1.6 % at the default 12, in
    4 KiB). Small cardinalities use linear counting, which is within a few ids
    below a hundred. Merging takes the register-wise max, so a week is the merge
    of its days and a cluster total the merge of its shards, with no double counts.
    """

    MIN_PRECISION = 4
    MAX_PRECISION = 18
    _MAGIC = b"HLL\x01"

    def __init__(self, precision: int = 12) -> None:
        """Create an empty sketch.

        Raises:
            SketchError: if precision is outside ``[4, 18]``.
        """
        if not (
            isinstance(precision, int) and self.MIN_PRECISION <= precision <= self.MAX_PRECISION
        ):
            raise SketchError(
                "bad_precision",
                f"precision must be an int in [{self.MIN_PRECISION}, {self.MAX_PRECISION}],"
                f" got {precision!r}",
            )
        self._p = precision
        self._m = 1 << precision
        self._registers = np.zeros(self._m, dtype=np.uint8)

    @property
    def precision(self) -> int:
        """Number of index bits; the sketch has ``2**precision`` registers."""
        return self._p

    @property
    def relative_error(self) -> float:
        """Standard error of :meth:`count` relative to the true count, ``1.04/sqrt(m)``."""
        return 1.04 / math.sqrt(self._m)

    @property
    def registers(self) -> np.ndarray:
        """A read-only view of the uint8 registers, for comparison and debugging."""
        view = self._registers.view()
        view.flags.writeable = False
        return view

    def add_many(self, ids: Sequence[str]) -> None:
        """Add a batch of ids; repeats and ids seen before change nothing."""
        self.add_hashes(stable_hash64(ids))

    def add_hashes(self, hashes: np.ndarray) -> None:
        """Add ids already hashed with :func:`stable_hash64` (to hash a batch once)."""
        h = np.asarray(hashes, dtype=_U64)
        if h.size == 0:
            return
        tail_bits = 64 - self._p
        idx = (h >> _U64(tail_bits)).astype(np.intp)
        # The rank is 1 + trailing zeros of the low bits; a sentinel bit caps it.
        rest = (h & _U64((1 << tail_bits) - 1)) | _U64(1 << tail_bits)
        lowest = rest & (~rest + _U64(1))
        rank = np.frexp(lowest.astype(np.float64))[1].astype(np.uint8)
        np.maximum.at(self._registers, idx, rank)

    def count(self) -> float:
        """Estimated number of distinct ids added so far.

        Linear counting while it is the more accurate estimator (up to ``0.75 m``,
        the HyperLogLog++ switch point), then Ertl's improved raw estimator,
        which has no bias bump around ``2.5 m`` and needs no bias tables.
        """
        m = self._m
        zeros = int(np.count_nonzero(self._registers == 0))
        if zeros > 0:
            linear = m * math.log(m / zeros)
            if linear <= 0.75 * m:
                return linear
        q = 64 - self._p
        hist = np.bincount(self._registers, minlength=q + 2).tolist()
        z = m * _ertl_tau(1 - hist[q + 1] / m)
        for k in range(q, 0, -1):
            z = 0.5 * (z + hist[k])
        z += m * _ertl_sigma(hist[0] / m)
        return m * m / (2 * math.log(2) * z)

    def merge(self, other: HyperLogLog) -> None:
        """Fold ``other`` into this sketch: afterwards it counts the union.

        Raises:
            SketchError: if the precisions differ (registers would not line up).
        """
        if other._p != self._p:
            raise SketchError(
                "precision_mismatch", f"cannot merge precision {other._p} into {self._p}"
            )
        np.maximum(self._registers, other._registers, out=self._registers)

    def copy(self) -> HyperLogLog:
        """An independent copy, e.g. to merge days into a week without touching a day."""
        twin = HyperLogLog(self._p)
        twin._registers[:] = self._registers
        return twin

    def to_bytes(self) -> bytes:
        """Snapshot: a 5-byte header (magic, precision) followed by the registers."""
        return self._MAGIC + bytes([self._p]) + self._registers.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> HyperLogLog:
        """Restore a snapshot made by :meth:`to_bytes`.

        Raises:
            SketchError: if ``data`` is not such a snapshot.
        """
        if len(data) < 5 or data[:4] != cls._MAGIC:
            raise SketchError("bad_snapshot", "not a HyperLogLog snapshot (magic)")
        p = data[4]
        if not cls.MIN_PRECISION <= p <= cls.MAX_PRECISION or len(data) != 5 + (1 << p):
            raise SketchError("bad_snapshot", f"precision {p} with {len(data) - 5} registers")
        regs = np.frombuffer(data, dtype=np.uint8, offset=5)
        if int(regs.max()) > 65 - p:
            raise SketchError("bad_snapshot", f"register value above {65 - p}")
        sketch = cls(p)
        sketch._registers[:] = regs
        return sketch


# --------------------------------------------------------------------------- Space-Saving
