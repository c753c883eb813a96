"""The producer batches per partition up to max_batch, lingers for stragglers, splits what is
too big for one message, holds dead letters like events, and closes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import nats
import orjson
import pytest

from actors.codec import decode
from actors.jetstream import StreamNames, ensure_streams
from actors.partitioning import events_subject, partition_of
from actors.producer import Producer
from cluster.nats_server import EmbeddedNats
from tests.support.events import event, random_batch
from tests.support.waiting import async_wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(tmp_path) as running:
        yield running


async def messages_of(nc: nats.NATS, partition: int) -> list[int]:
    """Events per message on one partition's subject, in stream order."""
    js = nc.jetstream()
    info = await js.stream_info("AUDIENCE_EVENTS")
    sizes = []
    for seq in range(1, info.state.last_seq + 1):
        msg = await js.get_msg("AUDIENCE_EVENTS", seq)
        if msg.subject == events_subject(partition):
            sizes.append(len(decode(msg.data or b"")))
    return sizes


def test_a_full_partition_goes_out_in_max_batch_messages_and_the_rest_on_flush(
    server: EmbeddedNats,
) -> None:
    batch = random_batch(250, 1, prefix="one-user")  # one user: one partition
    partition = partition_of(batch.user_id[0], 8)

    async def run() -> list[int]:
        nc = await nats.connect(server.url)
        await ensure_streams(nc.jetstream(), StreamNames())
        producer = await Producer(nc.jetstream(), 8, max_batch=100, linger_ms=0).start()
        await producer.send(batch)
        assert producer.buffered_events == 50
        await producer.flush()
        sizes = await messages_of(nc, partition)
        await nc.close()
        return sizes

    assert asyncio.run(run()) == [100, 100, 50]


def test_lingering_events_go_out_without_a_flush(server: EmbeddedNats) -> None:
    batch = random_batch(10, 1, prefix="straggler")
    partition = partition_of(batch.user_id[0], 8)

    async def run() -> list[int]:
        nc = await nats.connect(server.url)
        await ensure_streams(nc.jetstream(), StreamNames())
        producer = await Producer(nc.jetstream(), 8, max_batch=100, linger_ms=20).start()
        await producer.send(batch)

        async def acknowledged() -> bool:
            return producer.buffered_events == 0 and producer.pending_events == 0

        await async_wait_until(acknowledged, timeout_s=10, every_s=0.01)
        assert producer.published_events == 10
        sizes = await messages_of(nc, partition)
        await producer.close()
        await nc.close()
        return sizes

    assert asyncio.run(run()) == [10]


def test_close_returns_while_the_linger_timer_is_publishing(server: EmbeddedNats) -> None:
    async def run() -> int:
        nc = await nats.connect(server.url)
        await ensure_streams(nc.jetstream(), StreamNames())
        sent = 0
        for trial in range(5):
            producer = await Producer(nc.jetstream(), 64, max_batch=1000, linger_ms=5).start()
            for step in range(20):
                await producer.send(random_batch(1000, 500, seed=trial * 100 + step))
                await asyncio.sleep(0.01)
            await asyncio.wait_for(producer.close(), timeout=30)
            sent += producer.published_events
        await nc.close()
        return sent

    assert asyncio.run(run()) == 5 * 20 * 1000


def test_a_batch_over_the_servers_max_payload_goes_out_split_with_every_event(
    server: EmbeddedNats,
) -> None:
    big: dict[str, str | int | float | bool | None] = {f"k{i}": "x" * 500 for i in range(16)}
    # 300 events of ~8 KB each (allowed traits): ~2.4 MB for one partition
    batch = random_batch(300, 1, prefix="heavy")
    batch.traits = [big] * len(batch)
    partition = partition_of(batch.user_id[0], 8)

    async def run() -> tuple[list[int], int]:
        nc = await nats.connect(server.url)
        await ensure_streams(nc.jetstream(), StreamNames())
        producer = await Producer(nc.jetstream(), 8, max_batch=1000, linger_ms=0).start()
        await producer.send(batch)
        await producer.close()
        sizes = await messages_of(nc, partition)
        await nc.close()
        return sizes, nc.max_payload

    sizes, max_payload = asyncio.run(run())
    assert sum(sizes) == 300
    assert len(sizes) >= 3  # 2.4 MB cannot go in fewer 1 MiB messages
    assert max_payload == 1024 * 1024


def test_dead_letters_are_held_and_acknowledged_like_events(server: EmbeddedNats) -> None:
    async def run() -> tuple[int, int, int]:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await ensure_streams(js, StreamNames())
        producer = await Producer(js, 8, linger_ms=0).start()
        raw = orjson.dumps([event("dl-ok"), event("dl-bad", type="teleport")])
        checked = await producer.send_json(raw)
        await producer.close()
        dlq = await js.stream_info("AUDIENCE_DLQ")
        await nc.close()
        return len(checked.rejected), producer.dead_lettered, dlq.state.messages

    assert asyncio.run(run()) == (1, 1, 1)
