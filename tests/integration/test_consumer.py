"""The stream reader delivers every message of its partitions once, in order, under pressure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import nats
import pytest

from actors.consumer import StreamReader
from actors.delivery import Delivery
from actors.jetstream import StreamNames, ensure_streams
from actors.partitioning import events_subject
from cluster.nats_server import EmbeddedNats

pytestmark = pytest.mark.integration


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A server per test: each test makes its own stream over the same subjects."""
    with EmbeddedNats(tmp_path) as server:
        yield server


async def with_stream(
    server: EmbeddedNats, name: str, body: Callable[[nats.NATS], Awaitable[None]]
) -> None:
    nc = await nats.connect(server.url)
    try:
        await ensure_streams(nc.jetstream(), StreamNames(events=name, dlq=f"{name}_DLQ"))
        await body(nc)
    finally:
        await nc.close()


async def publish(nc: nats.NATS, partitions: int, per_partition: int, size: int) -> None:
    js = nc.jetstream()
    futures = []
    for i in range(per_partition):
        for p in range(partitions):
            payload = f"{p}:{i}:".encode().ljust(size, b".")
            futures.append(await js.publish_async(events_subject(p), payload))
    await asyncio.gather(*futures)


def assert_complete(taken: list[Delivery], partitions: int, per_partition: int) -> None:
    for p in range(partitions):
        bodies = [d.data.split(b":")[1] for d in taken if d.partition == p]
        assert bodies == [str(i).encode() for i in range(per_partition)], f"partition {p}"
        seqs = [d.seq for d in taken if d.partition == p]
        assert seqs == sorted(set(seqs))


def test_a_backlog_beyond_the_servers_connection_buffer_arrives_whole_to_a_slow_reader(
    nats_server: EmbeddedNats,
) -> None:
    partitions, per_partition, size = 8, 40, 300_000  # 96 MB, over the 64 MiB server buffer

    async def body(nc: nats.NATS) -> None:
        await publish(nc, partitions, per_partition, size)
        reader_nc = await nats.connect(nats_server.url)
        reader = StreamReader(
            reader_nc, reader_nc.jetstream(), "BACKLOG", {p: 0 for p in range(partitions)}
        )
        await reader.start()
        taken: list[Delivery] = []
        deadline = time.monotonic() + 120
        while len(taken) < partitions * per_partition and time.monotonic() < deadline:
            taken += await reader.take(8, timeout_s=1.0)
            time.sleep(0.05)  # a busy apply blocks the event loop, as a real shard does
        await reader.stop()
        await reader_nc.close()
        assert reader.gaps == 0
        assert_complete(taken, partitions, per_partition)

    asyncio.run(with_stream(nats_server, "BACKLOG", body))


def test_a_resync_after_a_reconnect_neither_loses_nor_repeats_messages(
    nats_server: EmbeddedNats,
) -> None:
    partitions, per_partition = 4, 200

    async def body(nc: nats.NATS) -> None:
        await publish(nc, partitions, per_partition // 2, 100)
        reader = StreamReader(nc, nc.jetstream(), "RESYNC", {p: 0 for p in range(partitions)})
        await reader.start()
        taken = await reader.take(50, timeout_s=5.0)
        reader.connection_restored()
        await publish_rest(nc)
        deadline = time.monotonic() + 60
        while len(taken) < partitions * per_partition and time.monotonic() < deadline:
            taken += await reader.take(100, timeout_s=1.0)
        await reader.stop()
        assert reader.resyncs == 1
        assert_complete(taken, partitions, per_partition)

    async def publish_rest(nc: nats.NATS) -> None:
        js = nc.jetstream()
        for i in range(per_partition // 2, per_partition):
            for p in range(partitions):
                await js.publish(events_subject(p), f"{p}:{i}:".encode())

    asyncio.run(with_stream(nats_server, "RESYNC", body))


def test_a_reader_starts_after_the_position_it_is_given(nats_server: EmbeddedNats) -> None:
    async def body(nc: nats.NATS) -> None:
        await publish(nc, 1, 10, 10)
        info = await nc.jetstream().stream_info("FROMPOS")
        reader = StreamReader(nc, nc.jetstream(), "FROMPOS", {0: info.state.last_seq - 3})
        await reader.start()
        taken: list[Delivery] = []
        while len(taken) < 3:
            taken += await reader.take(10, timeout_s=5.0)
        await reader.stop()
        assert [d.data.split(b":")[1] for d in taken] == [b"7", b"8", b"9"]

    asyncio.run(with_stream(nats_server, "FROMPOS", body))


def test_a_consumer_deleted_on_the_server_is_recreated_and_nothing_is_lost(
    nats_server: EmbeddedNats,
) -> None:
    partitions, per_partition = 2, 100

    async def body(nc: nats.NATS) -> None:
        js = nc.jetstream()
        await publish(nc, partitions, per_partition // 2, 50)
        reader = StreamReader(nc, js, "DELETED", {p: 0 for p in range(partitions)})
        await reader.start()
        taken: list[Delivery] = []
        while len(taken) < partitions * per_partition // 2:
            taken += await reader.take(100, timeout_s=5.0)
        for info in await js.consumers_info("DELETED"):
            await js.delete_consumer("DELETED", info.name)
        for i in range(per_partition // 2, per_partition):
            for p in range(partitions):
                await js.publish(events_subject(p), f"{p}:{i}:".encode())
        deadline = time.monotonic() + 60
        while len(taken) < partitions * per_partition and time.monotonic() < deadline:
            taken += await reader.take(100, timeout_s=1.0)
        await reader.stop()
        assert_complete(taken, partitions, per_partition)

    asyncio.run(with_stream(nats_server, "DELETED", body))
