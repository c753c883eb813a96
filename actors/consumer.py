"""Pull the subjects of a shard's partitions into one bounded buffer.

One ephemeral, ack-less pull consumer per partition, started at a stream
position the shard chooses (positions are the shard's to keep, like Kafka
offsets in Flink). Pull requests go out as raw ``CONSUMER.MSG.NEXT`` requests
on one wildcard inbox, which costs a fraction of nats.py's ``fetch()`` per
message. A partition asks for more only while the shared buffer has room, so a
shard pulls at the pace it applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from actors.delivery import Delivery
from actors.partitioning import events_subject


class StreamReader:
    """Reads a set of partitions from their positions onwards into one buffer."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        stream: str,
        start_after: dict[int, int],
        *,
        pull_batch: int = 128,
        max_buffered: int = 1024,
        expires_s: float = 5.0,
    ) -> None:
        """Args:
        start_after: partition -> last stream sequence already applied (0: none).
        pull_batch: messages asked for per pull request.
        max_buffered: messages held before the reader stops asking for more.
        expires_s: lifetime of one pull request on the server.
        """
        self._nc = nc
        self._js = js
        self.stream = stream
        self.start_after = dict(start_after)
        self.pull_batch = pull_batch
        self.max_buffered = max_buffered
        self.expires_s = expires_s
        self._consumers: dict[int, str] = {}
        self._outstanding: dict[int, int] = {}
        self._requested_at: dict[int, float] = {}
        self.pending: dict[int, int] = {}
        self._buffer: list[Delivery] = []
        self._ready = asyncio.Event()
        self._inbox = ""
        self._sub: Subscription | None = None
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def partitions(self) -> list[int]:
        """The partitions this reader reads."""
        return sorted(self.start_after)

    async def start(self) -> None:
        """Create the consumers and send the first pull requests."""
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_message)
        for partition in self.partitions:
            await self._create_consumer(partition)
            await self._request(partition)
        self._watchdog = asyncio.create_task(self._watch())

    async def _create_consumer(self, partition: int) -> None:
        after = self.start_after[partition]
        config = ConsumerConfig(
            filter_subject=events_subject(partition),
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if after else DeliverPolicy.ALL,
            opt_start_seq=after + 1 if after else None,
            inactive_threshold=max(30.0, self.expires_s * 4),
            max_waiting=64,
        )
        info = await self._js.add_consumer(self.stream, config)
        self._consumers[partition] = info.name
        self._outstanding[partition] = 0

    async def _request(self, partition: int) -> None:
        """Ask the partition's consumer for another batch, if there is room for it."""
        if len(self._buffer) >= self.max_buffered or self._sub is None:
            return
        name = self._consumers[partition]
        body = orjson.dumps({"batch": self.pull_batch, "expires": int(self.expires_s * 1e9)})
        await self._nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{name}",
            body,
            reply=f"{self._inbox}.{partition}",
        )
        self._outstanding[partition] += self.pull_batch
        self._requested_at[partition] = time.monotonic()

    async def _on_message(self, msg: Msg) -> None:
        partition = int(msg.subject.rsplit(".", 1)[1])
        if partition not in self._consumers:
            return
        status = msg.headers.get("Status") if msg.headers else None
        if status is not None:
            # 408 request expired, 404 nothing to deliver, 409 request refused:
            # the request is over either way; what it did not deliver is free again.
            if status != "100":
                unfilled = int(msg.headers.get("Nats-Pending-Messages", 0) if msg.headers else 0)
                left = self._outstanding[partition] - (unfilled or self.pull_batch)
                self._outstanding[partition] = max(0, left)
        else:
            # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
            tokens = msg.reply.split(".")
            self._buffer.append(
                Delivery(partition, int(tokens[-4]), int(tokens[-2]), int(tokens[-1]), msg.data)
            )
            self.pending[partition] = int(tokens[-1])
            self._outstanding[partition] -= 1
            self._ready.set()
        if self._outstanding[partition] <= self.pull_batch // 2:
            await self._request(partition)

    async def take(self, max_messages: int, timeout_s: float) -> list[Delivery]:
        """Up to ``max_messages`` deliveries in arrival order; waits up to ``timeout_s``."""
        if not self._buffer:
            self._ready.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout_s)
        taken, self._buffer = self._buffer[:max_messages], self._buffer[max_messages:]
        if len(self._buffer) < self.max_buffered // 2:
            for partition in self.partitions:
                if self._outstanding.get(partition, 0) <= self.pull_batch // 2:
                    await self._request(partition)
        return taken

    async def _watch(self) -> None:
        """Re-ask partitions whose requests vanished (e.g. across a reconnect)."""
        while True:
            await asyncio.sleep(self.expires_s)
            stale = time.monotonic() - self.expires_s * 2
            for partition in self.partitions:
                if self._requested_at.get(partition, 0) < stale:
                    self._outstanding[partition] = 0
                    await self._request(partition)

    @property
    def buffered(self) -> int:
        """Messages received but not yet taken."""
        return len(self._buffer)

    async def lag(self) -> dict[int, int]:
        """Messages per partition not yet taken by the shard (server pending + buffered)."""
        lag = {p: 0 for p in self.partitions}
        for delivery in self._buffer:
            lag[delivery.partition] += 1
        for partition, name in self._consumers.items():
            info = await self._js.consumer_info(self.stream, name)
            lag[partition] += int(info.num_pending or 0)
        return lag

    async def stop(self) -> None:
        """Stop asking, unsubscribe and delete the consumers."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for name in self._consumers.values():
            with contextlib.suppress(Exception):
                await self._js.delete_consumer(self.stream, name)
        self._consumers.clear()
