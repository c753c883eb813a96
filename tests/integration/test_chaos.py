"""Chaos: duplicates, garbage, deletions, killed shards and a NATS restart; the state stays exact.

The full-size run (1M events) is ``make chaos`` (also part of ``make bench``);
here the same scenario runs on a smaller stream.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from actors.checkpoint_store import CheckpointConfig
from actors.jetstream import StreamNames
from actors.pool import PoolSpec, ShardPool
from cluster.nats_server import EmbeddedNats
from tests.support.chaos import ChaosPlan, build_workload, prepare, run_chaos

pytestmark = pytest.mark.integration

STREAMS = StreamNames()
EVENTS = int(os.environ.get("AUDIENCE_CHAOS_EVENTS", "60000"))


@pytest.fixture
def chaos_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(tmp_path_factory.mktemp("nats-chaos")) as server:
        asyncio.run(prepare(server.url, STREAMS))
        yield server


def test_the_workload_truth_counts_each_valid_event_once_and_skips_deleted_users() -> None:
    plan = ChaosPlan(events=5000, users=200, deletions=5, seed=3)
    work = build_workload(plan)
    assert work.duplicates >= 0.05 * plan.events and work.malformed >= 0.01 * plan.events
    assert len(work.deleted) == 5 and not work.deleted & set(work.truth)
    unique = {
        event_id
        for kind, batch in work.steps
        if kind == "events"
        for event_id, user in zip(batch.event_id, batch.user_id, strict=True)
        if user not in work.deleted
    }
    assert sum(sum(c.values()) for c in work.truth.values()) == len(unique)


@pytest.mark.parametrize("seed", [1, 2])
def test_counts_stay_exact_through_kills_duplicates_garbage_and_a_nats_restart(
    ray_local: int, chaos_nats: EmbeddedNats, seed: int
) -> None:
    spec = PoolSpec(
        8,
        3,
        chaos_nats.url,
        STREAMS.events,
        name=f"chaos-{seed}",
        checkpoints=CheckpointConfig(interval_s=1.0, keep=2),
    )
    pool = ShardPool.create(spec)
    try:
        plan = ChaosPlan(events=EVENTS, users=1500, kills=3, rate=12_000, seed=seed)
        result = asyncio.run(run_chaos(plan, chaos_nats, pool, STREAMS))
    finally:
        pool.shutdown()
    assert result.users_checked > 1000
    assert result.mismatched_users == []
    assert result.deleted_present == []
    assert result.dead_letters == result.malformed
    assert len(result.kills) == 3 and result.nats_restart_s is not None
    assert all(k.get("caught_up_after_s") is not None for k in result.kills), result.kills
    assert all(k.get("restored") for k in result.kills), result.kills  # restore + replay
