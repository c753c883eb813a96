"""NATS faults: a nats-server restart or outage loses nothing and doubles nothing.

Producers hold what is not acknowledged and resend it with the same message id
(the stream drops copies it has); a full producer refuses work instead of
growing; the HTTP ingest says 429 or 503 with Retry-After; shard consumers pick
up where they were. Every test runs its own nats-server in a temp folder (the
session platform's server is shared and never stopped).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from fastapi import FastAPI, Request, Response
from nats.js import JetStreamContext

from actors.batch import EventBatch
from actors.codec import decode
from actors.consumer import StreamReader
from actors.delivery import Delivery
from actors.errors import BackpressureError
from actors.events import EVENT_TYPES
from actors.jetstream import MSG_ID_HEADER, StreamNames, ensure_streams
from actors.partitioning import events_subject, partition_of
from actors.pool import PoolSpec, ShardPool
from actors.producer import Producer
from cluster.nats_server import EmbeddedNats
from serving.app import ApiGateway, GatewayConfig
from serving.errors import install_error_handlers
from tests.support.events import event, random_batch
from tests.support.truth import truth_of
from tests.support.waiting import async_wait_until, wait_until

pytestmark = pytest.mark.integration

STREAM = "AUDIENCE_EVENTS"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """This test's own nats-server, which it may stop, crash, pause and restart."""
    running = EmbeddedNats(tmp_path / "nats").start()
    try:
        yield running
    finally:
        running.stop()


async def connect(url: str) -> nats.NATS:
    """A connection that reconnects for ever, quickly, without logging each attempt."""

    async def quiet(exc: Exception) -> None:
        pass

    return await nats.connect(
        url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=1, error_cb=quiet
    )


async def stored(url: str) -> tuple[Counter[str], list[str]]:
    """Event ids in the event stream (with multiplicity) and the message id of each message."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        events: Counter[str] = Counter()
        msg_ids = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(STREAM, seq)
            events.update(decode(msg.data or b"").event_id)
            msg_ids.append((msg.headers or {})[MSG_ID_HEADER])
        return events, msg_ids
    finally:
        await nc.close()


async def until(condition: Callable[[], bool], timeout_s: float) -> None:
    """Wait (without blocking the loop) until ``condition()`` holds."""

    async def check() -> bool:
        return condition()

    await async_wait_until(check, timeout_s=timeout_s, every_s=0.05)


@pytest.mark.parametrize("crash", [False, True], ids=["clean-restart", "crash"])
def test_a_producer_publishing_through_a_server_restart_stores_every_event_exactly_once(
    server: EmbeddedNats, crash: bool
) -> None:
    sent: list[str] = []

    async def run() -> Producer:
        nc = await connect(server.url)
        await ensure_streams(nc.jetstream(), StreamNames())
        producer = await Producer(
            nc.jetstream(), 8, max_batch=200, linger_ms=5, publish_timeout_s=2
        ).start()
        held_in_outage = 0

        async def publish(steps: int) -> None:
            for _ in range(steps):
                batch = random_batch(100, 50, seed=len(sent), prefix="restart")
                await producer.send(batch)
                sent.extend(batch.event_id)
                await asyncio.sleep(0.005)  # a paced producer, not a wait

        await publish(20)
        restart = asyncio.ensure_future(asyncio.to_thread(server.restart, kill=crash))
        while not restart.done():  # keep publishing while the server goes and comes back
            await publish(1)
            held_in_outage = max(held_in_outage, producer.held_messages)
        await restart
        await publish(20)
        await producer.close(timeout_s=60)
        await nc.close()
        assert held_in_outage > 0, "the outage should have made the producer hold messages"
        return producer

    producer = asyncio.run(run())
    events, msg_ids = asyncio.run(stored(server.url))
    assert events == Counter(sent)  # every event, each once
    assert max(events.values()) == 1
    assert len(msg_ids) == len(set(msg_ids)) == producer.published_messages
    assert producer.published_events == len(sent)


class LosesFirstAcks:
    """A JetStream context whose first ``lose`` acks never reach the producer.

    The messages do reach the stream: only the acknowledgement is lost, as when
    a connection drops after the server stored a message and before its ack
    arrived. Everything but ``publish_async`` is delegated.
    """

    def __init__(self, js: JetStreamContext, lose: int) -> None:
        self._js = js
        self.lose = lose
        self.transmitted: list[tuple[str, bytes]] = []  # (msg id, body) of every transmission

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)

    async def publish_async(self, subject: str, payload: bytes, **kwargs: Any) -> Any:
        real = await self._js.publish_async(subject, payload, **kwargs)
        self.transmitted.append((kwargs["headers"][MSG_ID_HEADER], payload))
        if self.lose > 0:
            self.lose -= 1
            return asyncio.get_running_loop().create_future()  # never resolved
        return real


def test_a_message_whose_ack_was_lost_is_resent_unchanged_and_the_stream_keeps_one_copy(
    server: EmbeddedNats,
) -> None:
    batch = random_batch(1000, 40, seed=5, prefix="lost-ack")

    async def run() -> tuple[Producer, LosesFirstAcks]:
        nc = await connect(server.url)
        await ensure_streams(nc.jetstream(), StreamNames())
        lossy = LosesFirstAcks(nc.jetstream(), lose=3)
        producer = Producer(
            lossy,  # type: ignore[arg-type]  # a delegating proxy
            8,
            max_batch=100,
            linger_ms=0,
            publish_timeout_s=0.5,
        )
        await producer.start()
        await producer.send(batch)
        await producer.close(timeout_s=30)
        await nc.close()
        return producer, lossy

    producer, lossy = asyncio.run(run())
    copies: dict[str, set[bytes]] = {}
    for msg_id, body in lossy.transmitted:
        copies.setdefault(msg_id, set()).add(body)
    resent = [msg_id for msg_id, _ in lossy.transmitted[:3]]
    assert all(Counter(i for i, _ in lossy.transmitted)[msg_id] == 2 for msg_id in resent)
    assert all(len(bodies) == 1 for bodies in copies.values())  # same bytes every time
    assert producer.resent_messages == 3
    assert producer.duplicates == 3  # the stream recognised each resend as a copy
    events, msg_ids = asyncio.run(stored(server.url))
    assert events == Counter(batch.event_id)
    assert sorted(msg_ids) == sorted(copies)


def one_user_per_partition(partitions: int) -> list[str]:
    """A user id for each partition, in partition order."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < partitions:
        found.setdefault(partition_of(f"bound-{n}", partitions), f"bound-{n}")
        n += 1
    return [found[p] for p in range(partitions)]


def full_messages(step: int, users: list[str], per_user: int) -> EventBatch:
    """``per_user`` events for each user: one full message per partition, no remainder."""
    batch = random_batch(per_user * len(users), 1, seed=step, prefix="bound")
    batch.user_id = [users[i // per_user] for i in range(len(batch))]
    return batch


def test_a_producer_cut_off_from_nats_fills_its_bound_refuses_more_and_delivers_all_later(
    server: EmbeddedNats,
) -> None:
    users = one_user_per_partition(8)

    async def run() -> None:
        nc = await connect(server.url)
        await ensure_streams(nc.jetstream(), StreamNames())
        server.stop()
        await until(lambda: not nc.is_connected, timeout_s=10)
        producer = await Producer(
            nc.jetstream(), 8, max_batch=50, linger_ms=0, max_pending_bytes=200_000, max_block_s=0
        ).start()
        accepted: list[str] = []
        one_send = 0
        with pytest.raises(BackpressureError) as refused:
            for step in range(10_000):
                batch = full_messages(step, users, 50)
                before = producer.held_bytes
                await producer.send(batch)
                accepted.extend(batch.event_id)
                one_send = max(one_send, producer.held_bytes - before)
                assert producer.held_bytes < producer.max_pending_bytes + one_send
        assert refused.value.retry_after_s >= 1
        assert refused.value.held_bytes == producer.held_bytes >= producer.max_pending_bytes
        assert producer.held_bytes < producer.max_pending_bytes + one_send
        assert producer.buffered_events == 0 and producer.pending_events == len(accepted)

        # Allowed to wait for room, a send blocks until the server is back and acks.
        producer.max_block_s = 60
        last = full_messages(10_001, users, 50)
        blocked = asyncio.ensure_future(producer.send(last))
        await asyncio.to_thread(server.start)
        await asyncio.wait_for(blocked, timeout=60)
        accepted.extend(last.event_id)
        await producer.close(timeout_s=60)
        await nc.close()
        assert producer.held_bytes == 0
        assert producer.published_events == len(accepted)
        events, _ = await stored(server.url)
        assert events == Counter(accepted)

    asyncio.run(run())


class NoShards:
    """Stands in for the shard pool: nobody is known (so a deletion is confirmed at once)."""

    async def profiles(self, user_ids: list[str]) -> list[None]:
        return [None] * len(user_ids)


def gateway_on(url: str) -> tuple[Any, FastAPI]:
    """The API's real ``ingest`` and ``delete_user`` on a plain FastAPI app with its handlers.

    Only Serve and the shard pool are left out: the gateway object is built
    without its constructor (which would look up Ray actors).
    """
    deployment: Any = ApiGateway  # a Serve deployment; its class is func_or_class
    gateway: Any = object.__new__(deployment.func_or_class)
    gateway.config = GatewayConfig(pool=PoolSpec(8, 1, url, STREAM))
    gateway.pool = NoShards()
    gateway._nc = None
    gateway._producer = None
    gateway._lock = asyncio.Lock()
    api = FastAPI()
    install_error_handlers(api)

    async def ingest(request: Request) -> Response:
        return await gateway.ingest(request, None)  # no key check: not what is tested here

    api.post("/v1/events")(ingest)
    api.delete("/v1/users/{user_id}")(gateway.delete_user)
    return gateway, api


async def close_gateway(gateway: Any) -> None:
    if gateway._producer is not None:
        await gateway._producer.close(timeout_s=30)
    if gateway._nc is not None:
        await gateway._nc.close()


def test_ingest_answers_503_with_retry_after_while_nats_is_down_and_202_once_it_is_back(
    server: EmbeddedNats,
) -> None:
    async def run() -> list[str]:
        nc = await connect(server.url)
        await ensure_streams(nc.jetstream(), StreamNames())
        await nc.close()
        accepted: list[str] = []
        server.stop()
        gateway, api = gateway_on(server.url)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api), base_url="http://api", timeout=30
        ) as client:
            never_connected = await client.post("/v1/events", json=[event("down-0")])
            assert never_connected.status_code == 503
            assert never_connected.headers["Retry-After"] == "2"
            assert "nats unavailable" in never_connected.json()["detail"]

            await asyncio.to_thread(server.start)
            ok = [event("up-1"), event("up-2")]
            answer = await client.post("/v1/events", json=ok)
            assert answer.status_code == 202, answer.text
            accepted += [e["event_id"] for e in ok]

            server.stop()
            await until(lambda: not gateway._producer.connected, timeout_s=10)
            lost = await client.post("/v1/events", json=[event("down-3")])
            assert lost.status_code == 503 and lost.headers["Retry-After"] == "2"
            deletion = await client.delete("/v1/users/down-4")
            assert deletion.status_code == 503 and "Retry-After" in deletion.headers

            await asyncio.to_thread(server.start)
            await until(lambda: gateway._producer.connected, timeout_s=30)
            back = [event("back-5")]
            answer = await client.post("/v1/events", json=back)
            assert answer.status_code == 202, answer.text
            accepted += [e["event_id"] for e in back]
            deletion = await client.delete("/v1/users/back-5")
            assert deletion.status_code == 200 and deletion.json()["deleted"]
        await close_gateway(gateway)
        return accepted

    accepted = asyncio.run(run())
    events, _ = asyncio.run(stored(server.url))
    deletions = [e for e in events if e.startswith("delete-")]
    assert len(deletions) == 1
    assert events - Counter(deletions) == Counter(accepted)  # nothing of the 503s got in


def test_ingest_answers_429_with_retry_after_when_the_producer_is_full_of_unacked_messages(
    server: EmbeddedNats,
) -> None:
    async def run() -> list[str]:
        nc = await connect(server.url)
        await ensure_streams(nc.jetstream(), StreamNames())
        await nc.close()
        gateway, api = gateway_on(server.url)
        sent: list[str] = []
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api), base_url="http://api", timeout=30
        ) as client:
            first = [event("full-0")]
            assert (await client.post("/v1/events", json=first)).status_code == 202
            sent += [e["event_id"] for e in first]
            # The same connection, a producer with room for a single unacked message.
            await gateway._producer.close()
            gateway._producer = await Producer(
                gateway._nc.jetstream(),
                8,
                linger_ms=0,
                max_pending_messages=1,
                max_block_s=0,
                publish_timeout_s=1,
            ).start()

            server.pause()  # connected, but nothing is acknowledged: a saturated stream
            try:
                slow = [event("full-1")]
                unacked = await client.post("/v1/events", json=slow)
                # Not acknowledged in time: 503, and the events are kept and resent.
                assert unacked.status_code == 503, (unacked.text, server.pid, server.url)
                assert unacked.headers["Retry-After"] == "1"
                sent += [e["event_id"] for e in slow]
                full = await client.post("/v1/events", json=[event("full-2")])
                assert full.status_code == 429
                assert full.headers["Retry-After"] == "1"
                assert "producer is full" in full.json()["detail"]
                deletion = await client.delete("/v1/users/full-3")
                assert deletion.status_code == 429 and deletion.headers["Retry-After"] == "1"
            finally:
                server.resume()

            producer = gateway._producer
            await until(lambda: producer.held_messages == 0, timeout_s=30)
            after = [event("full-4")]
            assert (await client.post("/v1/events", json=after)).status_code == 202
            sent += [e["event_id"] for e in after]
        await close_gateway(gateway)
        return sent

    sent = asyncio.run(run())
    events, _ = asyncio.run(stored(server.url))
    assert events == Counter(sent)  # the 503's events got in, once; the 429's did not


async def publish(url: str, batch: EventBatch) -> None:
    nc = await connect(url)
    producer = await Producer(nc.jetstream(), 4, max_batch=250).start()
    await producer.send(batch)
    await producer.close(timeout_s=60)
    await nc.close()


async def last_seqs(url: str, partitions: int) -> dict[int, int]:
    """The stream sequence of each partition's newest message."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        return {
            p: int((await js.get_last_msg(STREAM, events_subject(p))).seq or 0)
            for p in range(partitions)
        }
    finally:
        await nc.close()


def caught_up(pool: ShardPool, url: str) -> list[dict[str, Any]] | None:
    """The shards' statuses once every partition is applied up to the stream's end."""
    try:
        last = asyncio.run(last_seqs(url, pool.spec.partitions))
    except Exception:  # the server is still recovering its stream
        return None
    statuses = asyncio.run(pool.status())
    positions = {int(p): s for status in statuses for p, s in status["positions"].items()}
    return statuses if positions == last else None


@pytest.mark.parametrize("crash", [False, True], ids=["clean-restart", "crash"])
def test_shard_consumers_resume_after_a_server_restart_without_losing_or_repeating_events(
    server: EmbeddedNats, ray_local: int, crash: bool
) -> None:
    first = random_batch(20_000, 300, seed=21, prefix="resume-")
    second = random_batch(5_000, 300, seed=22, prefix="resume-")  # same users, new events
    asyncio.run(_ensure_streams(server.url))
    spec = PoolSpec(4, 2, server.url, STREAM, shard_cpus=0.25, name="nats-faults")
    pool = ShardPool.create(spec)
    try:
        asyncio.run(publish(server.url, first))
        server.restart(kill=crash)  # while the shards may still be reading the first batch
        asyncio.run(publish(server.url, second))
        statuses = wait_until(lambda: caught_up(pool, server.url), timeout_s=120, every_s=0.5)
        assert statuses is not None
        assert sum(s["applied_events"] for s in statuses) == len(first) + len(second)
        assert sum(s["duplicates"] for s in statuses) == 0  # no message applied twice
        truth = truth_of(first, second)
        profiles = asyncio.run(pool.profiles(sorted(truth)))
        for profile in profiles:
            assert profile is not None
            expected = truth[profile["user_id"]]
            assert profile["counts"] == {t.value: expected[t.value] for t in EVENT_TYPES}
    finally:
        pool.shutdown()


async def _ensure_streams(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await ensure_streams(nc.jetstream(), StreamNames())
    finally:
        await nc.close()


class RefusesConsumers:
    """A JetStream context that refuses the next ``refuse`` consumer creations, as a
    server still recovering its streams after a restart may."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self.refuse = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)

    async def add_consumer(self, stream: str, config: Any) -> Any:
        if self.refuse > 0:
            self.refuse -= 1
            raise nats.js.errors.ServiceUnavailableError(description="JetStream not ready")
        return await self._js.add_consumer(stream, config)


def test_a_consumer_the_server_would_not_re_create_after_a_reconnect_is_re_created_later(
    server: EmbeddedNats,
) -> None:
    partitions, per_round = 2, 20

    async def run() -> None:
        nc = await connect(server.url)
        js = nc.jetstream()
        await ensure_streams(js, StreamNames())
        flaky = RefusesConsumers(js)
        reader = StreamReader(
            nc,
            flaky,  # type: ignore[arg-type]  # a delegating proxy
            STREAM,
            {p: 0 for p in range(partitions)},
            expires_s=0.5,
        )
        await reader.start()
        taken: list[Delivery] = []
        for round_ in range(2):
            for i in range(round_ * per_round, (round_ + 1) * per_round):
                for p in range(partitions):
                    await js.publish(events_subject(p), f"{p}:{i}:".encode())
            if round_ == 0:
                flaky.refuse = partitions + 1  # the resync fails, and one retry too
                reader.connection_restored()

            async def arrived(n: int = (round_ + 1) * per_round * partitions) -> bool:
                taken.extend(await reader.take(100, timeout_s=0.2))
                return len(taken) >= n

            await async_wait_until(arrived, timeout_s=30, every_s=0.01)
        await reader.stop()
        await nc.close()
        assert reader.recreate_failures == partitions + 1
        for p in range(partitions):
            bodies = [d.data.split(b":")[1] for d in taken if d.partition == p]
            assert bodies == [str(i).encode() for i in range(2 * per_round)], f"partition {p}"

    asyncio.run(run())
