"""Ground truth counted straight from the events, and the checks of shard state against it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from actors.batch import EventBatch
from actors.errors import ShardRecovering
from actors.events import EVENT_TYPES
from actors.pool import ShardPool
from tests.support.waiting import async_wait_until

Truth = dict[str, Counter[str]]


def truth_of(*batches: EventBatch) -> Truth:
    """Per user, the count of each event type in ``batches`` (ids unique: no repeats)."""
    truth: Truth = {}
    for batch in batches:
        for user, code in zip(batch.user_id, batch.type.tolist(), strict=True):
            truth.setdefault(user, Counter())[EVENT_TYPES[code].value] += 1
    return truth


def mismatched(profiles: Sequence[dict[str, Any] | None], truth: Truth) -> list[str]:
    """Users (``profiles`` in ``sorted(truth)`` order) whose counts differ from the truth."""
    wrong = []
    for user, profile in zip(sorted(truth), profiles, strict=True):
        counts = profile["counts"] if profile else {}
        if any(counts.get(t.value, 0) != truth[user][t.value] for t in EVENT_TYPES):
            wrong.append(user)
    return wrong


def assert_counts(profiles: Sequence[dict[str, Any]], truth: Truth) -> None:
    """Every profile's counts equal its user's truth."""
    for profile in profiles:
        expected = truth[profile["user_id"]]
        assert profile["counts"] == {t.value: expected[t.value] for t in EVENT_TYPES}


async def settled_profiles(pool: ShardPool, truth: Truth, timeout_s: float = 120) -> list[dict]:
    """The users' profiles (``sorted(truth)`` order) once the shards applied every event."""
    users, expected = sorted(truth), sum(sum(c.values()) for c in truth.values())

    async def applied() -> list[dict] | None:
        try:
            profiles = await pool.profiles(users)
        except ShardRecovering:  # restarting or replaying: the API would answer 503
            return None
        done = sum(p["events"] for p in profiles if p) == expected
        return profiles if done else None  # type: ignore[return-value]

    return await async_wait_until(applied, timeout_s=timeout_s)
