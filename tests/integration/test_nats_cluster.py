"""A 3-node JetStream cluster: losing one node (the stream leader) loses and doubles nothing.

The streams and the snapshot bucket have 3 replicas. Events go in through the
producer SDK, connected to every node, while the shards consume; the node that
leads the event stream, which is also the one node the shards were given, is
killed mid-stream. Publishing goes on once the remaining two elect a leader;
the shards reconnect to a node they learnt from the cluster's INFO and
re-create their consumers. Then every published event is in the stream exactly
once, and every user's counts in the shards equal the truth.

Consumers are R1 and may live on any node: when the node of one dies while its
reader's own connection stays up, the reader re-creates it (the last test).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import psutil
import pytest
import ray
from nats.aio.client import Client
from nats.js import JetStreamContext

from actors.batch import EventBatch
from actors.checkpoint_store import CheckpointConfig
from actors.codec import decode
from actors.consumer import StreamReader
from actors.jetstream import StreamNames, ensure_streams
from actors.partitioning import events_subject, partition_of_subject
from actors.pool import PoolSpec, ShardPool
from actors.producer import Producer
from cluster.nats_server import EmbeddedNatsCluster
from tests.support.events import random_batch
from tests.support.truth import assert_counts, settled_profiles, truth_of
from tests.support.waiting import async_wait_until

pytestmark = pytest.mark.integration

PARTITIONS = 4
SHARDS = 2
REPLICAS = 3
STREAMS = StreamNames()
EVENTS = 24_000
RATE = 3_000.0  # events per second: publishing lasts about 8 s
KILL_AT = 1 / 3  # of the events sent


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[EmbeddedNatsCluster]:
    """Three nats-servers of this test's own; every one stopped by its process at the end."""
    cluster = EmbeddedNatsCluster(tmp_path / "nats-cluster")
    try:
        yield cluster.start()
    finally:
        cluster.stop()


async def _quiet(exc: Exception) -> None:
    """A node going away is the point of the test; nats-py would print every attempt."""


async def connect(cluster: EmbeddedNatsCluster) -> Client:
    """A connection seeded with every node, reconnecting for ever, quickly."""
    return await nats.connect(
        servers=cluster.urls,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        error_cb=_quiet,
    )


def test_a_cluster_node_killed_and_restarted_rejoins_and_stop_leaves_no_process(
    tmp_path: Path,
) -> None:
    cluster = EmbeddedNatsCluster(tmp_path / "nats-cluster").start()
    try:
        pids, urls = cluster.pids, cluster.urls
        assert len(set(urls)) == 3 and all(pids)
        cluster.kill(1)
        assert cluster.running() == [0, 2] and not psutil.pid_exists(pids[1] or 0)
        cluster.wait_ready()  # the two left agree on a meta leader
        cluster.restart(1)
        assert cluster.running() == [0, 1, 2] and cluster.urls == urls
        assert cluster.pids[1] != pids[1]
    finally:
        cluster.stop()
    assert cluster.running() == []
    assert not any(psutil.pid_exists(pid) for pid in cluster.pids + pids if pid)


@dataclass
class Kill:
    """One node killed, when, and how the shards' positions moved afterwards."""

    node: str
    wall: float  # time.time() of the kill, comparable with the stream's stored times
    at: float  # time.monotonic() of the kill
    samples: list[tuple[float, dict[int, int]]] = field(default_factory=list)


@dataclass
class StoredEvents:
    """What the event stream holds: copies per event id, and the first message per
    partition stored after the kill (its sequence and its stored time)."""

    copies: Counter[str]
    after_kill: dict[int, tuple[int, float]]


async def stream_leader(js: JetStreamContext, stream: str) -> str:
    """The server name of the node that leads ``stream`` now."""
    info = await js.stream_info(stream)
    assert info.cluster is not None and info.cluster.leader
    return info.cluster.leader


def test_killing_the_stream_leader_mid_stream_loses_and_doubles_nothing(
    ray_local: int, nats_cluster: EmbeddedNatsCluster
) -> None:
    asyncio.run(_create_streams(nats_cluster))
    leader = asyncio.run(_leader(nats_cluster))
    # The shards know only the node that will die; the others they must learn from it.
    seed = nats_cluster.nodes[nats_cluster.index_of(leader)].url
    spec = PoolSpec(
        PARTITIONS,
        SHARDS,
        seed,
        STREAMS.events,
        name="nats-cluster",
        checkpoints=CheckpointConfig(interval_s=1, replicas=REPLICAS),
    )
    pool = ShardPool.create(spec)
    try:
        batch = random_batch(EVENTS, 300, seed=61, prefix="ncl-")
        truth = truth_of(batch)
        kill, profiles = asyncio.run(_publish_while_killing_the_leader(nats_cluster, pool, batch))
        stored = asyncio.run(_events_in_stream(nats_cluster, kill))
        counters: list[dict[str, Any]] = ray.get([h.counters.remote() for h in pool.handles])

        assert kill.node == leader
        assert sum(stored.copies.values()) == EVENTS  # nothing doubled ...
        assert set(stored.copies) == set(batch.event_id)  # ... nothing lost
        assert len(profiles) == len(truth)
        assert_counts(profiles, truth)  # and the shards applied each event once
        assert all(c["reconnects"] >= 1 for c in counters)  # they moved to another node
        assert sorted(stored.after_kill) == list(range(PARTITIONS))
        resumed = min(t for _, t in stored.after_kill.values()) - kill.wall
        consuming = _consuming_again(kill, stored)
        assert None not in consuming.values()
        print(
            f"\nkilled {kill.node} (stream leader, the shards' seed): "
            f"first message stored {resumed:.2f} s later; partitions consuming again after "
            f"{consuming} s; shard reconnects {[c['reconnects'] for c in counters]}, "
            f"consumer re-syncs {[c['consumer_resyncs'] for c in counters]}"
        )
    finally:
        pool.shutdown()


async def _create_streams(cluster: EmbeddedNatsCluster) -> None:
    nc = await connect(cluster)
    try:
        await ensure_streams(nc.jetstream(), STREAMS, replicas=REPLICAS)
        info = await nc.jetstream().stream_info(STREAMS.events)
        assert info.config.num_replicas == REPLICAS
    finally:
        await nc.close()


async def _leader(cluster: EmbeddedNatsCluster) -> str:
    nc = await connect(cluster)
    try:
        return await stream_leader(nc.jetstream(), STREAMS.events)
    finally:
        await nc.close()


async def _publish_while_killing_the_leader(
    cluster: EmbeddedNatsCluster, pool: ShardPool, batch: EventBatch
) -> tuple[Kill, list[dict[str, Any]]]:
    """Publish ``batch`` at ``RATE``, killing the stream's leader node on the way.

    Returns the kill (with the shards' positions sampled after it) and every
    user's profile once the shards applied as many events as were published.
    """
    nc = await connect(cluster)
    js = nc.jetstream()
    # Short ack timeout and backoff: what was in flight to the dead leader is resent
    # within 2 s, not the default 10.
    producer = Producer(
        js, PARTITIONS, max_batch=250, publish_timeout_s=2.0, max_retry_backoff_s=0.5
    )
    await producer.start()
    sent = {"events": 0}
    sampling: asyncio.Task[None] | None = None
    try:
        publishing = asyncio.create_task(_publish(producer, batch, sent))
        await async_wait_until(_reached(sent, int(EVENTS * KILL_AT)), timeout_s=60, every_s=0.01)
        node = await stream_leader(js, STREAMS.events)
        cluster.kill(cluster.index_of(node))
        kill = Kill(node, time.time(), time.monotonic())
        sampling = asyncio.create_task(_sample_positions(pool, kill))
        await publishing
        await producer.flush(timeout_s=60)
        assert producer.published_events == EVENTS
        profiles = await settled_profiles(pool, truth_of(batch))
        sampling.cancel()
        await _sample(pool, kill)  # the state the profiles came from
        return kill, profiles
    finally:
        if sampling is not None:
            sampling.cancel()
        await producer.close(timeout_s=10)
        await nc.close()


def _reached(sent: dict[str, int], events: int) -> Any:
    async def check() -> bool:
        return sent["events"] >= events

    return check


async def _publish(producer: Producer, batch: EventBatch, sent: dict[str, int]) -> None:
    started = time.monotonic()
    chunk = 200
    for start in range(0, len(batch), chunk):
        await producer.send(batch.slice(start, start + chunk))
        sent["events"] = min(len(batch), start + chunk)
        ahead = sent["events"] / RATE - (time.monotonic() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)


async def _sample_positions(pool: ShardPool, kill: Kill) -> None:
    """Record every shard's partition positions every 20 ms (until cancelled)."""
    while True:
        await _sample(pool, kill)
        await asyncio.sleep(0.02)


async def _sample(pool: ShardPool, kill: Kill) -> None:
    counters: list[dict[str, Any]] = await asyncio.gather(
        *(h.counters.remote() for h in pool.handles)
    )
    positions = {int(p): s for c in counters for p, s in c["positions"].items()}
    kill.samples.append((time.monotonic(), positions))


def _consuming_again(kill: Kill, stored: StoredEvents) -> dict[int, float | None]:
    """Per partition, seconds from the kill until its shard applied a message stored after it."""
    again: dict[int, float | None] = {}
    for partition, (seq, _) in sorted(stored.after_kill.items()):
        reached = (t for t, positions in kill.samples if positions.get(partition, 0) >= seq)
        at = next(reached, None)
        again[partition] = None if at is None else round(at - kill.at, 2)
    return again


async def _events_in_stream(cluster: EmbeddedNatsCluster, kill: Kill) -> StoredEvents:
    """Read the whole event stream (from a survivor): copies per event id, and where
    each partition's first message stored after the kill is."""
    nc = await connect(cluster)
    js = nc.jetstream()
    try:
        info = await js.stream_info(STREAMS.events)
        stored = StoredEvents(Counter(), {})
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            message = await js.get_msg(STREAMS.events, seq)
            assert message.data is not None and message.subject and message.time
            stored.copies.update(decode(message.data).event_id)
            partition = partition_of_subject(message.subject)
            at = message.time.timestamp()
            if at >= kill.wall and partition not in stored.after_kill:
                stored.after_kill[partition] = (seq, at)
        return stored
    finally:
        await nc.close()


def test_a_reader_whose_consumers_node_dies_reads_on_from_new_consumers(
    nats_cluster: EmbeddedNatsCluster,
) -> None:
    # Ephemeral consumers are R1, placed on any of the stream's servers: one can
    # live on a node that dies while the reader's own connection stays up.
    asyncio.run(_create_streams(nats_cluster))
    asyncio.run(_reader_outlives_a_consumers_node(nats_cluster))


async def _reader_outlives_a_consumers_node(cluster: EmbeddedNatsCluster) -> None:
    partitions = 8
    nc = await connect(cluster)
    try:
        leaders = {await stream_leader(nc.jetstream(), STREAMS.events), cluster.meta_leader()}
    finally:
        await nc.close()
    # The victim leads neither the stream nor the meta group (no election follows its
    # death); the reader is connected to another node, which stays up.
    victim = next(i for i in range(cluster.size) if cluster.server_name(i) not in leaders)
    survivor = next(i for i in range(cluster.size) if i != victim)
    nc = await nats.connect(cluster.urls[survivor], max_reconnect_attempts=-1, error_cb=_quiet)
    js = nc.jetstream()
    reader: StreamReader | None = None
    try:
        for _ in range(20):  # until one of its consumers lives on the victim
            reader = StreamReader(
                nc, js, STREAMS.events, dict.fromkeys(range(partitions), 0), expires_s=1.0
            )
            await reader.start()
            hosts = [c.cluster.leader for c in await js.consumers_info(STREAMS.events) if c.cluster]
            if cluster.server_name(victim) in hosts:
                break
            await reader.stop()
        else:
            raise AssertionError(f"no consumer placed on {cluster.server_name(victim)}")
        cluster.kill(victim)
        for partition in range(partitions):
            await js.publish(events_subject(partition), b"after the kill", timeout=5)
        seen: set[int] = set()

        async def every_partition_read() -> bool:
            assert reader is not None
            seen.update(d.partition for d in await reader.take(1000, 0.1))
            return len(seen) == partitions

        await async_wait_until(every_partition_read, timeout_s=15)
    finally:
        await nc.close()  # first: deleting a consumer on the dead node would wait out a timeout
        if reader is not None:
            await reader.stop()
