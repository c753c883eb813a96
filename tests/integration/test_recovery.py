"""A killed shard restores its newest snapshot and replays; meanwhile it answers "recovering"."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import nats
import pytest
import ray

from actors.batch import EventBatch
from actors.checkpoint_store import (
    CheckpointConfig,
    FolderCheckpoints,
    ObjectStoreCheckpoints,
    partition_prefix,
    snapshot_name,
)
from actors.errors import ShardRecovering
from actors.events import TYPE_CODE, EventType
from actors.jetstream import StreamNames, dead_letter_counts, ensure_streams
from actors.partitioning import events_subject, partition_of
from actors.pool import PoolSpec, ShardPool
from actors.producer import Producer
from cluster.launcher import Platform
from cluster.nats_server import EmbeddedNats
from tests.support.events import event, random_batch
from tests.support.truth import assert_counts, settled_profiles, truth_of
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

PARTITIONS = 4
STREAMS = StreamNames()


@pytest.fixture(scope="module")
def nats_for_recovery(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(tmp_path_factory.mktemp("nats-recovery")) as server:
        asyncio.run(_streams(server.url))
        yield server


async def _streams(url: str) -> None:
    nc = await nats.connect(url)
    await ensure_streams(nc.jetstream(), STREAMS)
    await nc.close()


def make_pool(url: str, name: str, checkpoints: CheckpointConfig) -> ShardPool:
    spec = PoolSpec(PARTITIONS, 2, url, STREAMS.events, name=name, checkpoints=checkpoints)
    return ShardPool.create(spec)


async def publish(url: str, batch: EventBatch, garbage: Sequence[tuple[int, bytes]] = ()) -> None:
    """Publish a batch through the producer, and raw garbage messages to partitions."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    producer = await Producer(js, PARTITIONS).start()
    await producer.send(batch)
    await producer.close()
    for partition, body in garbage:
        await js.publish(events_subject(partition), body)
    await nc.close()


def test_a_killed_shard_restores_its_snapshot_replays_and_answers_recovering_meanwhile(
    ray_local: int, nats_for_recovery: EmbeddedNats
) -> None:
    url = nats_for_recovery.url
    pool = make_pool(url, "recovery", CheckpointConfig(interval_s=0, keep=2))
    try:
        first = random_batch(4000, 120, seed=21, prefix="rec-")
        asyncio.run(publish(url, first))
        truth = truth_of(first)
        asyncio.run(settled_profiles(pool, truth))
        stored = asyncio.run(pool.checkpoint())
        assert all(s["positions"] for s in stored)

        # After the snapshot: new events, the first 300 again under new message
        # ids (only event-id de-duplication catches them), and garbage.
        second = random_batch(3000, 120, seed=22, prefix="rec-")
        second.event_id = [f"second-{i}" for i in range(len(second))]
        again = first.take(list(range(300)))
        victim_user = second.user_id[0]
        victim = pool.owner(victim_user)
        garbage = [(partition_of(victim_user, PARTITIONS), b"\x01 garbage after the snapshot")]
        dlq_before = asyncio.run(_dead_letters(url))
        asyncio.run(publish(url, second, garbage))
        asyncio.run(publish(url, again))
        for user, counts in truth_of(second).items():
            truth.setdefault(user, Counter()).update(counts)
        asyncio.run(settled_profiles(pool, truth))
        wait_until(lambda: asyncio.run(_dead_letters(url)) == dlq_before + 1, timeout_s=30)

        # A corrupt newer snapshot: the shard must fall back to the good one.
        scope = pool.spec.scope
        victim_partition = partition_of(victim_user, PARTITIONS)
        taken_ms = stored[victim]["created_ms"]
        at = stored[victim]["positions"][victim_partition]
        good = snapshot_name(scope, victim_partition, at, taken_ms)
        asyncio.run(_save(url, snapshot_name(scope, victim_partition, at, taken_ms + 1)))

        before = ray.get(pool.handles[victim].status.remote())["started_at"]
        ray.kill(pool.handles[victim], no_restart=False)

        def answered_recovering() -> bool:
            try:
                asyncio.run(pool.profiles([victim_user]))
            except ShardRecovering as exc:
                assert exc.shard == victim and exc.retry_after_s > 0
                return True
            return False

        wait_until(answered_recovering, timeout_s=30, every_s=0.02)
        profiles = asyncio.run(settled_profiles(pool, truth))
        assert_counts(profiles, truth)
        status = ray.get(pool.handles[victim].status.remote())
        assert status["started_at"] != before
        assert status["recovery"]["restored"][victim_partition] == good
        assert status["recovering"] is False
        assert status["duplicates"] >= 1  # the resent events were recognised after restore
        # Replayed garbage is dead-lettered again under the same id: still one copy.
        assert asyncio.run(_dead_letters(url)) == dlq_before + 1
    finally:
        pool.shutdown()


def test_a_stopped_pool_snapshots_and_a_new_one_starts_from_there(
    ray_local: int, nats_for_recovery: EmbeddedNats, tmp_path: Path
) -> None:
    url = nats_for_recovery.url
    config = CheckpointConfig(interval_s=0, folder=str(tmp_path), keep=1)
    batch = random_batch(2000, 50, seed=31, prefix="restart-")
    batch.event_id = [f"restart-{i}" for i in range(len(batch))]
    batch.type[17] = TYPE_CODE[EventType.USER_DELETED]
    deleted = batch.user_id[17]
    later = [i for i in range(18, len(batch)) if batch.user_id[i] == deleted]
    keep = [i for i in range(len(batch)) if i not in later]
    batch = batch.take(keep)  # nothing of the deleted user after its deletion
    truth = {u: c for u, c in truth_of(batch).items() if u != deleted}

    pool = make_pool(url, "restart", config)
    try:
        asyncio.run(publish(url, batch))
        asyncio.run(settled_profiles(pool, truth))
    finally:
        pool.shutdown()  # takes a last snapshot per shard
    store = FolderCheckpoints(tmp_path)
    scope = f"{STREAMS.events}.restart"
    names = {p: asyncio.run(store.names(partition_prefix(scope, p))) for p in range(PARTITIONS)}
    assert all(len(n) == 1 for n in names.values())  # one kept per partition
    blob = (tmp_path / names[partition_of(deleted, PARTITIONS)][0]).read_bytes()
    assert deleted.encode() not in blob

    again = make_pool(url, "restart", config)
    try:
        statuses = asyncio.run(again.status())
        restored = {p: n for s in statuses for p, n in s["recovery"]["restored"].items()}
        assert restored == {p: n[0] for p, n in names.items()}
        profiles = asyncio.run(settled_profiles(again, truth))
        assert_counts(profiles, truth)
        assert asyncio.run(again.profiles([deleted])) == [None]
    finally:
        again.shutdown()


async def _dead_letters(url: str) -> int:
    nc = await nats.connect(url)
    try:
        return sum((await dead_letter_counts(nc.jetstream(), STREAMS)).values())
    finally:
        await nc.close()


async def _save(url: str, name: str) -> None:
    nc = await nats.connect(url)
    try:
        await ObjectStoreCheckpoints(nc.jetstream(), CheckpointConfig().bucket).save(
            name, b"AUDSNAP\x00 not really"
        )
    finally:
        await nc.close()


def test_the_snapshot_bytes_round_trip_through_the_object_store(
    nats_for_recovery: EmbeddedNats,
) -> None:
    blob = bytes(range(256)) * 8000  # several chunks

    async def scenario() -> tuple[bytes, list[str]]:
        nc = await nats.connect(nats_for_recovery.url)
        try:
            store = ObjectStoreCheckpoints(nc.jetstream(), "ROUNDTRIP")
            await store.save("x.shard-0000.1", blob)
            await store.save("x.shard-0000.2", b"small")
            await store.delete("x.shard-0000.2")
            return await store.load("x.shard-0000.1"), await store.names("x.")
        finally:
            await nc.close()

    loaded, names = asyncio.run(scenario())
    assert loaded == blob and names == ["x.shard-0000.1"]


def test_the_api_answers_503_recovering_while_a_shard_restarts_then_200(
    platform: Platform, api: httpx.Client
) -> None:
    assert platform.pool is not None
    user = "recover-api-user"
    assert api.post("/v1/events", json=[event(user, "click")]).status_code == 202
    wait_until(lambda: api.get(f"/v1/users/{user}").status_code == 200)
    stored = api.post("/v1/checkpoints")
    assert stored.status_code == 200, stored.text
    assert [c["positions"] != {} for c in stored.json()["checkpoints"]] == [True, True]

    victim = platform.pool.owner(user)
    ray.kill(platform.pool.handles[victim], no_restart=False)

    def recovering_answer() -> httpx.Response | None:
        answer = api.get(f"/v1/users/{user}")
        return answer if answer.status_code == 503 else None

    answer = wait_until(recovering_answer, timeout_s=30, every_s=0.02)
    assert answer.json()["status"] == "recovering" and answer.json()["shard"] == victim
    assert int(answer.headers["Retry-After"]) >= 1
    assert "Traceback" not in answer.text
    wait_until(lambda: api.get(f"/v1/users/{user}").status_code == 200, timeout_s=60)
    status = api.get("/v1/status").json()
    assert status["recovering"] == []
    restored = status["shards"][victim]["recovery"]["restored"]
    partition = partition_of(user, platform.pool.spec.partitions)
    taken = stored.json()["checkpoints"][victim]
    at, scope = taken["positions"][str(partition)], platform.pool.spec.scope
    assert restored[str(partition)] == snapshot_name(scope, partition, at, taken["created_ms"])
    assert status["retention_warnings"] == []
