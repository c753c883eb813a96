"""Retention partials: known answers, merge and order invariance, bounds, snapshots."""

import random

import numpy as np
import pytest

from actors.batch import EventBatch
from actors.events import TYPE_CODE, EventType
from actors.retention import DAY_MS, RetentionAggregate
from actors.sketches import HyperLogLog, SketchError

D = 19_783  # 2024-03-01
HOUR = 3_600_000
CLICK = TYPE_CODE[EventType.CLICK]

Row = tuple[str, int]  # (user id, ts in epoch ms)


def batch_of(rows: list[Row], types: list[int] | None = None) -> EventBatch:
    n = len(rows)
    return EventBatch(
        event_id=[f"e{i}" for i in range(n)],
        user_id=[u for u, _ in rows],
        type=np.array(types or [CLICK] * n, dtype=np.uint8),
        ts=np.array([t for _, t in rows], dtype=np.int64),
        item_id=[None] * n,
        category=[None] * n,
        value=np.full(n, np.nan),
        source=np.zeros(n, dtype=np.uint8),
    )


class Feeder:
    """Feeds rows the way a shard does: first-seen as its state table holds it after the batch."""

    def __init__(self, agg: RetentionAggregate) -> None:
        self.agg = agg
        self.first: dict[str, int] = {}

    def feed(self, rows: list[Row], batch_size: int = 1000) -> None:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            for u, t in chunk:
                self.first[u] = min(t, self.first.get(u, t))
            first = np.array([self.first[u] for u, _ in chunk], dtype=np.int64)
            self.agg.update(batch_of(chunk), first)


def at(day: int, hour: int = 12) -> int:
    return day * DAY_MS + hour * HOUR


def script() -> list[Row]:
    """200 users first seen on D: 50 back on D+1, 20 on D+7, 10 on D+30; 100 more on D+1."""
    rows = [(f"u{i}", at(D, i % 24)) for i in range(200)]
    rows += [(f"u{i}", at(D + 1)) for i in range(50)]
    rows += [(f"u{i}", at(D + 7)) for i in range(20)]
    rows += [(f"v{i}", at(D + 1, 3)) for i in range(100)]
    rows += [(f"u{i}", at(D + 30)) for i in range(10)]
    return rows


def aggregate(rows: list[Row], batch_size: int = 1000) -> RetentionAggregate:
    feeder = Feeder(RetentionAggregate())
    feeder.feed(rows, batch_size)
    return feeder.agg


def test_a_scripted_cohort_has_its_known_size_and_retention() -> None:
    table = aggregate(script()).cohort_table()
    first, second = table
    assert (first["cohort_day"], first["date"]) == (D, "2024-03-01")
    assert first["size"] == pytest.approx(200, rel=0.02)
    assert first["day_1"] == pytest.approx(50 / 200, abs=0.02)
    assert first["day_7"] == pytest.approx(20 / 200, abs=0.02)
    assert first["day_30"] == pytest.approx(10 / 200, abs=0.02)
    assert len(first["curve"]) == 31 and first["curve"][2] == 0.0
    assert second["size"] == pytest.approx(100, rel=0.02) and second["day_1"] == 0.0
    assert second["day_30"] is None  # D+31 not seen yet
    assert first["relative_error"] == pytest.approx(1.04 / 2**5.5)


def test_rolling_retention_counts_users_back_on_day_n_or_later() -> None:
    agg = aggregate(script())
    week = agg.rolling_retention(7)
    assert week["cohorts"][0]["share"] == pytest.approx(20 / 200, abs=0.02)
    assert week["share"] == pytest.approx(20 / 300, abs=0.02)  # both cohorts, pooled
    month = agg.rolling_retention(30)
    assert [c["cohort_day"] for c in month["cohorts"]] == [D]  # D+1's day 30 is unseen
    with pytest.raises(SketchError):
        agg.rolling_retention(99)


def test_retention_at_day_30_is_none_before_day_30_has_been_seen() -> None:
    rows = script()
    agg = aggregate([r for r in rows if r[1] < at(D + 30, 0)])
    cohort = agg.cohort_table(D, D)[0]
    assert cohort["day_7"] == pytest.approx(0.1, abs=0.02)
    assert cohort["day_30"] is None and len(cohort["curve"]) == 8
    assert agg.rolling_retention(30)["share"] is None


def test_dau_wau_mau_and_stickiness_on_a_scripted_month() -> None:
    last = D + 29
    rows = [(f"daily{j}", at(d)) for j in range(10) for d in range(D, last + 1)]
    rows += [(f"weekly{j}", at(last - j % 7)) for j in range(21)]  # 3 of them on the last day
    rows += [(f"monthly{j}", at(D + j)) for j in range(30)]  # one per day
    random.Random(1).shuffle(rows)
    active = aggregate(rows, batch_size=97).active_users()
    assert active["day"] == last and active["complete"]
    assert active["dau"] == pytest.approx(10 + 3 + 1, abs=1)
    assert active["wau"] == pytest.approx(10 + 21 + 7, rel=0.02, abs=1)
    assert active["mau"] == pytest.approx(10 + 21 + 30, rel=0.02, abs=1)
    assert active["stickiness"] == pytest.approx(14 / 61, abs=0.02)


def test_merging_two_shards_equals_one_aggregate_over_all_events() -> None:
    rows = script()
    shards = [[r for r in rows if sum(map(ord, r[0])) % 3 == s] for s in range(3)]
    whole = aggregate(rows)
    a, b, c = (aggregate(s) for s in shards)
    left = RetentionAggregate.restore(a.snapshot())
    left.merge(b)
    left.merge(c)
    bc = RetentionAggregate.restore(b.snapshot())
    bc.merge(c)
    right = RetentionAggregate.restore(c.snapshot())
    right.merge(bc)
    right.merge(a)  # other grouping and order
    assert left.snapshot() == right.snapshot() == whole.snapshot()
    assert left.to_dict() == whole.to_dict()


def test_arrival_order_and_batching_do_not_change_answers() -> None:
    rows = script()
    final_first: dict[str, int] = {}
    for u, t in rows:
        final_first[u] = min(t, final_first.get(u, t))
    reference = aggregate(rows)
    for seed in range(3):
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        agg = RetentionAggregate()
        for start in range(0, len(shuffled), 37):
            chunk = shuffled[start : start + 37]
            agg.update(batch_of(chunk), np.array([final_first[u] for u, _ in chunk]))
        agg.update(batch_of(shuffled[:50]), np.array([final_first[u] for u, _ in shuffled[:50]]))
        assert agg.snapshot() == reference.snapshot()  # also after a redelivered batch


def test_a_late_event_moving_first_seen_earlier_leaves_the_user_in_its_old_cohort_too() -> None:
    feeder = Feeder(RetentionAggregate())
    feeder.feed([("late", at(D + 2)), ("late", at(D + 3))])
    feeder.feed([("late", at(D))])  # arrives last, but happened first
    sizes = {c["cohort_day"]: c["size"] for c in feeder.agg.cohort_table()}
    assert sizes == {D: 1, D + 2: 1}  # documented: a sketch cannot forget


def test_events_before_the_stated_first_seen_are_rejected_from_cohorts_only() -> None:
    agg = RetentionAggregate()
    agg.update(batch_of([("x", at(D)), ("y", at(D))]), np.array([at(D), at(D + 1)]))
    assert agg.rejected == 1
    assert agg.cohort_table()[0]["size"] == 1 and agg.active_users()["dau"] == 2
    with pytest.raises(SketchError):
        agg.update(batch_of([("x", at(D))]), np.array([1, 2]))


def test_deleted_users_events_are_not_activity() -> None:
    agg = RetentionAggregate()
    deleted = TYPE_CODE[EventType.USER_DELETED]
    agg.update(batch_of([("x", at(D)), ("y", at(D))], [CLICK, deleted]), np.full(2, at(D)))
    assert agg.active_users()["dau"] == 1


def test_old_cohorts_and_days_are_pruned_so_memory_stays_bounded() -> None:
    agg = RetentionAggregate(precision=8, max_offset=30, max_cohorts=40, max_days=45)
    feeder = Feeder(agg)
    for d in range(D, D + 200):  # a new user each day, back on the next 3 days
        feeder.feed([(f"n{d}", at(d))] + [(f"n{d - k}", at(d)) for k in range(1, 4)])
    cohorts = [c["cohort_day"] for c in agg.cohort_table()]
    assert cohorts == list(range(D + 160, D + 200))
    assert agg.nbytes() <= (40 * 31 + 45) * 2**8
    assert agg.active_users()["dau"] == 4
    assert not agg.active_users(D + 150)["complete"]


def test_cohort_sizes_use_the_same_registers_as_a_plain_hyperloglog() -> None:
    ids = [f"user-{i}" for i in range(6000)]  # past linear counting at precision 11
    agg = RetentionAggregate()
    agg.update(batch_of([(u, at(D)) for u in ids]), np.full(len(ids), at(D)))
    hll = HyperLogLog(11)
    hll.add_many(ids)
    assert agg.cohort_table()[0]["size"] == round(hll.count())


def test_snapshot_round_trips_and_rejects_garbage() -> None:
    agg = aggregate(script())
    twin = RetentionAggregate.restore(agg.snapshot())
    assert twin.to_dict() == agg.to_dict() and twin.snapshot() == agg.snapshot()
    empty = RetentionAggregate.restore(RetentionAggregate().snapshot())
    assert empty.to_dict()["latest_day"] is None
    for bad in (b"", b"nope", agg.snapshot()[:-5]):
        with pytest.raises(SketchError):
            RetentionAggregate.restore(bad)
    with pytest.raises(SketchError):
        agg.merge(RetentionAggregate(precision=12))
