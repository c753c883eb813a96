"""Rule-based segments that users enter and leave as events arrive and event time moves on.

A :class:`SegmentRule` is a vectorised predicate over a
:class:`~actors.state.RowView` (the state table's columns for some rows) as of
an event time ``now``. A :class:`SegmentTracker` keeps one membership byte per
row (bit ``j`` = in segment ``j``) next to the shard's table and counts entries
and exits: :meth:`SegmentTracker.update` re-evaluates the rows an apply step
touched (users enter and leave as their events arrive), :meth:`SegmentTracker.refresh`
re-evaluates every row (exits and entries caused by time alone, e.g. a user
going quiet), a few milliseconds per million rows. Queries read counters and
never scan users.

``now`` is event time, never the wall clock: the shard passes the newest event
time it has applied, so replays and tests give the same memberships. Each shard
has its own ``now``; sizes add up across shards because a user lives on one.

Known limit: a row freed by a ``user_deleted`` event and reused by a new user
within the same apply step hands its old bits to the new user, so that step
counts the difference of the two users, not a leave and an enter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.state import DAY_MS, RowView, UserStateTable

HOUR_MS = 3_600_000
ENGAGED_MIN_SCORE = 10.0
CART_PATIENCE_MS = HOUR_MS
_NONE = np.iinfo(np.int64).min


@dataclass(frozen=True)
class SegmentRule:
    """A named segment: ``predicate(view, now_ms)`` is a boolean mask over the view's rows.

    Predicates must be False for rows that are not held (``view.held``).
    """

    name: str
    description: str
    predicate: Callable[[RowView, int], np.ndarray]


def _engaged_24h(v: RowView, now: int) -> np.ndarray:
    out = v.held & (v.last > now - DAY_MS)
    at = np.flatnonzero(out)  # decay the score of recent users only
    age = np.maximum(now - v.last[at], 0) / v.half_life_ms
    out[at] = v.engagement[at] * np.exp2(-age) >= ENGAGED_MIN_SCORE
    return out


def _cart_abandoners(v: RowView, now: int) -> np.ndarray:
    has_cart = v.last_cart != _NONE
    return (
        v.held
        & has_cart
        & (v.last_cart > v.last_purchase)
        & (v.last_cart <= now - CART_PATIENCE_MS)
        & (v.last_cart > now - 7 * DAY_MS)
    )


def _fading(v: RowView, now: int) -> np.ndarray:
    idle = now // DAY_MS - v.last // DAY_MS  # whole days since the last active day
    out = v.held & (idle >= 7) & (idle <= 61)  # 3 active days must fit in the last 64
    at = np.flatnonzero(out)
    # Bit k of the bitmap is day (last_day - k): within the last 64 days of now
    # when k + idle < 64, i.e. among the low (64 - idle) bits.
    window = np.uint64(0xFFFF_FFFF_FFFF_FFFF) >> idle[at].astype(np.uint64)
    out[at] = np.bitwise_count(v.days[at] & window) >= 3
    return out


def _new_users(v: RowView, now: int) -> np.ndarray:
    return v.held & (v.first > now - 7 * DAY_MS)


DEFAULT_RULES: tuple[SegmentRule, ...] = (
    SegmentRule(
        "engaged_24h",
        f"last seen within 24 h of now, with a decayed engagement score >= {ENGAGED_MIN_SCORE:g}",
        _engaged_24h,
    ),
    SegmentRule(
        "cart_abandoners",
        "added to cart after their last purchase (or without one), the newest cart"
        " between 1 h and 7 days before now",
        _cart_abandoners,
    ),
    SegmentRule(
        "fading",
        "active on at least 3 of the last 64 days, but not in the last 7",
        _fading,
    ),
    SegmentRule("new_users", "first seen within 7 days of now", _new_users),
)


class SegmentTracker:
    """Membership bits per row of one state table, with entries and exits per segment.

    Args:
        rules: at most 8 segments (one byte per row).
    """

    def __init__(self, rules: Sequence[SegmentRule] = DEFAULT_RULES) -> None:
        if not 1 <= len(rules) <= 8 or len({r.name for r in rules}) != len(rules):
            raise ValueError("need 1 to 8 segment rules with distinct names")
        self.rules = tuple(rules)
        self._bits = np.zeros(1024, dtype=np.uint8)
        self.entered = np.zeros(len(rules), dtype=np.int64)
        self.left = np.zeros(len(rules), dtype=np.int64)
        self.now_ms: int | None = None

    def members(self, view: RowView, now_ms: int) -> np.ndarray:
        """Membership bits (uint8 per row) of the rows of ``view`` as of ``now_ms``."""
        bits = np.zeros(len(view.held), dtype=np.uint8)
        for j, rule in enumerate(self.rules):
            bits |= rule.predicate(view, now_ms).astype(np.uint8) << np.uint8(j)
        return bits

    def update(self, table: UserStateTable, rows: np.ndarray, now_ms: int) -> None:
        """Re-evaluate ``rows`` (unique, as touched by an apply step) as of ``now_ms``."""
        self.now_ms = now_ms
        if rows.size == 0:
            return
        self._reserve(table.high)
        self._transition(rows, self.members(table.view(rows), now_ms))

    def refresh(self, table: UserStateTable, now_ms: int) -> None:
        """Re-evaluate every row as of ``now_ms``: the time-driven entries and exits."""
        self.now_ms = now_ms
        high = table.high
        self._reserve(high)
        rows = slice(0, high)
        self._transition(rows, self.members(table.view(rows), now_ms))

    def of_row(self, table: UserStateTable, row: int) -> list[str]:
        """Names of the segments one row is in now (computed for that row alone)."""
        if self.now_ms is None:
            return []
        bits = int(self.members(table.view(np.array([row])), self.now_ms)[0])
        return [r.name for j, r in enumerate(self.rules) if bits >> j & 1]

    def sizes(self) -> dict[str, Any]:
        """Plain-data partial: ``now_ms`` and per segment its size, entered and left counts."""
        return {
            "now_ms": self.now_ms,
            "segments": {
                r.name: {
                    "size": int(self.entered[j] - self.left[j]),
                    "entered": int(self.entered[j]),
                    "left": int(self.left[j]),
                }
                for j, r in enumerate(self.rules)
            },
        }

    def _transition(self, rows: np.ndarray | slice, new: np.ndarray) -> None:
        old = self._bits[rows]
        changed = np.flatnonzero(old != new)
        if changed.size:
            was, now = old[changed], new[changed]
            up, down = now & ~was, was & ~now
            for j in range(len(self.rules)):
                bit = np.uint8(1 << j)
                self.entered[j] += int(np.count_nonzero(up & bit))
                self.left[j] += int(np.count_nonzero(down & bit))
            self._bits[rows] = new

    def _reserve(self, high: int) -> None:
        if high > len(self._bits):
            grown = np.zeros(max(high, 2 * len(self._bits)), dtype=np.uint8)
            grown[: len(self._bits)] = self._bits
            self._bits = grown


def merge_segments(partials: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Sum shard partials of :meth:`SegmentTracker.sizes`; ``now_ms`` is the newest of them."""
    nows = [p["now_ms"] for p in partials if p and p["now_ms"] is not None]
    merged: dict[str, dict[str, int]] = {}
    for p in partials:
        for name, counts in (p or {}).get("segments", {}).items():
            into = merged.setdefault(name, {"size": 0, "entered": 0, "left": 0})
            for key in into:
                into[key] += int(counts[key])
    return {"now_ms": max(nows) if nows else None, "segments": merged}


def segments_answer(
    merged: Mapping[str, Any], rules: Sequence[SegmentRule] = DEFAULT_RULES
) -> list[dict[str, Any]]:
    """Every known segment with its description and merged counts, in rule order."""
    counts = merged["segments"]
    zero = {"size": 0, "entered": 0, "left": 0}
    return [
        {"name": r.name, "description": r.description, **counts.get(r.name, zero)} for r in rules
    ]
