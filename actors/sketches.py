"""Mergeable streaming sketches for live metrics: distinct counts, heavy hitters, frequencies.

Shards each keep their own sketch and the serving layer merges them, so every
sketch here is *mergeable* (merging the sketches of two streams gives the sketch
of the concatenated stream, or one with the same guarantees) and snapshots to
plain bytes or dicts. Updates are vectorised per batch: one call per batch, no
per-event Python work beyond UTF-8 encoding.

All three share :func:`stable_hash64`, a 64-bit hash that is identical in every
process and run (Python's ``hash()`` is salted per process, so sketches built
with it could not be merged across shards or restored after a restart).
Changing that function invalidates every stored snapshot.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from actors.errors import AudienceError

__all__ = [
    "CountMin",
    "HyperLogLog",
    "SketchError",
    "SpaceSaving",
    "stable_hash64",
]

_U64 = np.uint64
_FMIX_C1 = _U64(0xFF51AFD7ED558CCD)
_FMIX_C2 = _U64(0xC4CEB9FE1A85EC53)
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_S33 = _U64(33)


class SketchError(AudienceError, ValueError):
    """A sketch cannot do what was asked: mismatched shapes, bad input, bad snapshot.

    A ``ValueError`` too, so callers that only know the builtins still catch it.

    Attributes:
        reason: short machine-readable reason, e.g. ``"precision_mismatch"``.
        detail: what exactly was wrong, for people.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, in place: a bijection with full avalanche."""
    h ^= h >> _S33
    h *= _FMIX_C1
    h ^= h >> _S33
    h *= _FMIX_C2
    h ^= h >> _S33
    return h


def stable_hash64(ids: Sequence[str]) -> np.ndarray:
    """Hash strings to uint64, identically in every process, run and platform.

    The UTF-8 bytes are read as little-endian 64-bit words and folded through the
    MurmurHash3 finaliser, starting from a seed that mixes in the byte length (so
    ``"a"`` and ``"a\\0"`` differ). Ids are grouped by word count so that one long
    id does not pad the whole batch. Not cryptographic: do not use it where an
    adversary chooses the ids to collide.

    Args:
        ids: the strings; lone surrogates are hashed by their surrogate bytes.

    Returns:
        A uint64 array, one hash per id, in order.
    """
    enc = [s.encode("utf-8", "surrogatepass") for s in ids]
    n = len(enc)
    out = np.empty(n, dtype=_U64)
    if n == 0:
        return out
    lens = np.fromiter(map(len, enc), dtype=np.int64, count=n)
    words = np.maximum((lens + 7) // 8, 1)
    widths = np.unique(words).tolist()
    for w in widths:
        if len(widths) == 1:
            sel, group = np.arange(n), enc
        else:
            sel = np.flatnonzero(words == w)
            group = [enc[i] for i in sel.tolist()]
        mat = np.array(group, dtype=f"S{8 * w}").view("<u8").reshape(len(sel), w)
        h = _fmix64((lens[sel] + 1).astype(_U64) * _GOLDEN)
        for j in range(w):
            h ^= mat[:, j]
            _fmix64(h)
        out[sel] = h
    return out


# --------------------------------------------------------------------------- HyperLogLog


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
