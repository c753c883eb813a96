"""Per-request reads over NATS answer exactly as the Ray calls do, and fall back to them.

Against real shards (Ray) and a real nats-server: the same users' rows and
seen-items checks asked three ways (Ray calls, NATS, NATS unreachable) must be
equal, and each way must be the one the pool's counters say it took.
"""

from __future__ import annotations

import asyncio
import uuid

import nats
import numpy as np
import pytest

from actors.checkpoint_store import CheckpointConfig
from actors.jetstream import StreamNames
from actors.pool import PoolSpec, ShardPool
from actors.producer import Producer
from actors.shard_queries import QueryClient
from actors.state import _ROW_ARRAYS, UserRows
from cluster.nats_server import EmbeddedNats, free_port
from tests.support.chaos import prepare
from tests.support.events import random_batch
from tests.support.truth import settled_profiles, truth_of

pytestmark = pytest.mark.integration

PARTITIONS = 4
STREAMS = StreamNames(events="QUERY_EVENTS", dlq="QUERY_DLQ")


def _rows_equal(a: UserRows, b: UserRows) -> bool:
    arrays = all(np.array_equal(getattr(a, n), getattr(b, n)) for n in _ROW_ARRAYS)
    lists = (a.user_ids, a.recent, a.affinity, a.traits) == (
        b.user_ids,
        b.recent,
        b.affinity,
        b.traits,
    )
    return arrays and lists


async def _read(pool: ShardPool, users: list[str]) -> tuple[UserRows, list[list[bool]]]:
    rows = await pool.user_rows(users)
    pairs = [
        (u, [*recent[:3], "never-an-item"]) for u, recent in zip(users, rows.recent, strict=True)
    ]
    return rows, await pool.seen(pairs)


def test_reads_over_nats_equal_the_ray_calls_and_fall_back_to_them(
    ray_local: int, nats_server: EmbeddedNats
) -> None:
    url = nats_server.url
    asyncio.run(prepare(url, STREAMS))
    spec = PoolSpec(
        PARTITIONS, 2, url, STREAMS.events, shard_cpus=0.25, name="queried",
        checkpoints=CheckpointConfig(interval_s=0),
    )  # fmt: skip
    pool = ShardPool.create(spec)
    batch = random_batch(3000, 150, seed=11, prefix="q-")

    async def scenario() -> None:
        nc = await nats.connect(url)
        producer = await Producer(nc.jetstream(), PARTITIONS, producer_id=uuid.uuid4().hex).start()
        await producer.send(batch)
        await producer.close()
        await nc.close()
        truth = truth_of(batch)
        await settled_profiles(pool, truth)
        users = [*sorted(truth)[:40], "q-nobody"]  # users of both shards, and an unknown one

        by_ray = await _read(ShardPool.connect(spec), users)
        fast = QueryClient(url, None, spec.scope)
        by_nats = await _read(ShardPool.connect(spec, fast), users)
        closed = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
        unreachable = QueryClient(closed, None, spec.scope)
        by_fallback = await _read(ShardPool.connect(spec, unreachable), users)

        assert by_ray[0].held.tolist() == [True] * 40 + [False]
        assert any(any(s[:-1]) for s in by_ray[1]) and not any(s[-1] for s in by_ray[1])
        for rows, seen in (by_nats, by_fallback):
            assert _rows_equal(rows, by_ray[0]) and seen == by_ray[1]
        assert fast.counts() == {"over_nats": 4, "fell_back": 0}  # 2 shards x (rows, seen)
        assert unreachable.counts()["over_nats"] == 0 and unreachable.counts()["fell_back"] >= 2
        await fast.close()

    try:
        asyncio.run(scenario())
    finally:
        pool.shutdown()
