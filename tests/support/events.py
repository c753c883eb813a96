"""Small, readable event builders for tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from actors.batch import EventBatch
from actors.events import TYPE_CODE, EventType

T0 = 1_700_000_000_000  # 2023-11-14, a fixed event-time origin


def event(
    user_id: str = "u1",
    type: str = "page_view",
    ts: str = "2024-05-01T12:00:00Z",
    event_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One event as a JSON-ready dict, with defaults for what a test does not care about."""
    global _counter
    _counter += 1
    return {
        "event_id": event_id or f"ev-{_counter}",
        "user_id": user_id,
        "type": type,
        "ts": ts,
        **extra,
    }


_counter = 0


def random_batch(n: int, users: int, seed: int = 0, t0: int = T0, prefix: str = "u") -> EventBatch:
    """A seeded batch over ``users`` users with every common field filled in."""
    rng = np.random.default_rng(seed)
    types = rng.choice(
        [TYPE_CODE[t] for t in EventType if t is not EventType.USER_DELETED], size=n
    ).astype(np.uint8)
    return EventBatch(
        event_id=[f"{prefix}-{seed}-{i}" for i in range(n)],
        user_id=[f"{prefix}{x}" for x in rng.integers(0, users, n)],
        type=types,
        ts=t0 + np.sort(rng.integers(0, 3 * 86_400_000, n)),
        item_id=[f"item-{x}" for x in rng.zipf(1.5, n) % 500],
        category=[f"cat-{x}" for x in rng.integers(0, 12, n)],
        value=np.round(rng.random(n) * 50, 2),
        source=np.zeros(n, dtype=np.uint8),
    )
