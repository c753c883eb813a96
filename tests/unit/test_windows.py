"""Event-time buckets, per-partition watermarks and retention."""

import numpy as np

from actors.windows import BucketSlots, Granularity, Watermarks, bucket_starts

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


def test_watermarks_of_mixed_partitions_equal_each_partition_on_its_own() -> None:
    rng = np.random.default_rng(5)
    parts = rng.integers(0, 4, 800)
    ts = T + rng.integers(0, 100_000, 800)
    together = Watermarks(20_000)
    mixed = np.concatenate(
        [together.late(parts[a : a + 100], ts[a : a + 100]) for a in range(0, 800, 100)]
    )
    for p in range(4):
        alone = Watermarks(20_000).late_mask(p, ts[parts == p])
        assert mixed[parts == p].tolist() == alone.tolist()
    assert mixed.any()


def test_slots_route_events_per_partition_and_keep_only_the_newest_buckets() -> None:
    retention = {Granularity.MINUTE: 3, Granularity.HOUR: 2, Granularity.DAY: 1}
    slots = BucketSlots(retention, {"n": 1})
    ts = T + np.arange(10) * 30 * 60_000  # every 30 minutes over 4.5 hours
    for partition in (0, 1):
        cells = slots.cells(np.full(10, partition), ts[::-1])
        slots.add("n", cells)
        slots.prune()
    for partition in (0, 1):
        held = slots.buckets(partition)
        assert sorted(held[Granularity.MINUTE]) == [T + k * 1_800_000 for k in (7, 8, 9)]
        hours = {s: int(slots.columns["n"][slot, 0]) for s, slot in held[Granularity.HOUR].items()}
        assert hours == {T + 3 * 3_600_000: 2, T + 4 * 3_600_000: 2}
        (day,) = held[Granularity.DAY].values()
        assert slots.columns["n"][day, 0] == 10


def test_a_partitions_buckets_move_to_other_slots_unchanged() -> None:
    retention = {g: 10 for g in Granularity}
    old = BucketSlots(retention, {"n": 2}, precision=4, counted=("ids",))
    ts = T + np.arange(6) * 20 * 60_000
    cells = old.cells(np.full(6, 3), ts)
    old.add("n", cells, sub=np.array([0, 1, 1, 0, 1, 1]))
    old.add_users(cells, np.arange(6, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    old.count("ids", cells, np.array([0, 1, 0, -1, 1, 1]), ["a", "b"])
    new = BucketSlots(retention, {"n": 2}, precision=4, counted=("ids",))
    new.cells(np.array([5]), np.array([T]))  # the new owner holds another partition already
    new.insert(3, old.export(3))
    old_held, new_held = old.buckets(3), new.buckets(3)
    assert {g: sorted(b) for g, b in old_held.items()} == {
        g: sorted(b) for g, b in new_held.items()
    }
    for g, starts in old_held.items():
        for start, slot in starts.items():
            other = new_held[g][start]
            assert old.columns["n"][slot].tolist() == new.columns["n"][other].tolist()
            assert old.sketch(slot) == new.sketch(other)
            assert old.top("ids", slot, 5) == new.top("ids", other, 5)
    old.forget(3)
    assert old.partitions() == [] and new.partitions() == [3, 5]
