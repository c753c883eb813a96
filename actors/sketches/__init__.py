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

from actors.sketches._common import SketchError, stable_hash64
from actors.sketches.count_min import CountMin
from actors.sketches.hll import HyperLogLog
from actors.sketches.space_saving import SpaceSaving

__all__ = [
    "CountMin",
    "HyperLogLog",
    "SketchError",
    "SpaceSaving",
    "stable_hash64",
]
