"""The columnar per-user state agrees with the plain reference loop, however batched."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest

from actors.batch import EventBatch
from actors.events import EVENT_TYPES, N_TYPES, TYPE_CODE, EventType
from actors.state import DAY_MS, StateRules, UserStateTable, _segmented_cummax
from tests.support.reference_state import ReferenceState

BASE = 1_700_000_000_000
T = TYPE_CODE


def make_batch(rows: list[tuple[Any, ...]]) -> EventBatch:
    """A batch from (user, type, ts[, item, category, value]) tuples."""
    full = [tuple(r) + (None,) * (6 - len(r)) for r in rows]
    return EventBatch(
        event_id=[f"e{i}" for i in range(len(full))],
        user_id=[r[0] for r in full],
        type=np.array([T[r[1]] for r in full], dtype=np.uint8),
        ts=np.array([r[2] for r in full], dtype=np.int64),
        item_id=[r[3] for r in full],
        category=[r[4] for r in full],
        value=np.array([np.nan if r[5] is None else r[5] for r in full], dtype=np.float64),
        source=np.zeros(len(full), dtype=np.uint8),
    )


def random_batch(
    seed: int, n: int = 6000, users: int = 300, deletes: bool = False, days: int = 100
) -> EventBatch:
    """Out-of-order timestamps, items, > 32 categories, values, session starts."""
    rng = np.random.default_rng(seed)
    kinds = [t for t in EVENT_TYPES if t is not EventType.USER_DELETED]
    probs = np.ones(len(kinds)) / len(kinds)
    types = rng.choice([T[k] for k in kinds], size=n, p=probs).astype(np.uint8)
    if deletes:
        types[rng.random(n) < 0.003] = T[EventType.USER_DELETED]
    # Time mostly moves forward with jitter; a fifth of the events land anywhere.
    ts = BASE + np.arange(n) * (days * DAY_MS // n) + rng.integers(-3_600_000, 3_600_000, n)
    anywhere = rng.random(n) < 0.2
    ts[anywhere] = BASE + rng.integers(0, days * DAY_MS, int(anywhere.sum()))
    has_item = rng.random(n) < 0.7
    items = [
        f"item{k}" if h else None for k, h in zip(rng.integers(0, 500, n), has_item, strict=True)
    ]
    has_cat = rng.random(n) < 0.6
    cats = [f"cat{k}" if h else None for k, h in zip(rng.integers(0, 45, n), has_cat, strict=True)]
    cats = ["other" if c == "cat44" else c for c in cats]
    value = np.where(rng.random(n) < 0.8, rng.random(n) * 100, np.nan)
    return EventBatch(
        event_id=[f"e{i}" for i in range(n)],
        user_id=[f"u{int(users * x**3)}" for x in rng.random(n)],  # a few heavy users
        type=types,
        ts=ts.astype(np.int64),
        item_id=items,
        category=cats,
        value=value,
        source=np.zeros(n, dtype=np.uint8),
    )


def split(batch: EventBatch, rng: np.random.Generator, pieces: int) -> list[EventBatch]:
    cuts = np.sort(rng.choice(np.arange(1, len(batch)), size=pieces - 1, replace=False))
    bounds = [0, *cuts.tolist(), len(batch)]
    return [batch.take(np.arange(a, b)) for a, b in itertools.pairwise(bounds)]


def assert_profiles_match(got: dict[str, Any] | None, want: dict[str, Any] | None) -> None:
    assert (got is None) == (want is None)
    if got is None or want is None:
        return
    assert got.keys() == want.keys()
    for key in got:
        if key in ("dwell_seconds", "revenue", "engagement"):
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-9), key
        elif key == "category_affinity":
            assert got[key].keys() == want[key].keys()
            for name, weight in want[key].items():
                assert got[key][name] == pytest.approx(weight, rel=1e-5, abs=1e-9), name
        else:
            assert got[key] == want[key], key


def test_random_batches_give_the_same_profiles_as_the_reference_loop() -> None:
    table, ref = UserStateTable(capacity=16), ReferenceState()
    rng = np.random.default_rng(7)
    for seed in range(3):
        for part in split(random_batch(seed, deletes=True), rng, 4):
            assert table.apply(part) == ref.apply(part)
    assert set(table.users()) == set(ref.users)
    assert len(table) == len(ref.users) > 200
    for user in sorted(ref.users):
        assert_profiles_match(table.profile(user), ref.profile(user))


def test_small_limits_match_the_reference_too() -> None:
    rules = StateRules(recent_items=3, max_categories=5, active_day_window=10)
    table = UserStateTable(rules, capacity=4)
    ref = ReferenceState(recent_items=3, max_categories=5, day_window=10)
    batch = random_batch(11, n=3000, users=100, days=30)
    table.apply(batch)
    ref.apply(batch)
    for user in ref.users:
        assert_profiles_match(table.profile(user), ref.profile(user))


def test_batching_the_same_stream_differently_gives_the_same_state() -> None:
    stream = random_batch(3, n=5000, users=200)
    rng = np.random.default_rng(1)
    tables = []
    for pieces in (1, 2, 17, 250, 5000):
        table = UserStateTable(capacity=8)
        for part in split(stream, rng, pieces) if pieces > 1 else [stream]:
            table.apply(part)
        tables.append(table)
    users = sorted(tables[0].users())
    first = tables[0].profiles(users)
    for other in tables[1:]:
        assert sorted(other.users()) == users
        for got, want in zip(other.profiles(users), first, strict=True):
            assert_profiles_match(got, want)


def test_counts_and_first_and_last_seen_follow_event_time_not_arrival() -> None:
    table = UserStateTable()
    table.apply(
        make_batch(
            [
                ("a", EventType.PAGE_VIEW, BASE + 5_000),
                ("a", EventType.CLICK, BASE + 1_250),
                ("a", EventType.CLICK, BASE + 9_000),
                ("b", EventType.PURCHASE, BASE, "x", None, 12.5),
            ]
        )
    )
    a = table.profile("a")
    assert a is not None
    assert a["counts"]["page_view"] == 1 and a["counts"]["click"] == 2
    assert set(a["counts"]) == {t.value for t in EventType}
    assert a["events"] == 3
    assert a["first_seen_ms"] == BASE + 1_250 and a["last_seen_ms"] == BASE + 9_000
    assert a["first_seen"] == "2023-11-14T22:13:21.250Z"
    b = table.profile("b")
    assert b is not None and b["revenue"] == 12.5 and b["engagement"] == 10.0
    assert table.profile("nobody") is None and "nobody" not in table and 3 not in table


def test_a_gap_longer_than_thirty_minutes_or_a_session_start_opens_a_session() -> None:
    minute = 60_000
    table = UserStateTable()
    table.apply(
        make_batch(
            [
                ("a", EventType.PAGE_VIEW, BASE),
                ("a", EventType.PAGE_VIEW, BASE + 20 * minute),
                ("a", EventType.PAGE_VIEW, BASE + 10 * minute),  # late, same session
                ("a", EventType.PAGE_VIEW, BASE + 51 * minute),  # > 30 min after 20
            ]
        )
    )
    table.apply(make_batch([("a", EventType.SESSION_START, BASE + 52 * minute)]))
    table.apply(make_batch([("a", EventType.CLICK, BASE + 53 * minute)]))
    profile = table.profile("a")
    assert profile is not None and profile["sessions"] == 3


def test_recent_items_are_newest_first_by_arrival_and_bounded() -> None:
    table = UserStateTable(StateRules(recent_items=3))
    table.apply(make_batch([("a", EventType.CLICK, BASE + i, f"i{i}") for i in range(2)]))
    table.apply(make_batch([("a", EventType.PAGE_VIEW, BASE)]))  # no item: no change
    profile = table.profile("a")
    assert profile is not None and profile["recent_items"] == ["i1", "i0"]
    table.apply(
        make_batch([("a", EventType.CLICK, BASE - i, f"j{i}") for i in range(5)])
        # arrival order decides, not ts
    )
    profile = table.profile("a")
    assert profile is not None and profile["recent_items"] == ["j4", "j3", "j2"]


def test_an_item_repeated_back_to_back_takes_one_recent_slot_even_across_batches() -> None:
    table = UserStateTable(StateRules(recent_items=3))
    view, cart = EventType.PAGE_VIEW, EventType.ADD_TO_CART
    table.apply(make_batch([("a", view, BASE, "x"), ("a", cart, BASE + 1, "x")]))
    table.apply(make_batch([("a", view, BASE + 2, "x"), ("a", view, BASE + 3, "y")]))
    table.apply(make_batch([("a", view, BASE + 4, "x"), ("b", view, BASE, "x")]))
    profile = table.profile("a")
    assert profile is not None and profile["recent_items"] == ["x", "y", "x"]


def test_active_days_cover_the_last_64_days_of_activity() -> None:
    table = UserStateTable()
    days = [0, 1, 1, 10, 70, 100, 130]
    table.apply(make_batch([("a", EventType.CLICK, BASE + d * DAY_MS) for d in days[:4]]))
    profile = table.profile("a")
    assert profile is not None and profile["active_days"] == 3
    table.apply(make_batch([("a", EventType.CLICK, BASE + d * DAY_MS) for d in days[4:]]))
    table.apply(make_batch([("a", EventType.CLICK, BASE + 69 * DAY_MS)]))  # late, in window
    table.apply(make_batch([("a", EventType.CLICK, BASE + 2 * DAY_MS)]))  # too old to count
    profile = table.profile("a")
    assert profile is not None and profile["active_days"] == 4  # days 69, 70, 100, 130


def test_engagement_and_category_affinity_decay_with_the_half_life() -> None:
    week = 7 * DAY_MS
    table = UserStateTable()
    table.apply(make_batch([("a", EventType.SHARE, BASE, None, "news")]))
    table.apply(make_batch([("a", EventType.LIKE, BASE + week, None, "sport")]))
    profile = table.profile("a")
    assert profile is not None
    assert profile["engagement"] == pytest.approx(5 / 2 + 3)
    assert list(profile["category_affinity"]) == ["sport", "news"]
    assert profile["category_affinity"]["news"] == pytest.approx(2.5)


def test_categories_beyond_the_vocabulary_share_the_other_slot() -> None:
    table = UserStateTable(StateRules(max_categories=3))
    names = ["a", "b", "c", "d", "other"]
    table.apply(make_batch([("u", EventType.CLICK, BASE, None, c) for c in names]))
    profile = table.profile("u")
    assert profile is not None
    assert profile["category_affinity"] == {"other": 3.0, "a": 1.0, "b": 1.0}


def test_user_deleted_removes_the_user_and_frees_the_row_for_reuse() -> None:
    table = UserStateTable(capacity=2)
    table.apply(make_batch([("a", EventType.CLICK, BASE, "x", "c"), ("b", EventType.CLICK, BASE)]))
    before = table.nbytes()
    table.apply(
        make_batch([("a", EventType.USER_DELETED, BASE + 1), ("a", EventType.LIKE, BASE + 2)])
    )
    assert "a" not in table and table.profile("a") is None and len(table) == 1
    table.apply(make_batch([("c", EventType.PAGE_VIEW, BASE + 5)]))
    fresh = table.profile("c")
    assert fresh is not None
    assert fresh["events"] == 1 and fresh["recent_items"] == [] and fresh["sessions"] == 1
    assert fresh["category_affinity"] == {} and fresh["engagement"] == 1.0
    assert fresh["active_days"] == 1 and fresh["first_seen_ms"] == BASE + 5
    assert abs(table.nbytes() - before) < 300  # a new row would add ~560 bytes of columns
    table.apply(make_batch([("a", EventType.SIGNUP, BASE + 9)]))
    back = table.profile("a")
    assert back is not None and back["events"] == 1 and back["counts"]["click"] == 0
    assert table.profile("b") is not None


def test_growth_beyond_the_initial_capacity_keeps_every_user() -> None:
    table = UserStateTable(capacity=1)
    ref = ReferenceState()
    for seed in range(4):
        batch = random_batch(100 + seed, n=1500, users=2000)
        table.apply(batch)
        ref.apply(batch)
    assert len(table) == len(ref.users) > 1000
    for user in ref.users:
        assert_profiles_match(table.profile(user), ref.profile(user))


def test_state_stays_under_600_bytes_per_user_at_200k_users() -> None:
    users = 200_000
    table = UserStateTable()
    rng = np.random.default_rng(5)
    for start in range(0, users, 20_000):
        n = 20_000
        table.apply(
            EventBatch(
                event_id=[f"e{i}" for i in range(n)],
                user_id=[f"user-{start + i:07d}" for i in range(n)],
                type=rng.integers(0, N_TYPES - 1, n).astype(np.uint8),
                ts=BASE + rng.integers(0, 30 * DAY_MS, n),
                item_id=[f"item{k}" for k in rng.integers(0, 5000, n)],
                category=[f"cat{k}" for k in rng.integers(0, 40, n)],
                value=rng.random(n),
                source=np.zeros(n, dtype=np.uint8),
            )
        )
    assert len(table) == users
    per_user = table.nbytes() / users
    assert per_user < 600
    assert not math.isnan(per_user)


def test_invalid_rules_are_refused() -> None:
    with pytest.raises(ValueError):
        StateRules(weights=(1.0,))
    with pytest.raises(ValueError):
        StateRules(active_day_window=65)


def test_the_running_max_per_user_stays_exact_when_timestamps_span_a_huge_range() -> None:
    values = np.array([5, 2, 9, -(2**61), 2**61, 3, 1, 0], dtype=np.int64)
    gid = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    want = np.array([5, 5, 9, -(2**61), 2**61, 3, 1, 1], dtype=np.int64)
    np.testing.assert_array_equal(_segmented_cummax(values, gid), want)
    np.testing.assert_array_equal(_segmented_cummax(values[:3], gid[:3]), want[:3])
