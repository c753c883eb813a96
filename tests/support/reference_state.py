"""A plain, event-by-event implementation of the per-user state rules.

It is the test oracle for ``actors.state.UserStateTable`` and the "plain loop"
baseline of the benchmarks: one dict per user, one Python step per event, no
numpy tricks. It deliberately does not import ``actors.state``, so a mistake in
the vectorised code cannot hide in both.
"""

from __future__ import annotations

import time
from typing import Any

from actors.batch import EventBatch
from actors.events import EVENT_TYPES, EventType

DAY_MS = 86_400_000
WEIGHTS = {
    EventType.PAGE_VIEW: 1.0,
    EventType.CLICK: 1.0,
    EventType.DWELL: 0.5,
    EventType.LIKE: 3.0,
    EventType.SHARE: 5.0,
    EventType.COMMENT: 4.0,
    EventType.ADD_TO_CART: 4.0,
    EventType.PURCHASE: 10.0,
    EventType.SIGNUP: 2.0,
    EventType.IDENTIFY: 0.0,
    EventType.SESSION_START: 0.0,
    EventType.SESSION_END: 0.0,
    EventType.USER_DELETED: 0.0,
}


class ReferenceState:
    """Same rules as the columnar table, written as the obvious loop."""

    def __init__(
        self,
        session_gap_ms: int = 30 * 60_000,
        half_life_ms: int = 7 * DAY_MS,
        recent_items: int = 20,
        max_categories: int = 32,
        day_window: int = 64,
    ) -> None:
        self.session_gap_ms = session_gap_ms
        self.half_life_ms = half_life_ms
        self.recent_items = recent_items
        self.max_categories = max_categories
        self.day_window = day_window
        self.users: dict[str, dict[str, Any]] = {}
        self.categories: list[str] = []  # named slots, at most max_categories - 1

    def apply(self, batch: EventBatch) -> int:
        """Apply each event in order, then drop users deleted in this batch."""
        deleted = []
        for i in range(len(batch)):
            kind = EVENT_TYPES[int(batch.type[i])]
            value = float(batch.value[i])
            self._apply_one(
                batch.user_id[i],
                kind,
                int(batch.ts[i]),
                batch.item_id[i],
                batch.category[i],
                0.0 if value != value else value,
            )
            if batch.traits[i]:
                self.users[batch.user_id[i]]["traits"].update(batch.traits[i])
            if kind is EventType.USER_DELETED:
                deleted.append(batch.user_id[i])
        for user_id in deleted:
            self.users.pop(user_id, None)
        return len(batch)

    def _category_name(self, category: str) -> str:
        if category == "other" or category in self.categories:
            return category
        if len(self.categories) < self.max_categories - 1:
            self.categories.append(category)
            return category
        return "other"

    def _apply_one(
        self,
        user_id: str,
        kind: EventType,
        ts: int,
        item: str | None,
        category: str | None,
        value: float,
    ) -> None:
        user = self.users.get(user_id)
        if user is None:
            user = {
                "counts": {t: 0 for t in EventType},
                "first": ts,
                "last": None,
                "sessions": 0,
                "dwell": 0.0,
                "revenue": 0.0,
                "engagement": 0.0,
                "recent": [],
                "affinity": {},
                "days": set(),
                "traits": {},
            }
            self.users[user_id] = user
        user["counts"][kind] += 1
        user["first"] = min(user["first"], ts)

        last = user["last"]
        if last is None or kind is EventType.SESSION_START or ts - last > self.session_gap_ms:
            user["sessions"] += 1

        if kind is EventType.DWELL:
            user["dwell"] += value
        if kind is EventType.PURCHASE:
            user["revenue"] += value

        # Scores are kept as of the user's latest timestamp; move it forward first.
        if last is None:
            last = ts
        if ts > last:
            factor = 2.0 ** (-(ts - last) / self.half_life_ms)
            user["engagement"] *= factor
            for name in user["affinity"]:
                user["affinity"][name] *= factor
            last = ts
        user["last"] = last
        gain = WEIGHTS[kind] * 2.0 ** (-(last - ts) / self.half_life_ms)
        user["engagement"] += gain
        if category is not None:
            name = self._category_name(category)
            user["affinity"][name] = user["affinity"].get(name, 0.0) + gain

        if item is not None and (not user["recent"] or user["recent"][0] != item):
            user["recent"].insert(0, item)
            del user["recent"][self.recent_items :]

        user["days"].add(ts // DAY_MS)

    def profile(self, user_id: str) -> dict[str, Any] | None:
        """The same JSON-ready dict as ``UserStateTable.profile``."""
        user = self.users.get(user_id)
        if user is None:
            return None
        last_day = user["last"] // DAY_MS
        affinity = {k: v for k, v in user["affinity"].items() if v != 0.0}
        ranked = sorted(affinity.items(), key=lambda kv: (-kv[1], kv[0]))
        return {
            "user_id": user_id,
            "counts": {t.value: n for t, n in user["counts"].items()},
            "events": sum(user["counts"].values()),
            "first_seen": _iso(user["first"]),
            "last_seen": _iso(user["last"]),
            "first_seen_ms": user["first"],
            "last_seen_ms": user["last"],
            "sessions": user["sessions"],
            "dwell_seconds": user["dwell"],
            "revenue": user["revenue"],
            "engagement": user["engagement"],
            "recent_items": list(user["recent"]),
            "category_affinity": dict(ranked),
            "active_days": sum(1 for d in user["days"] if last_day - d < self.day_window),
            "traits": dict(user["traits"]),
        }


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"
