"""Pull the subjects of a shard's partitions into one bounded buffer, losing nothing.

One ephemeral, ack-less pull consumer per partition, started at a stream
position the shard chooses (positions are the shard's to keep, like Kafka
offsets in Flink). Pull requests go out as raw ``CONSUMER.MSG.NEXT`` requests
on one wildcard inbox, which costs a fraction of nats.py's ``fetch()`` per
message.

Ack-less delivery is fast but unforgiving: a message the server sent into a
connection that then dropped is gone from that consumer. So the reader

* bounds what it asks for in bytes (one open request per partition, each with
  ``max_bytes``, raised to the largest possible message only for a request that
  met a bigger one), keeping the server's per-connection buffer (64 MiB by
  default) far from its limit while the shard is busy applying;
* checks every delivery's consumer sequence, and on a gap, or after a reconnect,
  re-creates the partition's consumer from the last stream sequence it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import numpy as np
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from actors.delivery import Delivery
from actors.partitioning import events_subject, partition_of_subject

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1024 * 1024  # NATS' default max_payload: one request must fit one message
RETRY_PAUSE_S = 0.5
DELETE_TIMEOUT_S = 1.0  # deleting a replaced consumer is tidying, not worth a stall


class _Partition:
    """Where one partition's consumer stands."""

    def __init__(self, partition: int, after: int) -> None:
        self.partition = partition
        self.after = after  # last stream sequence received into the buffer
        self.consumer = ""
        self.generation = 0  # bumps with each consumer, so stale replies are told apart
        self.consumer_seq = 0  # last consumer sequence received from this consumer
        self.open_request = False
        self.big_request = False  # the next request must fit a message over request_bytes
        self.received = 0  # messages received for the open request
        self.requested_at = 0.0
        self.pending = 0
        self.recreating = False  # a re-creation is under way (it awaits the server)
        self.again = False  # re-creation was asked for while one was under way


class StreamReader:
    """Reads a set of partitions from their positions onwards into one buffer."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        stream: str,
        start_after: dict[int, int],
        *,
        pull_batch: int = 64,
        request_bytes: int = 256 * 1024,
        max_buffered_bytes: int = 32 * 1024 * 1024,
        expires_s: float = 5.0,
    ) -> None:
        """Args:
        start_after: partition -> last stream sequence already applied (0: none).
        pull_batch: most messages asked for per pull request.
        request_bytes: most bytes per pull request, normally.
        max_buffered_bytes: received but untaken bytes at which asking stops.
        expires_s: lifetime of one pull request on the server.
        """
        self._nc = nc
        self._js = js
        self.stream = stream
        self.pull_batch = pull_batch
        self.request_bytes = request_bytes
        self.max_buffered_bytes = max_buffered_bytes
        self.expires_s = expires_s
        self._parts = {p: _Partition(p, after) for p, after in start_after.items()}
        self._buffer: list[Delivery] = []
        self._buffered_bytes = 0
        self._ready = asyncio.Event()
        self._enough = asyncio.Event()  # buffered bytes reached what gather() waits for
        self._enough_bytes = 0
        self._inbox = ""
        self._sub: Subscription | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._resync_needed = asyncio.Event()
        self.gaps = 0
        self.resyncs = 0
        self.recreate_failures = 0

    @property
    def partitions(self) -> list[int]:
        """The partitions this reader reads."""
        return sorted(self._parts)

    async def start(self) -> None:
        """Create the consumers and send the first pull requests."""
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(
            f"{self._inbox}.*.*",
            cb=self._on_message,
            pending_bytes_limit=4 * self.max_buffered_bytes,
        )
        for part in list(self._parts.values()):
            await self._recreate(part)
        self._watchdog = asyncio.create_task(self._watch())

    async def add(self, partition: int, after: int) -> None:
        """Start reading ``partition`` after stream sequence ``after`` (a partition handed over).

        If its consumer cannot be created now, the watchdog tries again.
        """
        part = _Partition(partition, after)
        self._parts[partition] = part
        if self._sub is not None:
            await self._try_recreate(part)

    async def remove(self, partition: int) -> None:
        """Stop reading ``partition``: drop what the buffer holds of it, delete its consumer."""
        part = self._parts.pop(partition, None)
        if part is None:
            return
        kept = [d for d in self._buffer if d.partition != partition]
        self._buffered_bytes -= sum(len(d.data) for d in self._buffer if d.partition == partition)
        self._buffer = kept
        if part.consumer:
            with contextlib.suppress(Exception):  # an ephemeral left behind ends by itself
                await self._nc.request(
                    f"$JS.API.CONSUMER.DELETE.{self.stream}.{part.consumer}",
                    b"",
                    timeout=DELETE_TIMEOUT_S,
                )
        part.consumer = ""

    def connection_restored(self) -> None:
        """Tell the reader its connection came back: what was in flight may be lost."""
        self._resync_needed.set()

    async def _recreate(self, part: _Partition) -> None:
        """A fresh consumer for ``part`` starting right after what the buffer holds.

        If the server refuses (it may still be recovering after a restart), the
        partition is left without a consumer and the watchdog tries again.
        """
        if part.recreating:  # asked again meanwhile (a reconnect): once more after it
            part.again = True
            return
        part.recreating = True
        try:
            while True:
                part.again = False
                await self._create(part)
                if not part.again:
                    break
        finally:
            part.recreating = False

    async def _create(self, part: _Partition) -> None:
        # Retire the old consumer before any await: its replies (such as the
        # "consumer deleted" status the delete below provokes) are stale from
        # here on, and must not start a second, concurrent re-creation.
        old, part.consumer = part.consumer, ""
        part.generation += 1
        part.open_request = False
        if old:
            with contextlib.suppress(Exception):
                # Bounded: the old consumer's server may be gone (a cluster node
                # died); an ephemeral left behind ends by its inactive_threshold.
                await self._nc.request(
                    f"$JS.API.CONSUMER.DELETE.{self.stream}.{old}", b"", timeout=DELETE_TIMEOUT_S
                )
        config = ConsumerConfig(
            filter_subject=events_subject(part.partition),
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if part.after else DeliverPolicy.ALL,
            opt_start_seq=part.after + 1 if part.after else None,
            inactive_threshold=max(30.0, self.expires_s * 4),
            max_waiting=16,
        )
        info = await self._js.add_consumer(self.stream, config)
        part.consumer = info.name
        part.consumer_seq = 0
        await self._request(part)

    async def _request(self, part: _Partition) -> None:
        """Open the partition's one pull request, if none is open and there is room."""
        if part.open_request or self._sub is None or not part.consumer:
            return
        if self._buffered_bytes >= self.max_buffered_bytes:
            return
        max_bytes = MAX_MESSAGE_BYTES * 2 if part.big_request else self.request_bytes
        body = orjson.dumps(
            {"batch": self.pull_batch, "max_bytes": max_bytes, "expires": int(self.expires_s * 1e9)}
        )
        part.open_request = True
        part.received = 0
        part.requested_at = time.monotonic()
        await self._nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{part.consumer}",
            body,
            reply=f"{self._inbox}.{part.partition}.{part.generation}",
        )

    async def _on_message(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is not None:
            # Status replies come on the request's inbox: <inbox>.<partition>.<generation>.
            _, partition, generation = msg.subject.rsplit(".", 2)
            part = self._parts.get(int(partition))
            if part is None or int(generation) != part.generation:
                return  # the answer to a request of a consumer since replaced
            if status != "100":  # 404/408/409/503: this request is over
                await self._request_ended(part, status, headers.get("Description", ""))
            return
        # Messages keep their stream subject; the reply names the consumer:
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        part = self._parts.get(partition_of_subject(msg.subject))
        tokens = msg.reply.split(".")
        if part is None or tokens[-6] != part.consumer:
            return  # sent by a consumer since replaced
        stream_seq, consumer_seq = int(tokens[-4]), int(tokens[-3])
        if consumer_seq != part.consumer_seq + 1:
            self.gaps += 1
            log.warning(
                "partition %s: consumer sequence jumped %s -> %s; re-reading from %s",
                part.partition,
                part.consumer_seq,
                consumer_seq,
                part.after + 1,
            )
            await self._recreate(part)
            return
        part.consumer_seq = consumer_seq
        part.after = stream_seq
        part.pending = int(tokens[-1])
        self._buffer.append(
            Delivery(part.partition, stream_seq, int(tokens[-2]), part.pending, msg.data)
        )
        self._buffered_bytes += len(msg.data)
        self._ready.set()
        if self._buffered_bytes >= self._enough_bytes:
            self._enough.set()
        part.received += 1
        if part.received >= self.pull_batch:  # a full batch arrived: the request is done
            part.open_request = False
            await self._request(part)

    async def _request_ended(self, part: _Partition, status: str, description: str) -> None:
        """Follow up an ended pull request according to why it ended."""
        part.open_request = False
        part.big_request = status == "409" and "MaxBytes" in description
        if status == "408" or part.big_request:  # expired, or the next message is big
            await self._request(part)
        elif status == "409" and "Deleted" in description:  # e.g. idle past its threshold
            log.warning("partition %s: consumer deleted; re-creating", part.partition)
            await self._recreate(part)
        elif status == "503":  # no responders: the consumer's server is gone (cluster node lost)
            log.warning("partition %s: consumer unreachable; re-creating", part.partition)
            await self._try_recreate(part)
        else:  # no responders, refused: ask again after a pause, not in a tight loop
            loop = asyncio.get_running_loop()
            loop.call_later(RETRY_PAUSE_S, lambda: loop.create_task(self._request(part)))

    async def take(
        self, max_messages: int, timeout_s: float, max_bytes: int | None = None
    ) -> list[Delivery]:
        """Up to ``max_messages`` deliveries in arrival order; waits up to ``timeout_s``.

        With ``max_bytes``, deliveries stop once they hold that many bytes (at
        least one is taken).
        """
        if not self._buffer:
            self._ready.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout_s)
        count = min(max_messages, len(self._buffer))
        if max_bytes is not None and count:
            sizes = np.cumsum([len(d.data) for d in self._buffer[:count]])
            count = max(1, int(np.searchsorted(sizes, max_bytes, side="right")))
        taken, self._buffer = self._buffer[:count], self._buffer[count:]
        self._buffered_bytes -= sum(len(d.data) for d in taken)
        if self._buffered_bytes < self.max_buffered_bytes // 2:
            for part in list(self._parts.values()):
                await self._request(part)
        return taken

    async def _watch(self) -> None:
        """Re-sync after reconnects; re-create consumers that failed to come back; re-ask
        partitions whose request went quiet. Survives any one failure (it is the repair)."""
        while True:
            # Sooner while a partition has no consumer (its re-creation failed).
            orphaned = any(not p.consumer and not p.recreating for p in self._parts.values())
            wait_s = min(self.expires_s, 1.0) if orphaned else self.expires_s
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._resync_needed.wait(), wait_s)
            if self._resync_needed.is_set():
                self._resync_needed.clear()
                self.resyncs += 1
                # The buffer holds each partition contiguously up to part.after:
                # new consumers go on from there.
                for part in list(self._parts.values()):
                    await self._try_recreate(part)
                continue
            stale = time.monotonic() - self.expires_s * 2
            for part in list(self._parts.values()):
                if not part.consumer and not part.recreating:
                    await self._try_recreate(part)
                elif part.open_request and part.requested_at < stale:
                    part.open_request = False
                    with contextlib.suppress(Exception):  # the next round asks again
                        await self._request(part)

    async def _try_recreate(self, part: _Partition) -> None:
        try:
            await self._recreate(part)
        except Exception as exc:  # left without a consumer: the next round tries again
            self.recreate_failures += 1
            log.warning("partition %s: cannot re-create its consumer yet: %r", part.partition, exc)

    def pending_by_partition(self) -> dict[int, int]:
        """Messages each partition still had on the server at its latest delivery (cheap)."""
        return {p: part.pending for p, part in self._parts.items()}

    async def gather(self, min_bytes: int, timeout_s: float) -> None:
        """Wait until ``min_bytes`` are buffered, at most ``timeout_s`` (a step worth taking)."""
        if self._buffered_bytes >= min_bytes or timeout_s <= 0:
            return
        self._enough_bytes = min_bytes
        self._enough.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._enough.wait(), timeout_s)

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet taken."""
        return self._buffered_bytes

    @property
    def buffered(self) -> int:
        """Messages received but not yet taken."""
        return len(self._buffer)

    async def lag(self) -> dict[int, int]:
        """Messages per partition not yet taken by the shard (server pending + buffered)."""
        lag = {p: 0 for p in self.partitions}
        for delivery in self._buffer:
            lag[delivery.partition] += 1
        for part in list(self._parts.values()):
            with contextlib.suppress(Exception):
                info = await self._js.consumer_info(self.stream, part.consumer)
                lag[part.partition] += int(info.num_pending or 0)
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
        for part in list(self._parts.values()):
            with contextlib.suppress(Exception):
                await self._js.delete_consumer(self.stream, part.consumer)
            part.consumer = ""
