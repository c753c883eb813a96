"""A fixed-size ring of recent durations and its percentiles, for status pages and benches."""

from __future__ import annotations

import numpy as np


class LatencyRing:
    """The latest ``size`` durations in milliseconds; old ones fall out."""

    def __init__(self, size: int = 2048) -> None:
        self._values = np.zeros(size, dtype=np.float64)
        self._count = 0

    def add(self, ms: float) -> None:
        """Record one duration."""
        self._values[self._count % len(self._values)] = ms
        self._count += 1

    def raw(self) -> tuple[int, np.ndarray]:
        """How many values were ever recorded, and a copy of the ring holding the latest."""
        return self._count, self._values.copy()

    def percentiles(self) -> dict[str, float | None]:
        """p50, p99 and max of what the ring holds (None before the first value)."""
        held = self._values[: min(self._count, len(self._values))]
        if not len(held):
            return {"p50": None, "p99": None, "max": None}
        p50, p99 = np.percentile(held, [50, 99]).tolist()
        return {"p50": round(p50, 2), "p99": round(p99, 2), "max": round(float(held.max()), 2)}
