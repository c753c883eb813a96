"""Conversion funnel rules: windows, restarts, arrival order, batching and merge invariance."""

import itertools
import random

import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from actors.batch import EventBatch
from actors.codec import encode
from actors.conversion import ConversionWindows, FunnelSpec, FunnelTracker, merge_partials
from actors.delivery import Delivery
from actors.events import TYPE_CODE, Event, EventType
from actors.funnel_report import conversion_answer
from actors.insights import merge_insights
from actors.shard import Shard
from actors.state import iso_ms
from actors.windows import Granularity, LatenessPolicy, WindowConfig
from cluster.settings import Settings
from tests.support.events import random_batch

T = 1_782_864_000_000  # 2026-07-01T00:00:00Z
MIN = 60_000
VIEW, CART, BUY = "page_view", "add_to_cart", "purchase"


def steps_reached(*events: tuple[str, int], spec: FunnelSpec | None = None) -> list[int]:
    """The step each event of one user made the user reach (-1: none), in arrival order."""
    tracker = FunnelTracker(spec or FunnelSpec())
    types = np.array([TYPE_CODE[EventType(t)] for t, _ in events])
    ts = np.array([T + m * MIN for _, m in events])
    return tracker.advance(np.zeros(len(events), dtype=np.int64), types, ts).tolist()


def test_a_view_cart_purchase_within_the_window_reaches_every_step() -> None:
    assert steps_reached((VIEW, 0), (CART, 10), (BUY, 35)) == [0, 1, 2]


def test_a_step_later_than_the_window_after_the_previous_step_does_not_advance() -> None:
    assert steps_reached((VIEW, 0), (CART, 31), (BUY, 32)) == [0, -1, -1]


def test_an_expired_attempt_restarts_at_step_one_on_a_new_view() -> None:
    assert steps_reached((VIEW, 0), (CART, 40), (VIEW, 45), (CART, 50)) == [0, -1, 0, 1]


def test_a_repeated_view_moves_the_window_and_is_not_counted_again() -> None:
    assert steps_reached((VIEW, 0), (VIEW, 20), (CART, 45)) == [0, -1, 1]


def test_a_skipped_step_does_not_advance() -> None:
    assert steps_reached((VIEW, 0), (BUY, 1), (CART, 2), (BUY, 3)) == [0, -1, 1, 2]


def test_a_completed_attempt_lets_the_next_view_start_another() -> None:
    assert steps_reached((VIEW, 0), (CART, 1), (BUY, 2), (VIEW, 3)) == [0, 1, 2, 0]


def test_arrival_order_decides_so_a_cart_stamped_before_its_view_still_follows_it() -> None:
    assert steps_reached((VIEW, 10), (CART, 5), (BUY, 6)) == [0, 1, 2]
    assert steps_reached((CART, 5), (VIEW, 10), (BUY, 11)) == [-1, 0, -1]


def test_a_configured_funnel_uses_its_own_steps_and_window() -> None:
    spec = FunnelSpec.parse("signup, like, share", window_s=120)
    assert spec.describe() == {"steps": ["signup", "like", "share"], "window_s": 120.0}
    assert steps_reached(("signup", 0), ("like", 2), ("share", 5), spec=spec) == [0, 1, -1]


@pytest.mark.parametrize("text", ["page_view", "page_view,page_view", "page_view,teleport"])
def test_a_bad_funnel_is_refused_with_a_reason(text: str) -> None:
    with pytest.raises(ValueError):
        FunnelSpec.parse(text, 60)


_IDS = itertools.count()  # event ids unique across batches, as producers make them


def batch_of(rows: list[tuple[str, str, int, float | None]]) -> EventBatch:
    events = [
        Event.model_validate_json(
            orjson.dumps(
                {"event_id": f"e{next(_IDS)}", "user_id": u, "type": t, "ts": iso_ms(ms)}
                | ({} if v is None else {"value": v})
            )
        )
        for u, t, ms, v in rows
    ]
    return EventBatch.from_events(events)


# Two users in hour 10, one of them also in hour 11: hand-counted below.
SCRIPT = [
    ("ann", VIEW, T + 600 * MIN, None),
    ("ann", CART, T + 605 * MIN, None),
    ("ann", BUY, T + 610 * MIN, 20.5),
    ("bob", VIEW, T + 620 * MIN, None),
    ("bob", CART, T + 655 * MIN, None),  # 35 min: too late
    ("cat", VIEW, T + 630 * MIN, None),
    ("cat", CART, T + 640 * MIN, None),
    ("cat", BUY, T + 665 * MIN, 9.5),  # hour 11
    ("cat", BUY, T + 670 * MIN, 5.0),  # revenue, no transition
]


def shard_with(*batches: EventBatch, shard_id: int = 0) -> Shard:
    """A shard fed ``batches``; the lateness covers the script, whose users interleave."""
    shard = Shard(shard_id, [0], windows=WindowConfig(allowed_lateness_ms=86_400_000))
    for seq, batch in enumerate(batches, start=1):
        shard.apply([Delivery(0, seq, 0, 0, encode(batch))])
    return shard


def answer_of(*shards: Shard) -> dict:
    insights = merge_insights([s.insights_partials() for s in shards])
    return conversion_answer(insights, Granularity.HOUR)


def test_a_scripted_funnel_gives_known_counts_rates_and_revenue_per_hour() -> None:
    answer = answer_of(shard_with(batch_of(SCRIPT)))
    ten, eleven = answer["buckets"]
    assert [s["count"] for s in ten["steps"]] == [3, 2, 1]
    assert [s["count"] for s in eleven["steps"]] == [0, 0, 1]
    assert ten["revenue"] == 20.5 and ten["purchasing_users"] == 1 and ten["active_users"] == 3
    assert eleven["revenue"] == 14.5 and eleven["purchases"] == 2
    assert eleven["revenue_per_purchasing_user"] == 14.5
    totals = answer["totals"]
    assert [s["count"] for s in totals["steps"]] == [3, 2, 2]
    assert [s["rate_from_first"] for s in totals["steps"]] == [1.0, 2 / 3, 2 / 3]
    assert [s["rate_from_previous"] for s in totals["steps"]] == [1.0, 2 / 3, 1.0]
    assert totals["revenue"] == 35.0 and totals["purchasing_users"] == 2
    assert totals["revenue_per_purchasing_user"] == 17.5
    assert totals["active_users"] == 3 and totals["revenue_per_active_user"] == 35 / 3


def test_any_cut_of_the_stream_into_batches_gives_the_same_answer() -> None:
    whole = answer_of(shard_with(batch_of(SCRIPT)))
    rng = random.Random(3)
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(SCRIPT)), 3))
        parts = [SCRIPT[a:b] for a, b in zip([0, *cuts], [*cuts, len(SCRIPT)], strict=True)]
        assert answer_of(shard_with(*(batch_of(p) for p in parts))) == whole


def test_batching_does_not_change_random_traffic_counts() -> None:
    batch = random_batch(3000, users=40, seed=7)
    one = Shard(0, [0])
    one.apply([Delivery(0, 1, 0, 0, encode(batch))])
    many = Shard(0, [0])
    for seq, start in enumerate(range(0, len(batch), 250), start=1):
        part = batch.take(np.arange(start, min(start + 250, len(batch))))
        many.apply([Delivery(0, seq, 0, 0, encode(part))])
    assert one.insights_partials()["conversion"] == many.insights_partials()["conversion"]


def test_shards_holding_different_users_merge_to_the_single_shard_answer() -> None:
    ann = [r for r in SCRIPT if r[0] == "ann"]
    rest = [r for r in SCRIPT if r[0] != "ann"]
    split = answer_of(shard_with(batch_of(ann)), shard_with(batch_of(rest), shard_id=1))
    assert split == answer_of(shard_with(batch_of(SCRIPT)))


def test_merging_shards_with_different_funnels_is_refused() -> None:
    a = ConversionWindows(FunnelSpec()).partials()
    b = ConversionWindows(FunnelSpec.parse("page_view,purchase", 60)).partials()
    with pytest.raises(ValueError):
        merge_partials([a, b])


def test_late_transitions_go_to_corrections_or_are_dropped_by_policy() -> None:
    batch = batch_of([("dan", VIEW, T + 600 * MIN, None), ("dan", CART, T + 500 * MIN, None)])
    late = np.array([False, True])
    rows = np.zeros(2, dtype=np.int64)
    for policy, corrected in ((LatenessPolicy.CORRECT, [0, 1, 0]), (LatenessPolicy.DROP, None)):
        windows = ConversionWindows(config=WindowConfig(policy=policy))
        windows.apply(batch, rows, late)
        hours = windows.partials()["corrections"]["hour"]
        assert [b["steps"] for b in hours.values()] == ([corrected] if corrected else [])


def test_a_deleted_user_row_reused_by_a_new_user_starts_with_no_attempt() -> None:
    view = batch_of([("eve", VIEW, T, None)])
    delete = batch_of([("eve", "user_deleted", T + MIN, None)])
    cart = batch_of([("fay", CART, T + 2 * MIN, None)])
    waiting = shard_with(view, delete, cart)  # eve's row waits for the fold of her events
    assert waiting.table.rows_of(["fay"]).tolist() == [1]
    shard = shard_with(view, delete)
    shard.fold_insights()
    shard.apply([Delivery(0, 3, 0, 0, encode(cart))])
    assert shard.table.rows_of(["fay"]).tolist() == [0]  # eve's row, reused
    for answer in (waiting, shard):
        hours = answer.insights_partials()["conversion"]["buckets"]["hour"]
        assert [b["steps"] for b in hours.values()] == [[1, 0, 0]]
    hours = shard.insights_partials()["conversion"]["buckets"]["hour"]
    assert [b["steps"] for b in hours.values()] == [[1, 0, 0]]


def test_the_vectorised_rounds_and_the_event_by_event_path_agree() -> None:
    rng = np.random.default_rng(11)
    n = 5000
    rows = rng.integers(0, 60, n)
    types = rng.choice([TYPE_CODE[EventType(t)] for t in (VIEW, CART, BUY, "click")], n)
    ts = T + rng.integers(0, 6 * 60 * MIN, n)
    answers = []
    for min_round in (1, 10**9):
        tracker = FunnelTracker(FunnelSpec())
        tracker.min_round = min_round
        made = [
            tracker.advance(rows[a : a + 500], types[a : a + 500], ts[a : a + 500])
            for a in range(0, n, 500)
        ]
        answers.append(
            (np.concatenate(made).tolist(), tracker.reached.tolist(), tracker.at.tolist())
        )
    assert answers[0] == answers[1]
    assert sum(s >= 0 for s in answers[0][0]) > 100


def test_settings_describe_the_funnel_and_refuse_unknown_steps() -> None:
    settings = Settings(funnel_steps="page_view,purchase", conversion_window_s=90, _env_file=None)
    spec = FunnelSpec.parse(settings.funnel_steps, settings.conversion_window_s)  # as the launcher
    assert spec == FunnelSpec((EventType.PAGE_VIEW, EventType.PURCHASE), 90_000)
    with pytest.raises(ValidationError, match="teleport"):
        Settings(funnel_steps="page_view,teleport", _env_file=None)
