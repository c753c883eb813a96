"""Rule-based segments: users enter and leave as events arrive and as event time moves on."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from actors.batch import EventBatch
from actors.codec import encode
from actors.delivery import Delivery
from actors.events import TYPE_CODE, EventType
from actors.insights import merge_insights, segments_report
from actors.segments import ENGAGED_MIN_SCORE, SegmentTracker, merge_segments
from actors.shard import Shard
from actors.state import DAY_MS, DEFAULT_WEIGHTS, StateRules, UserStateTable

BASE = 1_704_067_200_000  # 2024-01-01
H = 3_600_000
_ids = itertools.count()


def make_batch(rows: Sequence[tuple[str, str, int]]) -> EventBatch:
    """A batch from (user, type, ts) tuples."""
    n = len(rows)
    return EventBatch(
        event_id=[f"s{next(_ids)}" for _ in range(n)],
        user_id=[r[0] for r in rows],
        type=np.array([TYPE_CODE[EventType(r[1])] for r in rows], dtype=np.uint8),
        ts=np.array([r[2] for r in rows], dtype=np.int64),
        item_id=[None] * n,
        category=[None] * n,
        value=np.full(n, np.nan),
        source=np.zeros(n, dtype=np.uint8),
    )


class Feed:
    """Drives one shard that owns partition 0 with scripted steps."""

    def __init__(self) -> None:
        self.shard = Shard(0, [0])
        self.seq = 0

    def step(self, *rows: tuple[str, str, int]) -> None:
        self.seq += 1
        result = self.shard.apply([Delivery(0, self.seq, 0, 0, encode(make_batch(rows)))])
        assert not result.rejected

    def sizes(self) -> dict[str, int]:
        return {k: v["size"] for k, v in self.shard.segment_sizes()["segments"].items()}

    def segments_of(self, user: str) -> list[str]:
        (profile,) = self.shard.profiles([user])
        assert profile is not None
        return profile["segments"]


def test_cart_and_purchase_times_are_the_newest_of_each_however_batched() -> None:
    rng = np.random.default_rng(3)
    types = ["add_to_cart", "purchase", "page_view"]
    rows = [
        (
            f"u{rng.integers(0, 40)}",
            types[rng.integers(0, 3)],
            BASE + int(rng.integers(0, 9 * DAY_MS)),
        )
        for _ in range(800)
    ]
    whole, cut = UserStateTable(), UserStateTable()
    whole.apply(make_batch(rows))
    for a, b in itertools.pairwise([0, 100, 101, 450, 800]):
        cut.apply(make_batch(rows[a:b]))
    for user in {r[0] for r in rows}:
        carts = [t for u, k, t in rows if u == user and k == "add_to_cart"]
        buys = [t for u, k, t in rows if u == user and k == "purchase"]
        none = np.iinfo(np.int64).min
        for table in (whole, cut):
            view = table.view(table.rows_of([user]))
            assert int(view.last_cart[0]) == max(carts, default=none)
            assert int(view.last_purchase[0]) == max(buys, default=none)


def test_users_enter_and_leave_segments_as_events_arrive_and_event_time_moves_on() -> None:
    feed = Feed()
    feed.step(*[("eng", "purchase", BASE)] * 2, ("cart", "add_to_cart", BASE))
    assert feed.segments_of("eng") == ["engaged_24h", "new_users"]
    assert feed.segments_of("cart") == ["new_users"]  # carted just now: not abandoned yet
    assert feed.sizes() == {"engaged_24h": 1, "cart_abandoners": 0, "fading": 0, "new_users": 2}

    feed.step(("other", "page_view", BASE + 2 * H))  # event time moves on by 2 h
    assert feed.sizes()["cart_abandoners"] == 0  # time-driven entries wait for the fold
    feed.shard.fold_insights()
    assert feed.sizes()["cart_abandoners"] == 1
    assert feed.segments_of("cart") == ["cart_abandoners", "new_users"]

    feed.step(("cart", "purchase", BASE + 3 * H))  # buying takes the user out at once
    assert feed.sizes()["cart_abandoners"] == 0
    assert "cart_abandoners" not in feed.segments_of("cart")

    day = BASE // DAY_MS * DAY_MS
    feed.step(*[("fade", "page_view", day + d * DAY_MS + H) for d in (0, 1, 2)])
    feed.step(("other", "page_view", day + 10 * DAY_MS))
    feed.shard.fold_insights()
    assert feed.segments_of("fade") == ["fading"]
    assert feed.segments_of("eng") == []  # quiet for 10 days: no longer engaged, nor new
    assert feed.sizes() == {"engaged_24h": 0, "cart_abandoners": 0, "fading": 1, "new_users": 0}

    feed.step(("fade", "user_deleted", day + 10 * DAY_MS))
    counts = feed.shard.segment_sizes()["segments"]
    assert counts["fading"] == {"size": 0, "entered": 1, "left": 1}
    assert counts["cart_abandoners"] == {"size": 0, "entered": 1, "left": 1}
    assert counts["new_users"]["entered"] == 4 and counts["new_users"]["size"] == 0
    assert feed.shard.segment_sizes()["now_ms"] == day + 10 * DAY_MS


def reference_segments(events: list[tuple[str, str, int]], now: int) -> set[str]:
    """One user's segments computed from its events with plain Python."""
    ts = [t for _, _, t in events]
    first, last = min(ts), max(ts)
    h = StateRules().engagement_half_life_ms
    weight = dict(zip(EventType, DEFAULT_WEIGHTS, strict=True))
    score = sum(weight[EventType(k)] * math.pow(2, (t - now) / h) for _, k, t in events)
    carts = [t for _, k, t in events if k == "add_to_cart"]
    buys = [t for _, k, t in events if k == "purchase"]
    days = {t // DAY_MS for t in ts}
    out = set()
    if last > now - DAY_MS and score >= ENGAGED_MIN_SCORE:
        out.add("engaged_24h")
    if carts and max(carts) > max(buys, default=-1) and now - 7 * DAY_MS < max(carts) <= now - H:
        out.add("cart_abandoners")
    recent = [d for d in days if d > now // DAY_MS - 64]
    if last // DAY_MS <= now // DAY_MS - 7 and len(recent) >= 3:
        out.add("fading")
    if first > now - 7 * DAY_MS:
        out.add("new_users")
    return out


def random_rows(seed: int, n: int = 4000, users: int = 300) -> list[tuple[str, str, int]]:
    rng = np.random.default_rng(seed)
    kinds = ["page_view", "like", "add_to_cart", "purchase", "share"]
    span = rng.integers(1, 80, users) * DAY_MS  # some users active over weeks, some briefly
    begin = BASE + rng.integers(0, 100, users) * DAY_MS  # some users arrive near the end
    out = []
    for _ in range(n):
        u = int(rng.integers(0, users))
        t = int(begin[u]) + int(rng.integers(0, 90 * DAY_MS)) % int(span[u])
        t = min(t, BASE + 100 * DAY_MS)
        out.append((f"r{u}", kinds[int(rng.integers(0, 5))], t))
    return out


def test_vectorised_membership_equals_a_per_user_reference_on_random_state() -> None:
    rows = random_rows(7)
    table = UserStateTable()
    table.apply(make_batch(rows))
    tracker = SegmentTracker()
    newest = max(t for *_, t in rows)
    by_user: dict[str, list[tuple[str, str, int]]] = {}
    for r in rows:
        by_user.setdefault(r[0], []).append(r)
    seen: set[str] = set()
    for now in (newest, newest + 2 * H, newest + 3 * DAY_MS, newest + 9 * DAY_MS):
        bits = tracker.members(table.view(slice(0, table.high)), now)
        for user, events in by_user.items():
            row = int(table.rows_of([user])[0])
            got = {r.name for j, r in enumerate(tracker.rules) if int(bits[row]) >> j & 1}
            assert got == reference_segments(events, now), (user, now)
            seen |= got
    assert seen == {r.name for r in tracker.rules}  # every rule was exercised


def test_sizes_kept_incrementally_equal_a_full_count_and_merge_by_summing() -> None:
    rows = sorted(random_rows(11), key=lambda r: r[2])
    shards = [Shard(i, [i]) for i in range(2)]
    seqs = [0, 0]
    for start in range(0, len(rows), 250):
        chunk = rows[start : start + 250]
        for i, shard in enumerate(shards):
            mine = [r for r in chunk if int(r[0][1:]) % 2 == i]
            if mine:
                seqs[i] += 1
                shard.apply([Delivery(i, seqs[i], 0, 0, encode(make_batch(mine)))])
    partials: list[dict[str, Any]] = [s.insights_partials() for s in shards]  # folds: refresh
    merged = merge_segments([p["segments"] for p in partials])
    by_user: dict[str, list[tuple[str, str, int]]] = {}
    for r in rows:
        by_user.setdefault(r[0], []).append(r)
    for shard, partial in zip(shards, partials, strict=True):
        now = partial["segments"]["now_ms"]
        for name, counts in partial["segments"]["segments"].items():
            truth = sum(
                name in reference_segments(ev, now)
                for u, ev in by_user.items()
                if int(u[1:]) % 2 == shard.shard_id
            )
            assert counts["size"] == truth == counts["entered"] - counts["left"]
    for name, counts in merged["segments"].items():
        assert counts["size"] == sum(p["segments"]["segments"][name]["size"] for p in partials)
    report = segments_report(merge_insights(partials))
    assert [s["name"] for s in report["segments"]] == list(merged["segments"])
    assert all(s["description"] for s in report["segments"])
    assert [s["size"] for s in report["segments"]] == [
        c["size"] for c in merged["segments"].values()
    ]


def test_a_shard_without_events_reports_empty_segments() -> None:
    shard = Shard(0, [0])
    report = segments_report(merge_insights([shard.insights_partials()]))
    assert report["event_time"] is None
    assert {s["size"] for s in report["segments"]} == {0}
