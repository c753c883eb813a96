"""The simulator is deterministic, paced by the rate, valid, and behaves like an audience."""

from collections import defaultdict

import numpy as np
import pytest

from actors.batch import EventBatch
from actors.events import TYPE_CODE, EventType
from actors.simulator import AudienceModel, SimChunk, Simulator
from actors.validation import ValidationPolicy, check_batch

START = 1_767_225_600_000  # 2026-01-01T00:00Z
HOUR_MS = 3_600_000
CODE = {t: TYPE_CODE[t] for t in EventType}


def run(
    users: int = 3000,
    rate: float = 5000,
    duration_s: float = 6,
    seed: int = 7,
    time_scale: float = 60,
    model: AudienceModel | None = None,
) -> list[SimChunk]:
    sim = Simulator(users, seed, START, model or AudienceModel(), time_scale=time_scale)
    return list(sim.batches(rate, duration_s))


def joined(chunks: list[SimChunk]) -> EventBatch:
    return EventBatch.concat(c.batch for c in chunks)


@pytest.fixture(scope="module")
def chunks() -> list[SimChunk]:
    return run()


@pytest.fixture(scope="module")
def events(chunks: list[SimChunk]) -> EventBatch:
    return joined(chunks)


def count(events: EventBatch, kind: EventType) -> int:
    return int((events.type == CODE[kind]).sum())


def test_the_same_seed_gives_identical_events_and_another_seed_different_ones() -> None:
    a, b, c = (joined(run(users=500, rate=2000, duration_s=1, seed=s)) for s in (1, 1, 2))
    assert a.event_id == b.event_id and a.user_id == b.user_id
    assert np.array_equal(a.type, b.type) and np.array_equal(a.ts, b.ts)
    assert np.array_equal(a.value, b.value, equal_nan=True) and a.item_id == b.item_id
    assert a.event_id[0] == "sim1-0" and c.event_id[0] == "sim2-0"
    assert a.user_id != c.user_id or not np.array_equal(a.ts, c.ts)


def test_the_rate_sets_the_events_per_chunk_and_the_total(chunks: list[SimChunk]) -> None:
    sizes = [len(c.batch) for c in chunks]
    assert sum(sizes) == 5000 * 6
    assert len(chunks) == 60 and all(s in (499, 500, 501) for s in sizes)
    offsets = [c.wall_offset_s for c in chunks]
    assert offsets == pytest.approx([k * 0.1 for k in range(60)])


def test_every_batch_passes_validation(chunks: list[SimChunk]) -> None:
    for chunk in chunks:
        checked = check_batch(chunk.batch, ValidationPolicy(), at_ms=int(chunk.batch.ts.max()))
        assert checked.rejected == []


def test_event_time_never_goes_backwards_for_a_user_within_or_across_batches(
    chunks: list[SimChunk],
) -> None:
    last: dict[str, int] = {}
    for chunk in chunks:
        assert (np.diff(chunk.batch.ts) >= 0).all()
        for user, ts in zip(chunk.batch.user_id, chunk.batch.ts.tolist(), strict=True):
            assert last.get(user, ts) <= ts
            last[user] = ts


def test_without_a_daily_cycle_chunks_cover_consecutive_event_time_windows() -> None:
    chunks = run(users=500, rate=1000, duration_s=2, model=AudienceModel(daily_amplitude=0))
    for k, chunk in enumerate(chunks):
        window = START + np.array([k, k + 1]) * 0.1 * 60 * 1000
        assert window[0] <= chunk.batch.ts.min() and chunk.batch.ts.max() < window[1]


def test_the_funnel_converts_like_a_shop(events: EventBatch) -> None:
    views, carts = count(events, EventType.PAGE_VIEW), count(events, EventType.ADD_TO_CART)
    assert 0.03 < carts / views < 0.15
    assert 0.15 < count(events, EventType.PURCHASE) / carts < 0.5
    assert count(events, EventType.DWELL) == pytest.approx(views, abs=400)  # open sessions


def test_views_are_followed_by_a_dwell_on_that_item_and_purchases_by_a_price(
    events: EventBatch,
) -> None:
    viewing: dict[str, str | None] = {}
    carted: dict[str, set[str | None]] = defaultdict(set)
    for i, (user, kind) in enumerate(zip(events.user_id, events.type.tolist(), strict=True)):
        item = events.item_id[i]
        if kind == CODE[EventType.PAGE_VIEW]:
            viewing[user] = item
        elif kind == CODE[EventType.DWELL]:
            assert viewing.pop(user) == item and 0 < events.value[i] < 3600
        elif kind == CODE[EventType.ADD_TO_CART]:
            carted[user].add(item)
        elif kind == CODE[EventType.PURCHASE]:
            assert item in carted[user] and events.value[i] > 0
            assert events.category[i] is not None and events.category[i].startswith("cat-")


def test_a_few_items_take_a_large_share_of_views(events: EventBatch) -> None:
    views = [
        item
        for item, t in zip(events.item_id, events.type.tolist(), strict=True)
        if t == CODE[EventType.PAGE_VIEW]
    ]
    counts = sorted(np.unique(np.array(views), return_counts=True)[1], reverse=True)
    top = counts[: AudienceModel().items // 100]
    assert sum(top) / len(views) > 0.1


def test_a_user_signs_up_and_identifies_as_their_first_session_opens(events: EventBatch) -> None:
    seen: dict[str, list[int]] = defaultdict(list)
    for i, (user, kind) in enumerate(zip(events.user_id, events.type.tolist(), strict=True)):
        if len(seen[user]) < 3:
            seen[user].append(kind)
            if kind == CODE[EventType.IDENTIFY]:
                traits = events.traits[i]
                assert traits is not None and set(traits) == {"plan", "country", "device"}
    expected = [CODE[EventType.SESSION_START], CODE[EventType.SIGNUP], CODE[EventType.IDENTIFY]]
    assert all(first == expected[: len(first)] for first in seen.values())
    # A run may end right after a user's first session_start.
    assert count(events, EventType.SIGNUP) == sum(len(first) > 1 for first in seen.values())


def test_a_user_is_never_in_two_sessions_at_once_even_in_a_tiny_audience() -> None:
    for users in (1, 2, 9):
        events = joined(run(users=users, rate=2000, duration_s=1))
        open_session: dict[str, bool] = defaultdict(bool)
        for user, kind in zip(events.user_id, events.type.tolist(), strict=True):
            if kind == CODE[EventType.SESSION_START]:
                assert not open_session[user]
                open_session[user] = True
            elif kind == CODE[EventType.SESSION_END]:
                assert open_session[user]
                open_session[user] = False
            elif kind not in (CODE[EventType.SIGNUP], CODE[EventType.IDENTIFY]):
                assert open_session[user]


def test_fading_users_take_a_shrinking_share_of_events() -> None:
    model = AudienceModel(fading_share=0.3, fade_half_life_s=86_400)
    sim = Simulator(2000, 3, START, model, time_scale=7 * 86_400 / 4)  # a week in 4 s
    events = joined(list(sim.batches(5000, 4)))
    fading = np.isin(np.array(events.user_id), sim.fading_user_ids)
    third = len(events) // 3
    assert fading[:third].mean() > 2 * fading[-third:].mean()


def test_a_simulated_day_has_busy_and_quiet_hours() -> None:
    events = joined(run(users=5000, rate=1000, duration_s=60, time_scale=1440))
    hours = np.bincount((events.ts - START) // HOUR_MS, minlength=24)
    assert hours.size == 24  # the clock warp still fits one day into one minute
    assert hours.max() / hours.min() > 1.5
    assert 17 <= int(np.argmax(hours)) <= 23  # evening UTC


def test_a_second_run_continues_the_audience_even_after_stopping_early() -> None:
    sim = Simulator(400, 5, START, time_scale=60)
    first = next(iter(sim.batches(4000, 1))).batch  # the caller stops after one chunk
    rest = joined(list(sim.batches(4000, 0.5)) + list(sim.batches(200, 0.5)))
    assert rest.event_id[0] == f"sim5-{len(first)}"
    assert len(rest) == 2000 + 100 and rest.ts.min() >= first.ts.max()
    assert np.all(np.diff(rest.ts) >= 0)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        AudienceModel(p_click=1.5)
    with pytest.raises(ValueError):
        Simulator(0, 1, START)
    with pytest.raises(ValueError):
        next(Simulator(10, 1, START).batches(10, 1, chunk_s=0))
