"""Engagement partials: known answers, lateness policies, order and merge invariance."""

import itertools
import random

import numpy as np
import orjson

from actors.batch import EventBatch
from actors.codec import encode
from actors.delivery import Delivery
from actors.engagement import (
    ACTIVE_USERS_RELATIVE_ERROR,
    EngagementWindows,
    empty_bucket,
    merge_buckets,
    merge_partials,
    report,
)
from actors.events import Event
from actors.shard import Shard
from actors.state import UserStateTable, iso_ms
from actors.windows import Granularity, LatenessPolicy, WindowConfig
from tests.support.events import random_batch

T = 1_709_251_200_000  # 2024-03-01T00:00:00Z
MIN = 60_000


_IDS = itertools.count()  # event ids unique across batches, as producers make them


def batch_of(*rows: tuple[str, str, int, dict]) -> EventBatch:
    events = [
        Event.model_validate_json(
            orjson.dumps(
                {"event_id": f"e{next(_IDS)}", "user_id": u, "type": t, "ts": iso_ms(ms), **extra}
            )
        )
        for u, t, ms, extra in rows
    ]
    return EventBatch.from_events(events)


SCRIPT = [
    ("ann", "session_start", T + 1 * MIN, {}),
    ("ann", "page_view", T + 2 * MIN, {"item_id": "i1", "category": "shoes"}),
    ("ann", "like", T + 3 * MIN, {"item_id": "i1", "category": "shoes"}),
    ("ann", "dwell", T + 4 * MIN, {"item_id": "i1", "value": 12.5}),
    ("bob", "session_start", T + 5 * MIN, {}),
    ("bob", "like", T + 6 * MIN, {"item_id": "i2", "category": "hats"}),
    ("bob", "share", T + 7 * MIN, {"item_id": "i1", "category": "shoes"}),
    ("bob", "comment", T + 65 * MIN, {"item_id": "i2", "category": "hats"}),
    ("bob", "dwell", T + 66 * MIN, {"value": 3.0}),
]


def feed(windows: EngagementWindows, partition: int, batch: EventBatch) -> None:
    windows.apply(batch, np.full(len(batch), partition))


def hour_report(windows: EngagementWindows, **kwargs) -> dict:
    return report(merge_partials([windows.partials()]), Granularity.HOUR, **kwargs)


def test_a_scripted_event_set_gives_the_known_answers_per_hour() -> None:
    windows = EngagementWindows(WindowConfig(allowed_lateness_ms=3_600_000))
    feed(windows, 0, batch_of(*SCRIPT))
    first, second = hour_report(windows)["buckets"]
    assert first["start"] == "2024-03-01T00:00:00.000Z"
    assert first["end"] == "2024-03-01T01:00:00.000Z"
    counts = (first["active_users"], first["likes"], first["shares"], first["comments"])
    assert counts == (2, 2, 1, 0)
    assert first["likes_per_active_user"] == 1.0 and first["shares_per_active_user"] == 0.5
    assert first["dwell_seconds"] == 12.5 and first["dwell_seconds_per_active_user"] == 6.25
    assert first["sessions"] == 2 and first["events"] == 7
    assert first["top_items"] == [{"id": "i1", "events": 4}, {"id": "i2", "events": 1}]
    assert first["top_categories"] == [{"id": "shoes", "events": 3}, {"id": "hats", "events": 1}]
    assert (second["active_users"], second["comments"], second["dwell_seconds"]) == (1, 1, 3.0)
    assert second["comments_per_active_user"] == 1.0


def test_a_time_range_selects_buckets_by_their_start_and_totals_add_them() -> None:
    windows = EngagementWindows(WindowConfig(allowed_lateness_ms=3_600_000))
    feed(windows, 0, batch_of(*SCRIPT))
    only_second = hour_report(windows, start_ms=T + 3_600_000, end_ms=T + 7_200_000)
    assert [b["start"] for b in only_second["buckets"]] == ["2024-03-01T01:00:00.000Z"]
    totals = hour_report(windows)["totals"]
    assert (totals["events"], totals["likes"], totals["dwell_seconds"]) == (9, 2, 15.5)
    assert "active_users" not in totals


def test_shuffled_arrival_within_the_lateness_gives_the_same_numbers() -> None:
    lateness = WindowConfig(allowed_lateness_ms=2 * 3_600_000)
    in_order = EngagementWindows(lateness)
    feed(in_order, 0, batch_of(*SCRIPT))
    for seed in range(5):
        rows = SCRIPT[:]
        random.Random(seed).shuffle(rows)
        shuffled = EngagementWindows(lateness)
        for part in (rows[:3], rows[3:4], rows[4:]):
            feed(shuffled, 0, batch_of(*part))
        for g in Granularity:
            assert report(merge_partials([shuffled.partials()]), g) == report(
                merge_partials([in_order.partials()]), g
            )
        assert shuffled.late_corrected == shuffled.late_dropped == 0


def _late_script() -> tuple[EngagementWindows, EngagementWindows]:
    on_time = batch_of(("ann", "like", T + 60 * MIN, {}), ("bob", "like", T + 61 * MIN, {}))
    late = batch_of(("cy", "like", T + 10 * MIN, {}), ("cy", "share", T + 50 * MIN, {}))
    out = []
    for policy in LatenessPolicy:
        windows = EngagementWindows(WindowConfig(allowed_lateness_ms=5 * MIN, policy=policy))
        feed(windows, 3, on_time)
        feed(windows, 3, late)
        out.append(windows)
    return out[0], out[1]


def test_with_the_drop_policy_late_events_are_counted_not_applied() -> None:
    dropped, _ = _late_script()
    assert (dropped.late_dropped, dropped.late_corrected) == (2, 0)
    answer = hour_report(dropped)
    assert [b["likes"] for b in answer["buckets"]] == [2]
    assert hour_report(dropped, include_late=True) == answer


def test_with_the_correct_policy_late_events_go_to_a_flagged_correction() -> None:
    _, corrected = _late_script()
    assert (corrected.late_dropped, corrected.late_corrected) == (0, 2)
    plain = hour_report(corrected)["buckets"]
    assert [(b["start"][11:16], b["likes"], b["late_events"]) for b in plain] == [
        ("00:00", 0, 2),
        ("01:00", 2, 0),
    ]
    with_late = hour_report(corrected, include_late=True)["buckets"]
    assert [(b["likes"], b["shares"], b["active_users"]) for b in with_late] == [
        (1, 1, 1),
        (2, 0, 2),
    ]


def test_merging_bucket_partials_is_associative_and_commutative() -> None:
    parts = []
    for seed in range(3):
        windows = EngagementWindows(WindowConfig(allowed_lateness_ms=10**12))
        feed(windows, 0, random_batch(400, 30, seed=seed, t0=T, prefix=f"s{seed}-"))
        parts.append(windows.partials()["buckets"]["day"])
    day = T
    a, b, c = (p.get(day, empty_bucket()) for p in parts)
    assert merge_buckets(a, b) == merge_buckets(b, a)
    assert merge_buckets(merge_buckets(a, b), c) == merge_buckets(a, merge_buckets(b, c))
    assert merge_buckets(a, empty_bucket()) == a


def test_shards_merged_in_any_order_give_the_numbers_of_one_shard_holding_everything() -> None:
    config = WindowConfig(allowed_lateness_ms=10**12)
    batches = [random_batch(300, 20, seed=s, t0=T, prefix=f"m{s}-") for s in range(3)]
    single = EngagementWindows(config)
    shards = []
    for partition, batch in enumerate(batches):
        feed(single, partition, batch)
        shard = EngagementWindows(config)
        feed(shard, partition, batch)
        shards.append(shard.partials())
    expected = report(merge_partials([single.partials()]), Granularity.HOUR, top=50)
    for order in itertools.permutations(shards):
        assert report(merge_partials(order), Granularity.HOUR, top=50) == expected


def test_the_shard_feeds_each_delivery_with_its_partition_to_the_windows() -> None:
    shard = Shard(0, [0, 1], windows=WindowConfig(allowed_lateness_ms=MIN))
    new = batch_of(("ann", "like", T + 60 * MIN, {}))
    old = batch_of(("bob", "like", T, {}))
    shard.apply([Delivery(0, 1, 0, 0, encode(new)), Delivery(1, 2, 0, 0, encode(old))])
    shard.fold_insights()
    assert shard.engagement.late_corrected == 0  # partition 1 has its own watermark
    late = batch_of(("cy", "like", T, {}))  # another event, late on partition 0
    shard.apply([Delivery(0, 3, 0, 0, encode(late))])
    assert shard.engagement.late_corrected == 0  # applied to state, not yet folded
    shard.fold_insights()
    assert shard.engagement.late_corrected == 1
    assert shard.engagement.watermarks.all() == {0: T + 59 * MIN, 1: T - MIN}
    buckets = shard.engagement.partials()["buckets"]["hour"]
    assert sum(b["active_users"] for b in buckets.values()) == 2
    assert np.sum([b["events"] for b in buckets.values()]) == 2


def test_a_deleted_user_stays_counted_in_buckets_already_counted() -> None:
    windows = EngagementWindows(WindowConfig(allowed_lateness_ms=10**12))
    feed(windows, 0, batch_of(*SCRIPT))
    before = hour_report(windows)
    feed(windows, 0, batch_of(("ann", "user_deleted", T + 30 * MIN, {})))  # ann is active then
    after = hour_report(windows)["buckets"]
    assert [b["active_users"] for b in after] == [b["active_users"] for b in before["buckets"]]


def test_many_active_users_are_counted_within_the_sketch_error() -> None:
    users = 20_000
    rows = [(f"u{i}", "page_view", T + (i % 50) * MIN, {}) for i in range(users)]
    windows = EngagementWindows(WindowConfig(allowed_lateness_ms=10**12))
    feed(windows, 0, batch_of(*rows))
    (bucket,) = hour_report(windows)["buckets"]
    assert abs(bucket["active_users"] - users) <= 3 * ACTIVE_USERS_RELATIVE_ERROR * users


def test_shards_sharing_users_merge_without_double_counting() -> None:
    config = WindowConfig(allowed_lateness_ms=10**12)
    halves = [EngagementWindows(config), EngagementWindows(config)]
    for i in range(2000):
        feed(halves[i % 2], 0, batch_of((f"u{i % 1000}", "click", T, {})))
    (bucket,) = report(merge_partials([h.partials() for h in halves]), Granularity.HOUR)["buckets"]
    assert abs(bucket["active_users"] - 1000) <= 3 * ACTIVE_USERS_RELATIVE_ERROR * 1000


# ann's gaps (s): 60, 60, 60; 46 min ends the session; 300; 420 across the hour edge;
# a session_start; 420; an event older than ann's newest adds 0; 300. carl's first
# event starts a session (not a session_start event), bob's too in hour 2.
SESSIONS = [
    ("ann", "session_start", T + 1 * MIN, {}),
    ("ann", "page_view", T + 2 * MIN, {}),
    ("carl", "page_view", T + 5 * MIN, {}),
    ("ann", "like", T + 3 * MIN, {}),
    ("carl", "like", T + 6 * MIN, {}),
    ("ann", "dwell", T + 4 * MIN, {"value": 1.0}),
    ("ann", "page_view", T + 50 * MIN, {}),
    ("ann", "like", T + 55 * MIN, {}),
    ("ann", "click", T + 62 * MIN, {}),
    ("ann", "session_start", T + 63 * MIN, {}),
    ("ann", "like", T + 70 * MIN, {}),
    ("ann", "like", T + 68 * MIN, {}),
    ("ann", "click", T + 75 * MIN, {}),
    ("bob", "page_view", T + 130 * MIN, {}),
    ("bob", "click", T + 131 * MIN, {}),
]
SESSION_SECONDS = [(180 + 60 + 300, 1, 540.0), (420 + 420 + 300, 1, 1140.0), (60, 0, None)]


def feed_sessions(windows: EngagementWindows, cuts: list[int], rows=SESSIONS) -> None:
    """Apply ``rows`` cut at ``cuts`` to a state table and feed its session gaps along."""
    table = UserStateTable()
    for a, b in itertools.pairwise([0, *cuts, len(rows)]):
        batch = batch_of(*rows[a:b])
        table.apply(batch)
        assert len(table.last_session_gaps_ms) == len(batch)
        windows.apply(batch, np.zeros(len(batch), dtype=np.int64), table.last_session_gaps_ms)


def _session_figures(answer: dict) -> list[tuple]:
    return [
        (b["session_seconds"], b["sessions"], b["avg_session_seconds"]) for b in answer["buckets"]
    ]


def test_session_time_adds_each_continuing_events_gap_to_its_bucket() -> None:
    windows = EngagementWindows(WindowConfig(allowed_lateness_ms=10**12))
    feed_sessions(windows, [])
    answer = hour_report(windows)
    assert _session_figures(answer) == SESSION_SECONDS
    totals = answer["totals"]
    assert (totals["session_seconds"], totals["sessions"]) == (1740.0, 2)
    assert totals["avg_session_seconds"] == 870.0


def test_session_time_is_the_same_however_the_stream_is_cut_into_batches() -> None:
    config = WindowConfig(allowed_lateness_ms=10**12)
    whole = EngagementWindows(config)
    feed_sessions(whole, [])
    expected = [report(merge_partials([whole.partials()]), g) for g in Granularity]
    cuttings = [[k] for k in range(1, len(SESSIONS))] + [list(range(1, len(SESSIONS)))]
    rng = random.Random(3)
    cuttings += [sorted(rng.sample(range(1, len(SESSIONS)), 4)) for _ in range(5)]
    for cuts in cuttings:
        windows = EngagementWindows(config)
        feed_sessions(windows, cuts)
        assert [report(merge_partials([windows.partials()]), g) for g in Granularity] == expected


def test_session_time_of_shards_merges_by_sum() -> None:
    config = WindowConfig(allowed_lateness_ms=10**12)
    ann = EngagementWindows(config)
    feed_sessions(ann, [], [r for r in SESSIONS if r[0] == "ann"])
    others = EngagementWindows(config)
    feed_sessions(others, [], [r for r in SESSIONS if r[0] != "ann"])
    a, b = (w.partials()["buckets"]["hour"] for w in (ann, others))
    assert [a[T]["session_ms"], b[T]["session_ms"]] == [480_000, 60_000]
    assert merge_buckets(a[T], b[T])["session_ms"] == 540_000
    merged = report(merge_partials([ann.partials(), others.partials()]), Granularity.HOUR)
    assert _session_figures(merged) == SESSION_SECONDS


def test_the_shard_carries_the_tables_session_gaps_to_the_engagement_fold() -> None:
    shard = Shard(0, [0], windows=WindowConfig(allowed_lateness_ms=10**12))
    deliveries = [
        Delivery(0, seq, 0, 0, encode(batch_of(*SESSIONS[a:b])))
        for seq, (a, b) in enumerate(itertools.pairwise([0, 4, 9, len(SESSIONS)]), start=1)
    ]
    shard.apply(deliveries[:2])
    shard.apply(deliveries[2:])
    shard.fold_insights()
    assert _session_figures(hour_report(shard.engagement)) == SESSION_SECONDS
