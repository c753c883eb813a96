"""The stable hash and the error type every sketch shares."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from actors.errors import AudienceError

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
