"""Trends: bursts trend and emerge, steady items only trend, decay fades, merge and order agree."""

import json

import numpy as np
import pytest

from actors.batch import EventBatch
from actors.events import TYPE_CODE, EventType
from actors.sketches import SketchError
from actors.trends import TrendAggregate, TrendConfig

T0 = 1_709_251_200_000  # 2024-03-01T00:00:00Z
MIN = 60_000
HOUR = 60 * MIN


def batch(rows: list[tuple[str, EventType, int]]) -> EventBatch:
    """Events ``(item, type, ts_ms)``; the category is the item's first two letters."""
    n = len(rows)
    return EventBatch(
        event_id=[f"e{i}" for i in range(n)],
        user_id=[f"u{i % 7}" for i in range(n)],
        type=np.array([TYPE_CODE[t] for _, t, _ in rows], dtype=np.uint8),
        ts=np.array([ts for _, _, ts in rows], dtype=np.int64),
        item_id=[item for item, _, _ in rows],
        category=[f"cat-{item[:2]}" for item, _, _ in rows],
        value=np.full(n, np.nan),
        source=np.zeros(n, dtype=np.uint8),
    )


def scripted_stream(hours: int = 48) -> list[tuple[str, EventType, int]]:
    """Y steady (a view a minute), X quiet (a view an hour) until a burst in the last 30 min,
    and fifty background items with a few random views an hour."""
    rng = np.random.default_rng(7)
    rows = [("Y", EventType.PAGE_VIEW, T0 + m * MIN) for m in range(hours * 60)]
    rows += [("X", EventType.PAGE_VIEW, T0 + h * HOUR + 5 * MIN) for h in range(hours - 1)]
    burst_start = T0 + hours * HOUR - 30 * MIN
    kinds = [EventType.PAGE_VIEW, EventType.LIKE, EventType.SHARE]
    rows += [("X", kinds[i % 3], burst_start + i * 9_000) for i in range(200)]
    for ts in rng.integers(T0, T0 + hours * HOUR, size=hours * 100).tolist():
        rows.append((f"b{rng.integers(50)}", EventType.PAGE_VIEW, ts))
    return sorted(rows, key=lambda r: r[2])


def fold(rows: list[tuple[str, EventType, int]], chunk: int = 500) -> TrendAggregate:
    agg = TrendAggregate()
    for i in range(0, len(rows), chunk):
        agg.update(batch(rows[i : i + chunk]))
    return agg


def ids(entries: list[dict]) -> list[str]:
    return [e["id"] for e in entries]


def test_a_burst_item_is_top_trending_and_emerging_while_a_steady_item_only_trends() -> None:
    agg = fold(scripted_stream())
    trending = agg.trending_items(5)
    assert ids(trending)[:2] == ["X", "Y"]
    emerging = agg.emerging_items(5)
    assert ids(emerging) == ["X"]
    assert emerging[0]["score"] > 5
    assert "Y" in ids(trending)
    assert "Y" not in ids(agg.emerging_items(50))
    assert ids(agg.trending_categories(2)) == ["cat-X", "cat-Y"]
    assert ids(agg.emerging_categories(5)) == ["cat-X"]


def test_a_steady_item_scores_about_one_however_young_the_stream() -> None:
    config = TrendConfig(min_acceleration=0.0)
    for hours in (3, 48):
        agg = TrendAggregate(config)
        rows = scripted_stream(hours)
        agg.update(batch([r for r in rows if r[0] == "Y"]))
        (y,) = agg.emerging_items(5)
        assert y["score"] == pytest.approx(1.0, rel=0.05)


def test_trending_entries_are_json_ready_with_counts_and_error_bounds() -> None:
    agg = fold(scripted_stream())
    entries = agg.trending_items(3) + agg.emerging_items(3)
    json.dumps(entries)
    for e in entries:
        assert e["count"] >= e["error"] >= 0
        assert e["score"] > 0


def test_merging_two_halves_gives_the_same_top_five_as_one_aggregate() -> None:
    rows = scripted_stream()
    whole = fold(rows)
    left, right = fold(rows[0::2]), fold(rows[1::2])
    left.merge(right)
    assert ids(left.trending_items(5)) == ids(whole.trending_items(5))
    assert [e["count"] for e in left.trending_items(5)] == pytest.approx(
        [e["count"] for e in whole.trending_items(5)]
    )
    assert ids(left.emerging_items(5)) == ids(whole.emerging_items(5))


def test_small_sketches_that_overflow_still_merge_to_the_same_leaders() -> None:
    rows = scripted_stream()
    config = TrendConfig(capacity=8, baseline_capacity=16)

    def small(part: list[tuple[str, EventType, int]]) -> TrendAggregate:
        agg = TrendAggregate(config)
        for i in range(0, len(part), 500):
            agg.update(batch(part[i : i + 500]))
        return agg

    left = small(rows[0::2])
    left.merge(small(rows[1::2]))
    assert ids(left.trending_items(2)) == ["X", "Y"]
    assert ids(left.emerging_items(2)) == ["X"]


def test_old_popularity_fades_after_ten_half_lives() -> None:
    rows = [("Z", EventType.PURCHASE, T0 + i) for i in range(1000)]
    rows += [(f"n{i % 5}", EventType.PAGE_VIEW, T0 + 10 * HOUR + i * MIN) for i in range(60)]
    agg = fold(rows)
    assert "Z" not in ids(agg.trending_items(5))
    assert agg.trending_items(5)[0]["count"] > 5


def test_advancing_the_clock_decays_quiet_aggregates() -> None:
    agg = fold([("Q", EventType.PAGE_VIEW, T0)] * 64)
    agg.advance(T0 + 3 * HOUR)
    assert agg.trending_items(1)[0]["count"] == pytest.approx(8.0)


def test_arrival_order_within_a_batch_does_not_change_the_top() -> None:
    rows = scripted_stream(6)
    shuffled = [rows[i] for i in np.random.default_rng(1).permutation(len(rows)).tolist()]
    a, b = TrendAggregate(), TrendAggregate()
    a.update(batch(rows))
    b.update(batch(shuffled))
    assert ids(a.trending_items(10)) == ids(b.trending_items(10))
    assert [e["count"] for e in a.trending_items(10)] == pytest.approx(
        [e["count"] for e in b.trending_items(10)]
    )


def test_batches_in_any_order_give_the_same_counts_while_the_sketch_has_room() -> None:
    rows = scripted_stream(12)
    chunks = [rows[i : i + 300] for i in range(0, len(rows), 300)]
    forward, backward = TrendAggregate(), TrendAggregate()
    for c in chunks:
        forward.update(batch(c))
    for c in reversed(chunks):
        backward.update(batch(c))
    top = forward.trending_items(10)
    assert ids(backward.trending_items(10)) == ids(top)
    assert [e["count"] for e in backward.trending_items(10)] == pytest.approx(
        [e["count"] for e in top]
    )


def test_a_snapshot_round_trips_through_json() -> None:
    agg = fold(scripted_stream(6))
    back = TrendAggregate.from_dict(json.loads(json.dumps(agg.to_dict())))
    assert back.trending_items(5) == agg.trending_items(5)
    assert back.emerging_categories(5) == agg.emerging_categories(5)


def test_events_without_items_or_weight_are_ignored() -> None:
    agg = TrendAggregate()
    b = batch([("A", EventType.SESSION_START, T0), ("B", EventType.PAGE_VIEW, T0)])
    b.item_id[1] = None
    agg.update(b)
    assert agg.trending_items(5) == []
    assert ids(agg.trending_categories(5)) == ["cat-B"]


def test_aggregates_with_different_configs_refuse_to_merge() -> None:
    with pytest.raises(SketchError) as err:
        TrendAggregate().merge(TrendAggregate(TrendConfig(half_life_ms=2 * HOUR)))
    assert err.value.reason == "config_mismatch"


def test_a_baseline_faster_than_the_short_window_is_a_config_error() -> None:
    with pytest.raises(SketchError):
        TrendConfig(half_life_ms=HOUR, baseline_half_life_ms=HOUR // 2)
