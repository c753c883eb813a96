"""A shard applies deliveries once, in order, and turns bad ones into dead letters."""

from collections import Counter

import pytest

from actors.codec import encode
from actors.delivery import Delivery
from actors.events import EVENT_TYPES, TYPE_CODE, EventType
from actors.partitioning import partitions_of
from actors.shard import Shard
from actors.validation import RejectReason
from tests.support.events import random_batch


def deliveries_of(batch, partitions: int, per_message: int = 100) -> list[Delivery]:
    parts = partitions_of(batch.user_id, partitions)
    out, seq = [], 0
    for p in range(partitions):
        rows = [i for i in range(len(batch)) if parts[i] == p]
        for start in range(0, len(rows), per_message):
            seq += 1
            body = encode(batch.take(rows[start : start + per_message]))
            out.append(Delivery(p, seq, 0, 0, body))
    return out


def test_counts_per_user_equal_a_ground_truth_counted_from_the_events() -> None:
    batch = random_batch(5000, 200)
    shard = Shard(0, range(4))
    result = shard.apply(deliveries_of(batch, 4))
    assert result.applied == 5000 and not result.rejected
    truth: Counter[tuple[str, str]] = Counter(
        (u, EVENT_TYPES[t].value) for u, t in zip(batch.user_id, batch.type.tolist(), strict=True)
    )
    for user in set(batch.user_id):
        (profile,) = shard.profiles([user])
        assert profile is not None
        for type_ in EVENT_TYPES:
            assert profile["counts"][type_.value] == truth[(user, type_.value)]


def test_a_delivery_at_or_before_the_partition_position_is_not_applied_twice() -> None:
    batch = random_batch(1000, 50)
    deliveries = deliveries_of(batch, 2)
    shard = Shard(0, [0, 1])
    shard.apply(deliveries)
    again = shard.apply(deliveries)
    assert again.applied == 0 and again.skipped_messages == len(deliveries)
    assert shard.applied_events == 1000
    assert shard.positions == {
        p: max(d.seq for d in deliveries if d.partition == p) for p in (0, 1)
    }


def test_a_partition_the_shard_does_not_own_is_ignored() -> None:
    shard = Shard(0, [0])
    result = shard.apply([Delivery(5, 1, 0, 0, encode(random_batch(10, 2)))])
    assert result.applied == 0 and result.skipped_messages == 1


def test_a_body_that_is_not_the_wire_format_becomes_a_bad_wire_rejection() -> None:
    shard = Shard(0, [0])
    good = encode(random_batch(10, 2))
    result = shard.apply([Delivery(0, 1, 0, 0, b"garbage"), Delivery(0, 2, 0, 0, good)])
    assert result.applied == 10
    assert [(r.reason, r.raw) for r in result.rejected] == [(RejectReason.BAD_WIRE, b"garbage")]
    assert shard.status()["rejected"] == {"bad_wire": 1}
    assert shard.positions[0] == 2


@pytest.mark.parametrize("with_deletion", [False, True])
def test_folding_the_aggregates_late_and_at_once_equals_folding_every_step(
    with_deletion: bool,
) -> None:
    batch = random_batch(6000, 300, seed=5)
    if with_deletion:  # a deletion between two folds: steps are folded one by one
        batch.type[1234] = TYPE_CODE[EventType.USER_DELETED]
    deliveries = deliveries_of(batch, 4, per_message=200)
    eager, lazy = Shard(0, range(4)), Shard(0, range(4))
    for delivery in deliveries:
        eager.apply([delivery])
        eager.fold_insights()
        lazy.apply([delivery])
    eager_parts, lazy_parts = eager.insights_partials(), lazy.insights_partials()
    for name in ("engagement", "conversion", "retention"):
        assert lazy_parts[name] == eager_parts[name], name


def test_a_deletion_does_not_move_the_shards_event_time_now() -> None:
    shard = Shard(0, [0])
    batch = random_batch(20, users=3, seed=1)
    shard.apply([Delivery(0, 1, 0, 0, encode(batch))])
    now = shard.event_now_ms
    deletion = batch.take([0])
    deletion.event_id = ["a-deletion"]
    deletion.type[:] = TYPE_CODE[EventType.USER_DELETED]
    deletion.ts[:] = int(batch.ts.max()) + 86_400_000
    shard.apply([Delivery(0, 2, 0, 0, encode(deletion))])
    assert shard.event_now_ms == now
    assert shard.table.user_rows([batch.user_id[0]]).held.tolist() == [False]
    partials = shard.insights_partials()  # the aggregates never see the deletion's time
    assert shard.engagement.watermarks.all()[0] < deletion.ts[0]
    assert partials["segments"]["now_ms"] == now


def test_rejections_are_keyed_by_stream_position_however_the_deliveries_are_grouped() -> None:
    batch = random_batch(30, 5)
    batch.user_id[3] = ""  # missing user
    batch.ts[7] = 10**15  # far future
    deliveries = [Delivery(1, 5, 0, 0, b"nope")]
    deliveries += [
        Delivery(1, 6 + i, 0, 0, encode(batch.slice(i * 10, i * 10 + 10))) for i in range(3)
    ]
    together = Shard(0, [1]).apply(deliveries).rejected
    one_by_one = [r for d in deliveries for r in Shard(0, [1]).apply([d]).rejected]
    assert sorted(r.key or "" for r in together) == ["1.5", "1.6.3", "1.6.7"]
    assert sorted(r.key or "" for r in one_by_one) == ["1.5", "1.6.3", "1.6.7"]


def test_a_profile_only_shard_keeps_profiles_and_no_insight_aggregates() -> None:
    batch = random_batch(3000, 100, seed=9)
    full, profiles_only = Shard(0, range(4)), Shard(0, range(4), insights=False)
    for shard in (full, profiles_only):
        shard.apply(deliveries_of(batch, 4))
    assert profiles_only.pending_events == 0 < full.pending_events  # nothing waits for a fold
    for shard in (full, profiles_only):
        shard.fold_insights()
    users = sorted(set(batch.user_id))
    strip = [{k: v for k, v in (p or {}).items() if k != "segments"} for p in full.profiles(users)]
    assert [
        {k: v for k, v in (p or {}).items() if k != "segments"}
        for p in profiles_only.profiles(users)
    ] == strip
    assert full.engagement.partitions() and not profiles_only.engagement.partitions()
    moved = Shard(1, [], insights=False)
    moved.insert(profiles_only.export(2))
    user = next(u for u in users if moved.table.rows_of([u])[0] >= 0)
    assert moved.profiles([user])[0]["counts"] == full.profiles([user])[0]["counts"]


def test_folds_keep_pace_with_applying_on_any_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each fold_due folds at least what was applied since the last one, so the lag is bounded."""
    import actors.fold_queue
    import actors.shard

    monkeypatch.setattr(actors.fold_queue, "FOLD_MIN_EVENTS", 1)  # due as soon as one waits
    monkeypatch.setattr(actors.shard, "FOLD_CHUNK_EVENTS", 16)  # a step is many chunks
    deliveries = deliveries_of(random_batch(6000, 300, seed=9), 4, per_message=50)
    shard = Shard(0, range(4))
    waiting = []
    for start in range(0, len(deliveries), 8):
        shard.apply(deliveries[start : start + 8])
        shard.fold_due(budget_s=0.0)
        waiting.append((shard.pending_events, shard.items.unflushed))
    assert all(events == 0 and not items for events, items in waiting)
    assert shard.folded_events == shard.applied_events == 6000
