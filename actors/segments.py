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

``now`` is event time, never the wall clock: each partition's is the newest
event time applied to it, so replays and tests give the same memberships, and a
partition's memberships and counters depend on its own events only (they move
with it). Sizes add up across partitions because a user lives in one.

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

    ``now_ms`` holds each row's "now" (its partition's event time). Predicates
    must be False for rows that are not held (``view.held``).
    """

    name: str
    description: str
    predicate: Callable[[RowView, np.ndarray], np.ndarray]


def _engaged_24h(v: RowView, now: np.ndarray) -> np.ndarray:
    out = v.held & (v.last > now - DAY_MS)
    at = np.flatnonzero(out)  # decay the score of recent users only
    age = np.maximum(now[at] - v.last[at], 0) / v.half_life_ms
    out[at] = v.engagement[at] * np.exp2(-age) >= ENGAGED_MIN_SCORE
    return out


def _cart_abandoners(v: RowView, now: np.ndarray) -> np.ndarray:
    has_cart = v.last_cart != _NONE
    return (
        v.held
        & has_cart
        & (v.last_cart > v.last_purchase)
        & (v.last_cart <= now - CART_PATIENCE_MS)
        & (v.last_cart > now - 7 * DAY_MS)
    )


def _fading(v: RowView, now: np.ndarray) -> np.ndarray:
    idle = now // DAY_MS - v.last // DAY_MS  # whole days since the last active day
    out = v.held & (idle >= 7) & (idle <= 61)  # 3 active days must fit in the last 64
    at = np.flatnonzero(out)
    # Bit k of the bitmap is day (last_day - k): within the last 64 days of now
    # when k + idle < 64, i.e. among the low (64 - idle) bits.
    window = np.uint64(0xFFFF_FFFF_FFFF_FFFF) >> idle[at].astype(np.uint64)
    out[at] = np.bitwise_count(v.days[at] & window) >= 3
    return out


def _new_users(v: RowView, now: np.ndarray) -> np.ndarray:
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
    """Membership bits per row of one state table, with entries and exits per partition.

    Args:
        rules: at most 8 segments (one byte per row).
    """

    def __init__(self, rules: Sequence[SegmentRule] = DEFAULT_RULES) -> None:
        if not 1 <= len(rules) <= 8 or len({r.name for r in rules}) != len(rules):
            raise ValueError("need 1 to 8 segment rules with distinct names")
        self.rules = tuple(rules)
        self._bits = np.zeros(1024, dtype=np.uint8)
        self.entered: dict[int, np.ndarray] = {}  # partition -> per segment
        self.left: dict[int, np.ndarray] = {}
        self.now: dict[int, int] = {}  # partition -> its event-time "now"
        self._now_by_partition: np.ndarray | None = None  # the same as an array, kept

    def members(self, view: RowView, now_ms: int | np.ndarray) -> np.ndarray:
        """Membership bits (uint8 per row) of the rows of ``view`` as of ``now_ms``."""
        now = np.broadcast_to(np.asarray(now_ms, dtype=np.int64), len(view.held))
        bits = np.zeros(len(view.held), dtype=np.uint8)
        for j, rule in enumerate(self.rules):
            bits |= rule.predicate(view, now).astype(np.uint8) << np.uint8(j)
        return bits

    def advance(self, partitions: np.ndarray, newest_ms: np.ndarray) -> None:
        """Move each partition's "now" on to its newest activity time (never back)."""
        for p, t in zip(partitions.tolist(), newest_ms.tolist(), strict=True):
            if t > self.now.get(p, -(2**63)):
                self.now[p] = t
                self._now_by_partition = None

    def _now_of(self, view: RowView) -> tuple[np.ndarray, np.ndarray]:
        """Each row's "now" (its partition's), and which rows have one."""
        parts = view.partition.astype(np.int64)
        if not self.now:
            return np.zeros(len(parts), np.int64), np.zeros(len(parts), bool)
        table = self._now_by_partition
        if table is None or len(table) <= int(parts.max(initial=0)):
            top = max(max(self.now), int(parts.max(initial=0))) + 1
            table = np.full(top, -(2**62), dtype=np.int64)
            table[list(self.now)] = list(self.now.values())
            self._now_by_partition = table
        now = table[parts]
        return now, now != -(2**62)

    def update(
        self, table: UserStateTable, rows: np.ndarray, partitions: np.ndarray | None = None
    ) -> None:
        """Re-evaluate ``rows`` (unique, touched by an apply step) as of their partitions' now.

        ``partitions`` names each row's partition when the table no longer does
        (rows a deletion just freed: their user leaves its segments).
        """
        if rows.size == 0:
            return
        self._reserve(table.high)
        view = table.view(rows)
        if partitions is not None:
            view = view._replace(partition=partitions)
        now, known = self._now_of(view)
        new = np.where(known, self.members(view, now), np.uint8(0))
        self._transition(rows, view.partition, new)

    def refresh(self, table: UserStateTable) -> None:
        """Re-evaluate every row as of its partition's now: the time-driven entries and exits."""
        high = table.high
        if not high:
            return
        self._reserve(high)
        rows = np.arange(high)
        view = table.view(slice(0, high))
        now, known = self._now_of(view)
        new = np.where(known & view.held, self.members(view, now), np.uint8(0))
        self._transition(rows, view.partition, new)

    def of_row(self, table: UserStateTable, row: int) -> list[str]:
        """Names of the segments one row is in now (computed for that row alone)."""
        view = table.view(np.array([row]))
        now, known = self._now_of(view)
        if not known[0]:
            return []
        bits = int(self.members(view, now)[0])
        return [r.name for j, r in enumerate(self.rules) if bits >> j & 1]

    def sizes(self, partition: int = 0) -> dict[str, Any]:
        """One partition's plain-data partial: ``now_ms``, and per segment its size,
        entered and left counts."""
        zero = np.zeros(len(self.rules), dtype=np.int64)
        entered, left = self.entered.get(partition, zero), self.left.get(partition, zero)
        return {
            "now_ms": self.now.get(partition),
            "segments": {
                r.name: {
                    "size": int(entered[j] - left[j]),
                    "entered": int(entered[j]),
                    "left": int(left[j]),
                }
                for j, r in enumerate(self.rules)
            },
        }

    def export(self, partition: int, rows: np.ndarray) -> dict[str, Any]:
        """A partition's counters, its now and the bits of its ``rows`` (see :meth:`insert`)."""
        self._reserve(int(rows.max(initial=-1)) + 1)
        zero = np.zeros(len(self.rules), dtype=np.int64)
        return {
            "bits": self._bits[rows],
            "entered": self.entered.get(partition, zero).copy(),
            "left": self.left.get(partition, zero).copy(),
            "now_ms": self.now.get(partition),
        }

    def insert(self, partition: int, rows: np.ndarray, data: dict[str, Any]) -> None:
        """Take over a partition exported by :meth:`export`, its users now at ``rows``."""
        self._reserve(int(rows.max(initial=-1)) + 1)
        self._bits[rows] = data["bits"]
        self.entered[partition] = np.asarray(data["entered"], dtype=np.int64).copy()
        self.left[partition] = np.asarray(data["left"], dtype=np.int64).copy()
        if data["now_ms"] is not None:
            self.now[partition] = int(data["now_ms"])
        self._now_by_partition = None

    def forget(self, partition: int, rows: np.ndarray) -> None:
        """Drop a partition's counters and the bits of its (freed) ``rows``."""
        self._reserve(int(rows.max(initial=-1)) + 1)
        self._bits[rows] = 0
        self.entered.pop(partition, None)
        self.left.pop(partition, None)
        self.now.pop(partition, None)
        self._now_by_partition = None

    def clear_rows(self, rows: np.ndarray) -> None:
        """Bits of rows the table freed and will hand to new users (no exit is counted)."""
        self._reserve(int(rows.max(initial=-1)) + 1)
        self._bits[rows] = 0

    def _transition(self, rows: np.ndarray, parts: np.ndarray, new: np.ndarray) -> None:
        old = self._bits[rows]
        changed = np.flatnonzero(old != new)
        if not changed.size:
            return
        was, now = old[changed], new[changed]
        where = parts[changed].astype(np.int64)
        n = len(self.rules)
        for counters, moved in ((self.entered, now & ~was), (self.left, was & ~now)):
            flags = np.unpackbits(moved[:, None], axis=1, bitorder="little")[:, :n]
            sums = np.zeros((int(where.max()) + 1, n), dtype=np.int64)
            np.add.at(sums, where, flags)
            for p in np.flatnonzero(sums.any(axis=1)).tolist():
                self._counter(counters, p)[:] += sums[p]
        self._bits[rows[changed]] = new[changed]

    def _counter(self, counters: dict[int, np.ndarray], partition: int) -> np.ndarray:
        found = counters.get(partition)
        if found is None:
            found = counters[partition] = np.zeros(len(self.rules), dtype=np.int64)
        return found

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
