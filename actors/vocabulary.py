"""Interned names (item ids, categories): one integer id per distinct name, per shard actor.

State arrays hold small integer ids instead of strings, so a step looks each
event's name up once (a plain ``dict`` lookup, the only per-event Python) and
does everything else with numpy. Ids are local to one actor: whatever leaves it
(a snapshot, a hand-off, a partial) carries names, and the receiver interns
them again (:meth:`Vocabulary.ids`).

Ids are never reused while the actor lives: a partition that is forgotten
leaves its names behind, and the shard compacts by rebuilding its state when
too many are dead (see :meth:`~actors.shard.Shard.forget`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from itertools import repeat

import numpy as np

from actors.sketches import stable_hash64


class Vocabulary:
    """Names to ids and back, with a stable 64-bit hash of every name."""

    def __init__(self) -> None:
        self._ids: dict[str | None, int] = {None: -1}
        self.names: list[str] = []
        self._hashes = np.zeros(1024, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self.names)

    def ids(self, names: Sequence[str | None]) -> np.ndarray:
        """The id of each name (-1 for None), adding the new ones in order of appearance."""
        out = np.fromiter(map(self._ids.get, names, repeat(-2)), np.int64, len(names))
        unknown = np.flatnonzero(out == -2)
        if unknown.size:
            fresh = list(dict.fromkeys(names[i] for i in unknown.tolist()))  # in order, once
            start = len(self.names)
            self._ids.update(zip(fresh, range(start, start + len(fresh)), strict=True))
            self.names.extend(fresh)  # type: ignore[arg-type]  # no None: it is known
            self._hash_new(fresh)  # type: ignore[arg-type]
            out[unknown] = np.fromiter(
                map(self._ids.__getitem__, [names[i] for i in unknown.tolist()]), np.int64
            )
        return out

    def lookup(self, names: Sequence[str | None]) -> np.ndarray:
        """The id of each name, -1 for None or a name never interned (nothing is added)."""
        return np.fromiter(map(self._ids.get, names, repeat(-1)), np.int64, len(names))

    def name(self, code: int) -> str:
        """The name behind an id."""
        return self.names[code]

    def names_of(self, codes: np.ndarray) -> list[str]:
        """The names behind ids (all >= 0)."""
        names = self.names
        return [names[c] for c in codes.tolist()]

    def hashes(self, codes: np.ndarray) -> np.ndarray:
        """:func:`~actors.sketches.stable_hash64` of the names behind ids (all >= 0)."""
        return self._hashes[codes]

    def _hash_new(self, fresh: list[str]) -> None:
        end = len(self.names)
        if end > len(self._hashes):
            grown = np.zeros(max(end, 2 * len(self._hashes)), dtype=np.uint64)
            grown[: len(self._hashes)] = self._hashes
            self._hashes = grown
        self._hashes[end - len(fresh) : end] = stable_hash64(fresh)

    def nbytes(self) -> int:
        """Approximate bytes held: the names, the dict and the hashes."""
        per_name = sum(sys.getsizeof(n) for n in self.names)
        return per_name + sys.getsizeof(self._ids) + 8 * len(self.names) + self._hashes.nbytes
