"""The shard autoscaling policy over load curves: follows load, ignores spikes, never flaps."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest

from cluster.autoscaling import LoadSample, ScalingPolicy, ShardAutoscaler

CAPACITY = 1000.0  # messages per second one shard applies when fully busy
STEP_S = 5.0


def run_curve(
    rate_at: Callable[[float], float],
    seconds: float,
    policy: ScalingPolicy,
    start: int = 2,
    partitions: int = 64,
) -> list[tuple[float, int, int]]:
    """A simulated stream: shards apply up to CAPACITY each, the rest waits as backlog.

    The autoscaler's decisions are applied at once. Returns (t, shards, backlog) per step.
    """
    scaler = ShardAutoscaler(policy, partitions)
    shards, backlog = start, 0.0
    busy = [0.0] * shards
    applied = [0] * shards
    trace = []
    t = 0.0
    while t <= seconds:
        offered = rate_at(t) * STEP_S + backlog
        done = min(offered, shards * CAPACITY * STEP_S)
        backlog = offered - done
        busy = [b + done / shards / CAPACITY for b in busy]
        applied = [a + int(done / shards) for a in applied]
        decision = scaler.observe(LoadSample(t, tuple(busy), tuple(applied), int(backlog)))
        trace.append((t, shards, int(backlog)))
        if decision is not None and decision.desired != shards:
            shards = decision.desired  # a new pool: counters start again
            busy, applied = [0.0] * shards, [0] * shards
        t += STEP_S
    return trace


def changes(trace: list[tuple[float, int, int]]) -> int:
    return sum(1 for a, b in itertools.pairwise(trace) if a[1] != b[1])


def test_a_ramp_is_followed_up_to_what_the_load_needs_and_the_backlog_drains() -> None:
    policy = ScalingPolicy(max_shards=16, up_window_s=15, down_window_s=120)
    trace = run_curve(lambda t: min(6000.0, 500 + 20 * t), 600, policy)
    needed = math.ceil(6000 / CAPACITY / policy.target_utilisation)
    final_shards, final_backlog = trace[-1][1], trace[-1][2]
    assert needed <= final_shards <= needed + 2
    assert final_backlog == 0
    shard_counts = [s for _, s, _ in trace]
    assert shard_counts == sorted(shard_counts)  # a ramp only ever scales up


def test_a_short_spike_adds_no_shard() -> None:
    policy = ScalingPolicy(up_window_s=30, down_window_s=300)
    spike = run_curve(lambda t: 4000.0 if 200 <= t < 210 else 800.0, 400, policy)
    assert {s for _, s, _ in spike} == {2}


def test_oscillating_load_does_not_flap() -> None:
    policy = ScalingPolicy(max_shards=8, up_window_s=30, down_window_s=300)
    trace = run_curve(lambda t: 1200 + 600 * math.sin(2 * math.pi * t / 120), 1800, policy)
    assert changes(trace) <= 2


def test_scale_down_waits_for_the_down_window_and_respects_the_minimum() -> None:
    policy = ScalingPolicy(min_shards=2, up_window_s=15, down_window_s=120)
    trace = run_curve(lambda t: 5000.0 if t < 300 else 100.0, 900, policy, start=8)
    first_down = next(t for t, s, _ in trace if s < 8)
    assert first_down >= 300 + 120 - STEP_S
    assert trace[-1][1] == 2


def test_bounds_cap_the_count_at_max_shards_and_the_partitions() -> None:
    flood = run_curve(lambda t: 50_000.0, 300, ScalingPolicy(max_shards=64, up_window_s=0), 2, 6)
    assert max(s for _, s, _ in flood) == 6  # never more shards than partitions
    capped = run_curve(lambda t: 50_000.0, 300, ScalingPolicy(max_shards=4, up_window_s=0))
    assert max(s for _, s, _ in capped) == 4


def test_a_growing_backlog_adds_a_shard_even_when_busy_time_looks_fine() -> None:
    scaler = ShardAutoscaler(ScalingPolicy(up_window_s=0), partitions=8)
    decisions = [
        scaler.observe(LoadSample(t, (0.6 * t, 0.6 * t), (100 * int(t), 100 * int(t)), 50 * int(t)))
        for t in (0.0, 5.0, 10.0, 15.0)
    ]
    assert decisions[0] is None
    last = decisions[-1]
    assert last is not None and last.desired == 3 and "backlog" in last.reason


def test_no_decision_until_rates_are_known_again_after_a_rescale() -> None:
    scaler = ShardAutoscaler(ScalingPolicy(), partitions=8)
    assert scaler.observe(LoadSample(0, (0.0, 0.0), (0, 0), 0)) is None
    assert scaler.observe(LoadSample(5, (1.0, 1.0), (10, 10), 0)) is not None
    assert scaler.observe(LoadSample(10, (0.0, 0.0, 0.0), (0, 0, 0), 0)) is None


@pytest.mark.parametrize(
    "kwargs",
    [{"min_shards": 0}, {"min_shards": 3, "max_shards": 2}, {"target_utilisation": 0}],
)
def test_a_policy_with_impossible_bounds_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ScalingPolicy(**kwargs)  # type: ignore[arg-type]
