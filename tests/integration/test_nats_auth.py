"""The embedded nats-server with auth: each role does its work and nothing more.

Against a real nats-server: a permission the server refuses shows up as a
``permissions violation`` error on the connection (and as a request that
gets no answer), so each check below both tries and listens.
"""

from __future__ import annotations

import asyncio
import json
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError

from actors.checkpoint_store import ObjectStoreCheckpoints
from actors.consumer import StreamReader
from actors.deadletter import DeadLetters
from actors.jetstream import StreamNames, dead_letter_counts, ensure_streams
from actors.nats_auth import NatsAuthError, NatsCredentials, connect
from actors.partitioning import events_subject
from actors.shard_queries import query_subject
from actors.validation import Rejection, RejectReason
from cluster.nats_server import EmbeddedNats, EmbeddedNatsCluster
from cluster.nats_users import ROLES

pytestmark = pytest.mark.integration

NAMES = StreamNames()
BUCKET = "AUDIENCE_CHECKPOINTS"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """A server with auth on, its streams and snapshot bucket made by the admin."""
    with EmbeddedNats(tmp_path_factory.mktemp("nats-auth"), auth=True) as server:

        async def prepare() -> None:
            nc = await connect(server.url, server.credentials("admin"))
            await ensure_streams(nc.jetstream(), NAMES)
            await ObjectStoreCheckpoints(nc.jetstream(), BUCKET).ensure()
            await nc.close()

        asyncio.run(prepare())
        yield server


class Session:
    """A connection as one role, with the permission errors the server sent it."""

    def __init__(self, nc: Client, denied: list[str]) -> None:
        self.nc = nc
        self.denied = denied

    async def refused(self, subject: str) -> bool:
        """Whether the server reported a permission violation naming ``subject``."""
        await self.nc.flush()
        for _ in range(20):
            if any(subject.lower() in d for d in self.denied):
                return True
            await asyncio.sleep(0.05)
        return False


async def session_at(url: str, credentials: NatsCredentials | None) -> Session:
    denied: list[str] = []

    async def remember(exc: Exception) -> None:
        denied.append(str(exc).lower())

    return Session(await connect(url, credentials, error_cb=remember), denied)


async def session(server: EmbeddedNats, role: str) -> Session:
    return await session_at(server.url, server.credentials(role))


async def admin_publish(server: EmbeddedNats, subject: str, body: bytes) -> int:
    nc = await connect(server.url, server.credentials("admin"))
    ack = await nc.jetstream().publish(subject, body)
    await nc.close()
    return int(ack.seq)


def test_a_producer_publishes_events_but_cannot_read_the_stream_or_publish_elsewhere(
    secured: EmbeddedNats,
) -> None:
    async def body() -> None:
        producer = await session(secured, "producer")
        js = producer.nc.jetstream(timeout=1.0)
        ack = await js.publish(events_subject(3), b"batch")  # its ack comes on its own inbox
        assert ack.stream == NAMES.events

        seen: list[Any] = []

        async def spy(msg: Any) -> None:
            seen.append(msg)

        await producer.nc.subscribe("audience.events.>", cb=spy)
        assert await producer.refused('subscription to "audience.events.>"')
        await producer.nc.subscribe("_INBOX.>", cb=spy)
        assert await producer.refused('subscription to "_inbox.>"')
        await admin_publish(secured, events_subject(3), b"secret")

        await producer.nc.publish("audience.alerts.volume", b"fake alert")
        assert await producer.refused('publish to "audience.alerts.volume"')
        with pytest.raises(NatsTimeoutError):
            await js.add_consumer(NAMES.events)  # cannot follow the stream
        assert await producer.refused(f"$js.api.consumer.create.{NAMES.events.lower()}")
        with pytest.raises(NatsTimeoutError):
            await js.get_msg(NAMES.events, seq=1)  # nor read one message
        with pytest.raises(NatsTimeoutError):
            await js.delete_stream(NAMES.events)
        assert not seen
        await producer.nc.close()

    asyncio.run(body())


def test_a_shard_consumes_its_stream_writes_dead_letters_and_keeps_snapshots(
    secured: EmbeddedNats,
) -> None:
    async def body() -> None:
        seq = await admin_publish(secured, events_subject(5), b"for the shard")
        shard = await session(secured, "shard")
        js = shard.nc.jetstream()
        reader = StreamReader(shard.nc, js, NAMES.events, {5: seq - 1})
        await reader.start()
        taken = await reader.take(10, timeout_s=5.0)
        await reader.stop()
        assert [d.data for d in taken] == [b"for the shard"]

        letters = DeadLetters(js, origin="shard:0")
        rejection = Rejection(0, RejectReason.INVALID_JSON, "not json", b"{", key="t.1")
        assert await letters.publish([rejection]) == 1

        store = ObjectStoreCheckpoints(js, BUCKET)
        blob = bytes(range(256)) * 1000
        await store.save("scope.shard-0.000001", blob)
        assert await store.names("scope.shard-0") == ["scope.shard-0.000001"]
        assert await store.load("scope.shard-0.000001") == blob
        await store.delete("scope.shard-0.000001")
        assert await store.names("scope.shard-0") == []

        await shard.nc.publish(events_subject(5), b"forged")  # shards only read events
        assert await shard.refused(f'publish to "{events_subject(5)}"')
        with pytest.raises(NatsTimeoutError):
            await shard.nc.jetstream(timeout=1.0).delete_stream(NAMES.events)
        assert not [d for d in shard.denied if "$o." in d or "consumer" in d or "$js.fc" in d]
        await shard.nc.close()

    asyncio.run(body())


def test_the_api_ingests_and_reads_what_it_serves_but_cannot_follow_or_delete_streams(
    secured: EmbeddedNats,
) -> None:
    async def body() -> None:
        api = await session(secured, "api")
        js = api.nc.jetstream()
        await js.publish(events_subject(1), b"ingested")
        await api.nc.publish("audience.alerts.volume", b"{}")
        counts = await dead_letter_counts(js, NAMES)
        assert isinstance(counts, dict)
        info = await js.stream_info(NAMES.events)
        assert info.state.messages >= 1
        assert not api.denied

        denied = api.nc.jetstream(timeout=1.0)
        with pytest.raises(NatsTimeoutError):
            await denied.add_consumer(NAMES.events)
        with pytest.raises(NatsTimeoutError):
            await denied.delete_stream(NAMES.dlq)
        with pytest.raises(NatsTimeoutError):
            await denied.object_store(BUCKET)  # snapshots are the shards' business
        await api.nc.close()

    asyncio.run(body())


def test_shards_answer_the_apis_reads_and_a_producer_can_neither_ask_nor_listen(
    secured: EmbeddedNats,
) -> None:
    subject = query_subject("AUDIENCE_EVENTS.audience", 0)

    async def body() -> None:
        shard = await session(secured, "shard")

        async def echo(msg: Any) -> None:
            await msg.respond(b"answer to " + msg.data)  # a reply to the api's own inbox

        await shard.nc.subscribe(subject, cb=echo)
        await shard.nc.flush()
        api = await session(secured, "api")
        reply = await api.nc.request(subject, b"rows?", timeout=5)
        assert reply.data == b"answer to rows?"
        assert not shard.denied and not api.denied

        producer = await session(secured, "producer")
        with pytest.raises(NatsTimeoutError):  # refused: nothing reaches the shard
            await producer.nc.request(subject, b"rows?", timeout=1)
        assert await producer.refused(f'publish to "{subject.lower()}"')
        await producer.nc.subscribe("audience.query.>", cb=echo)
        assert await producer.refused('subscription to "audience.query.>"')
        await shard.nc.publish("_INBOX.api.anything", b"unasked")  # only replies are allowed
        assert await shard.refused('publish to "_inbox.api.anything"')
        for s in (shard, api, producer):
            await s.nc.close()

    asyncio.run(body())


def test_a_wrong_password_fails_at_once_with_a_clear_message(secured: EmbeddedNats) -> None:
    wrong = NatsCredentials(user="producer", password="not-the-password")

    async def body() -> None:
        await asyncio.wait_for(connect(secured.url, wrong), timeout=10)

    with pytest.raises(NatsAuthError) as caught:
        asyncio.run(body())
    message = str(caught.value)
    assert "refused the credentials (user 'producer')" in message
    assert "authorization violation" in message
    assert "not-the-password" not in message and "\n" not in message


def test_no_credentials_at_all_are_refused_too(secured: EmbeddedNats) -> None:
    with pytest.raises(NatsAuthError, match="no credentials"):
        asyncio.run(connect(secured.url))


def test_credentials_are_owner_only_and_reused_by_the_next_start(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats", auth=True).start()
    try:
        first = {role: server.credentials(role) for role in ROLES}
    finally:
        server.stop()
    auth = tmp_path / "nats" / "auth"
    assert stat.S_IMODE(auth.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "nats").stat().st_mode) == 0o700
    for path in auth.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    (auth / "producer.json").chmod(0o644)

    with EmbeddedNats(tmp_path / "nats", auth=True) as again:
        assert {role: again.credentials(role) for role in ROLES} == first
        assert stat.S_IMODE((auth / "producer.json").stat().st_mode) == 0o600

        async def admin_still_works() -> None:
            nc = await connect(again.url, again.credentials("admin"))
            await nc.close()

        asyncio.run(admin_still_works())


def test_credentials_never_show_their_secrets(secured: EmbeddedNats) -> None:
    creds = secured.credentials("api")
    assert creds is not None and creds.password
    assert creds.password not in repr(creds) and creds.password not in str(creds)


def route_answer(host: str, port: int, login: dict[str, str]) -> str:
    """What a route port answers a process that connects to it as a route with ``login``
    (naming the right cluster, so only the login can be what is refused)."""
    with socket.create_connection((host, port), timeout=5) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"INFO ")
        connect = {"verbose": False, "pedantic": False, "name": "intruder", **login}
        connect["cluster"] = "audience"
        sock.sendall(f"CONNECT {json.dumps(connect)}\r\nPING\r\n".encode())
        return reader.readline().decode().strip()


def test_a_cluster_with_auth_takes_the_same_users_on_every_node(tmp_path: Path) -> None:
    cluster = EmbeddedNatsCluster(tmp_path / "cluster", auth=True)
    try:
        cluster.start()
        # Routes need a login too, kept in each node's own config file, not on its command line.
        for node in cluster.nodes:
            assert node.process is not None
            command = str(node.process.args)  # what `ps` shows
            assert "nats-route" not in command and "--routes" not in command
            assert stat.S_IMODE(node.config_path.stat().st_mode) == 0o600
            route = json.loads(node.config_path.read_text())["cluster"]
            password = route["authorization"]["password"]
            assert password and password not in command
            assert all(f"route:{password}@" in url for url in route["routes"])
        for login in ({}, {"user": "route", "pass": "guess"}):
            answer = route_answer(cluster.host, cluster.route_ports[0], login)
            assert answer == "-ERR 'Authorization Violation'", answer

        async def body() -> None:
            admin = await connect(cluster.url, cluster.credentials("admin"))
            await ensure_streams(admin.jetstream(), NAMES, replicas=3)
            await admin.close()
            for url in cluster.urls:  # each node knows the producer, and only as a producer
                producer = await session_at(url, cluster.credentials("producer"))
                ack = await producer.nc.jetstream().publish(events_subject(0), b"x")
                assert ack.stream == NAMES.events
                await producer.nc.publish("audience.alerts.volume", b"{}")
                assert await producer.refused('publish to "audience.alerts.volume"')
                await producer.nc.close()

        asyncio.run(body())
    finally:
        cluster.stop()
