"""Event-time buckets, per-partition watermarks and retention."""

import numpy as np

from actors.windows import BucketStore, Granularity, Watermarks, bucket_starts

T = 1_709_251_200_000  # 2024-03-01T00:00:00Z


def test_bucket_starts_floor_event_times_to_the_granularity() -> None:
    ts = np.array([T, T + 59_999, T + 60_000, T + 3_600_000 + 5, T + 86_400_000 - 1])
    assert bucket_starts(ts, Granularity.MINUTE).tolist() == [
        T,
        T,
        T + 60_000,
        T + 3_600_000,
        T + 86_400_000 - 60_000,
    ]
    assert bucket_starts(ts, Granularity.HOUR).tolist() == [T, T, T, T + 3_600_000, T + 82_800_000]
    assert bucket_starts(ts, Granularity.DAY).tolist() == [T] * 5


def test_an_event_older_than_the_newest_seen_minus_the_lateness_is_late() -> None:
    marks = Watermarks(allowed_lateness_ms=1000)
    late = marks.late_mask(0, np.array([T + 5000, T + 4500, T + 3999, T + 4000, T + 9000]))
    assert late.tolist() == [False, False, True, False, False]
    assert marks.watermark(0) == T + 8000
    assert marks.watermark(1) is None


def test_watermarks_are_per_partition() -> None:
    marks = Watermarks(allowed_lateness_ms=0)
    marks.late_mask(0, np.array([T + 10_000]))
    assert marks.late_mask(1, np.array([T])).tolist() == [False]
    assert marks.late_mask(0, np.array([T])).tolist() == [True]
    assert marks.all() == {0: T + 10_000, 1: T}


def test_lateness_does_not_depend_on_where_batches_are_cut() -> None:
    rng = np.random.default_rng(3)
    ts = T + rng.integers(0, 100_000, 500)
    whole = Watermarks(20_000).late_mask(0, ts)
    pieces = Watermarks(20_000)
    cut = np.concatenate([pieces.late_mask(0, part) for part in np.array_split(ts, 7)])
    assert whole.any() and cut.tolist() == whole.tolist()


def test_a_shuffle_within_the_lateness_has_no_late_events() -> None:
    ts = T + np.random.default_rng(4).permutation(np.arange(0, 60_000, 100))
    assert not Watermarks(60_000).late_mask(0, ts).any()


class Counting:
    def __init__(self) -> None:
        self.n = 0


def test_a_store_routes_events_to_buckets_and_keeps_only_the_newest() -> None:
    retention = {Granularity.MINUTE: 3, Granularity.HOUR: 2, Granularity.DAY: 1}
    store: BucketStore[Counting] = BucketStore(Counting, retention)
    ts = T + np.arange(10) * 30 * 60_000  # every 30 minutes over 4.5 hours
    for routed in store.route(ts[::-1]):
        for g, counting in enumerate(routed.aggregates):
            counting.n += int(routed.bounds[g + 1] - routed.bounds[g])
    assert sorted(store.buckets[Granularity.MINUTE]) == [T + k * 1_800_000 for k in (7, 8, 9)]
    assert sorted(store.buckets[Granularity.HOUR]) == [T + 3 * 3_600_000, T + 4 * 3_600_000]
    assert {s: c.n for s, c in store.buckets[Granularity.HOUR].items()} == {
        T + 3 * 3_600_000: 2,
        T + 4 * 3_600_000: 2,
    }
    assert [c.n for c in store.buckets[Granularity.DAY].values()] == [10]


def test_routing_keeps_arrival_order_within_a_bucket() -> None:
    store: BucketStore[Counting] = BucketStore(Counting, {g: 10 for g in Granularity})
    ts = np.array([T + 3_600_000, T + 5, T + 3_600_001, T + 1])
    minute = next(iter(store.route(ts)))  # granularities come minute first
    assert minute.order.tolist() == [1, 3, 0, 2] and minute.bounds.tolist() == [0, 2, 4]
