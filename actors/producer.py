"""The producer SDK: validate, batch per partition, publish with a message id, resend until acked.

Events are checked once here; good ones wait in a per-partition buffer until it
holds ``max_batch`` events or its oldest event has waited ``linger_ms``, then
become one message on ``audience.events.<partition>`` with a ``Nats-Msg-Id``
unique to this producer. Rejected events become dead letters the same way.

Every message is held (:class:`~actors.resend.ResendBuffer`) until JetStream
acknowledges it. A failed publish (timeout, no responders, disconnect, API
error) goes out again, with backoff and after a reconnect, as the same bytes
with the same message id, so the stream's duplicate window drops a copy that
had landed. What is held is bounded: past ``max_pending_bytes`` or
``max_pending_messages`` a send waits up to ``max_block_s`` for room, then
raises :class:`~actors.errors.BackpressureError` without accepting anything.

One background task does all the sending; callers never wait on NATS, except
in :meth:`Producer.flush`, which waits (with a timeout) for acknowledgements.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
import uuid
from collections import Counter
from typing import Any

import numpy as np
from nats.aio.client import Client
from nats.errors import BadSubjectError, MaxPayloadError
from nats.js import JetStreamContext
from nats.js.errors import APIError

from actors.batch import EventBatch
from actors.codec import encode
from actors.deadletter import dead_letter
from actors.errors import BackpressureError, PublishRefusedError, UnavailableError
from actors.jetstream import MSG_ID_HEADER
from actors.partitioning import events_subject, partitions_of
from actors.resend import Outgoing, ResendBuffer
from actors.validation import Checked, Rejection, ValidationPolicy, check_batch, parse_events

log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = 1024 * 1024  # NATS' default; the server's own figure wins when known
HEADER_ROOM = 4096  # headers count against max_payload too
IDLE_TICK_S = 0.05  # how often the sender checks timeouts and retries when nothing wakes it
# A partition's batch waits this long for more events: at 100k events/s over 16
# partitions that makes messages of ~300 events, and at 1k events/s of ~3, where
# every message costs the producer, nats-server and the shard a fixed ~0.1 ms.
DEFAULT_LINGER_MS = 50.0


class Producer:
    """Publishes validated events, many per message, partitioned by user; loses none.

    Call :meth:`start` once (it starts the sending task) and :meth:`close` at
    the end (it flushes); both are safe to repeat. The NATS connection should
    reconnect for ever (``max_reconnect_attempts=-1``): the producer holds what
    it could not send and resends it once the connection is back.

    Args:
        js: JetStream context of the connection to publish on.
        partitions: partition count P of the event stream.
        policy: validation limits.
        max_batch: most events per message.
        linger_ms: how long a partition's partial batch may wait for more events
            (0: only full batches go out before :meth:`flush`).
        producer_id: prefix of the message ids; a producer restarted with the
            same id and input re-sends the same ids.
        publish_timeout_s: how long one transmission waits for its ack before it
            is resent, and :meth:`flush`'s default timeout.
        max_pending_bytes: bound on the bytes held until acknowledged.
        max_pending_messages: bound on the messages held until acknowledged.
        max_block_s: how long a send waits for room when the bound is reached
            before it raises :class:`BackpressureError` (0: at once).
        max_in_flight: most transmissions awaiting their ack at a time.
        retry_backoff_s: wait before a first retry; doubles per attempt.
        max_retry_backoff_s: longest wait between retries.
    """

    def __init__(
        self,
        js: JetStreamContext,
        partitions: int,
        *,
        policy: ValidationPolicy | None = None,
        max_batch: int = 1000,
        linger_ms: float = DEFAULT_LINGER_MS,
        producer_id: str | None = None,
        publish_timeout_s: float = 10.0,
        max_pending_bytes: int = 64 * 1024 * 1024,
        max_pending_messages: int = 10_000,
        max_block_s: float = 60.0,
        max_in_flight: int = 1000,
        retry_backoff_s: float = 0.1,
        max_retry_backoff_s: float = 5.0,
    ) -> None:
        self._js = js
        # The connection tells whether sending makes sense now (a proxy of a
        # JetStream context delegates the attribute).
        self._nc: Client | None = getattr(js, "_nc", None)
        self.partitions = partitions
        self.policy = policy or ValidationPolicy()
        self.max_batch = max_batch
        self.linger_s = linger_ms / 1000
        self.producer_id = producer_id or uuid.uuid4().hex[:12]
        self.publish_timeout_s = publish_timeout_s
        self.max_block_s = max_block_s
        self.max_in_flight = max_in_flight
        self._origin = f"producer:{self.producer_id}"
        self._held = ResendBuffer(
            max_pending_bytes,
            max_pending_messages,
            backoff_s=retry_backoff_s,
            max_backoff_s=max_retry_backoff_s,
        )
        self._buffers: dict[int, list[EventBatch]] = {}
        self._buffered: dict[int, int] = {}
        self._since: dict[int, float] = {}
        self._sequence = 0
        self._refused: list[PublishRefusedError] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # something to send
        self._progress = asyncio.Event()  # something acknowledged or given up
        self._was_connected = True
        self._reconnects_seen = self._reconnects()
        self._tick_s = min(self.linger_s / 2, IDLE_TICK_S) if self.linger_s > 0 else IDLE_TICK_S
        self.last_error: BaseException | None = None
        self.published_events = 0  # acknowledged by the stream, each message counted once
        self.published_messages = 0
        self.dead_lettered = 0
        self.resent_messages = 0  # transmissions after the first of a message
        self.duplicates = 0  # acks saying the stream already had the message
        self.rejected: Counter[str] = Counter()

    async def start(self) -> Producer:
        """Start the sending task (it also times lingering partitions)."""
        self._ensure_running()
        return self

    async def send_json(self, raw: bytes) -> Checked:
        """Validate a JSON array of events, queue the good ones, dead-letter the rest.

        Raises:
            BackpressureError: the bound stayed reached for ``max_block_s``.
        """
        return await self.publish_checked(parse_events(raw, self.policy))

    async def send(self, batch: EventBatch) -> Checked:
        """Validate a columnar batch, queue the good rows, dead-letter the rest.

        Raises:
            BackpressureError: the bound stayed reached for ``max_block_s``.
        """
        return await self.publish_checked(check_batch(batch, self.policy))

    async def publish_checked(self, checked: Checked) -> Checked:
        """Queue the accepted part of an already validated input; dead-letter the rest.

        All or nothing: either every event of ``checked`` is held for sending,
        or, past the bound, none is and :class:`BackpressureError` says so. The
        bound is checked on entry, so what is held may exceed it by one input.

        Raises:
            BackpressureError: the bound stayed reached for ``max_block_s``.
        """
        if not checked.rejected and not len(checked.batch):
            return checked
        await self._admit()
        for rejection in checked.rejected:
            self._hold_dead_letter(rejection)
        self.rejected.update(r.reason.value for r in checked.rejected)
        self._enqueue(checked.batch)
        await asyncio.sleep(0)  # let the sending task go, even under a caller that never waits
        return checked

    @property
    def connected(self) -> bool:
        """Whether the NATS connection is up right now (True if it cannot be told)."""
        return self._nc is None or bool(self._nc.is_connected)

    @property
    def buffered_events(self) -> int:
        """Events accepted but not yet put in a message (waiting in a partition's batch)."""
        return sum(self._buffered.values())

    @property
    def pending_events(self) -> int:
        """Events in messages not yet acknowledged by the stream."""
        return self._held.held_events

    @property
    def held_bytes(self) -> int:
        """Bytes of messages not yet acknowledged (bounded by ``max_pending_bytes``)."""
        return self._held.held_bytes

    @property
    def held_messages(self) -> int:
        """Messages not yet acknowledged (bounded by ``max_pending_messages``)."""
        return self._held.held_messages

    @property
    def max_pending_bytes(self) -> int:
        """The bound on held bytes."""
        return self._held.max_bytes

    @property
    def max_pending_messages(self) -> int:
        """The bound on held messages."""
        return self._held.max_messages

    @property
    def full(self) -> bool:
        """Whether the bound is reached: a send now would wait, then raise."""
        return self._held.full

    def check_room(self) -> None:
        """Raise at once if the bound is reached (to refuse work before doing it).

        Raises:
            BackpressureError: the bound is reached.
        """
        if self._held.full:
            raise BackpressureError(
                held_bytes=self._held.held_bytes,
                max_bytes=self._held.max_bytes,
                held_messages=self._held.held_messages,
                max_messages=self._held.max_messages,
                retry_after_s=1.0 if self.connected else 2.0,
            )

    async def _admit(self) -> None:
        """Return once there is room; raise BackpressureError if none came in time."""
        if not self._held.full:
            return
        self._ensure_running()
        deadline = time.monotonic() + self.max_block_s
        while self._held.full:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.check_room()
            await self._await_progress(remaining)

    async def _await_progress(self, timeout_s: float) -> None:
        """Wait until an ack (or a refusal) comes, at most ``timeout_s``."""
        self._progress.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._progress.wait(), timeout_s)

    def _enqueue(self, batch: EventBatch) -> None:
        if not len(batch):
            return
        parts = partitions_of(batch.user_id, self.partitions)
        order = np.argsort(parts, kind="stable")
        grouped, parts = batch.take(order), parts[order]  # one gather, then cheap slices
        bounds = [0, *(np.flatnonzero(np.diff(parts)) + 1).tolist(), len(parts)]
        now = time.monotonic()
        for start, stop in itertools.pairwise(bounds):
            partition = int(parts[start])
            self._buffers.setdefault(partition, []).append(grouped.slice(start, stop))
            self._buffered[partition] = self._buffered.get(partition, 0) + stop - start
            self._since.setdefault(partition, now)
            if self._buffered[partition] >= self.max_batch:
                self._seal_partition(partition, full_only=True)

    def _seal_partition(self, partition: int, full_only: bool = False) -> None:
        """Turn a partition's buffer into messages; with ``full_only``, keep a remainder."""
        pending = EventBatch.concat(self._buffers.pop(partition, []))
        since = self._since.pop(partition, time.monotonic())
        self._buffered.pop(partition, None)
        keep = len(pending) % self.max_batch if full_only else 0
        cut = len(pending) - keep
        if keep:
            self._buffers[partition] = [pending.slice(cut, len(pending))]
            self._buffered[partition] = keep
            self._since[partition] = since
        for start in range(0, cut, self.max_batch):
            self._seal(partition, pending.slice(start, min(start + self.max_batch, cut)))

    def _seal(self, partition: int, chunk: EventBatch) -> None:
        """One message of ``chunk``, split in halves while it is over the payload limit."""
        body = encode(chunk)
        if len(body) > self._payload_limit() and len(chunk) > 1:
            half = len(chunk) // 2
            self._seal(partition, chunk.slice(0, half))
            self._seal(partition, chunk.slice(half, len(chunk)))
            return
        self._sequence += 1
        msg_id = f"{self.producer_id}-{partition}-{self._sequence}"
        self._hold(events_subject(partition), body, {MSG_ID_HEADER: msg_id}, len(chunk))

    def _hold_dead_letter(self, rejection: Rejection) -> None:
        """A dead letter, held and resent like events (its id: the same bad event, the same id)."""
        self._sequence += 1
        subject, body, headers = dead_letter(rejection, self._origin)
        self._hold(subject, body, headers, 0)

    def _hold(self, subject: str, body: bytes, headers: dict[str, str], events: int) -> None:
        self._held.add(Outgoing(self._sequence, subject, body, headers, events))
        self._ensure_running()
        self._wake.set()

    def _reconnects(self) -> int:
        return int(self._nc.stats["reconnects"]) if self._nc is not None else 0

    def _payload_limit(self) -> int:
        server = self._nc.max_payload if self._nc is not None else 0
        return (server if server > 0 else DEFAULT_MAX_PAYLOAD) - HEADER_ROOM

    def _ensure_running(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        # Ends by a flag (this task is no longer the current sender), not by
        # cancel(): a cancel landing inside nats-py's publish_async (its
        # wait_for on a semaphore) or publish (its flush) is lost on Python 3.11.
        me = asyncio.current_task()
        while self._task is me:
            self._wake.clear()
            try:
                await self._service()
            except Exception:  # keep sending whatever happened to one round
                log.exception("producer %s: send round failed", self.producer_id)
            if self._task is not me:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._tick_s)

    async def _service(self) -> None:
        """One round: follow the connection, expire overdue acks, seal lingering batches, send."""
        now = time.monotonic()
        connected = self.connected
        reconnects = self._reconnects()
        dropped = self._was_connected and (not connected or reconnects != self._reconnects_seen)
        if dropped:
            # Acks of what was in flight may never come: send it all again once
            # the connection is back (the stream drops the copies it has).
            for out in self._held.flying():
                self._abandon(out, now, backoff=False)
        if connected and (dropped or not self._was_connected):
            log.info("producer %s: connection back; resending", self.producer_id)
            self._held.retry_now(now)
        self._was_connected, self._reconnects_seen = connected, reconnects
        for out in self._held.expired(now, self.publish_timeout_s):
            self.last_error = TimeoutError(f"no ack within {self.publish_timeout_s} s")
            self._abandon(out, now)
        if self.linger_s > 0:
            deadline = now - self.linger_s
            for partition in [p for p, t in self._since.items() if t <= deadline]:
                self._seal_partition(partition)
        while connected and self._held.in_flight < self.max_in_flight:
            sending = self._held.take(time.monotonic())
            if sending is None:
                break
            await self._transmit(sending)
            connected = self.connected

    async def _transmit(self, out: Outgoing) -> None:
        if out.attempts > 1:
            self.resent_messages += 1
        try:
            future = await self._js.publish_async(
                out.subject, out.body, headers=out.headers, wait_stall=self.publish_timeout_s
            )
        except Exception as exc:  # closed, reconnecting, stalled, too big
            self._failed(out, exc)
            return
        self._held.sent(out, time.monotonic(), future)
        future.add_done_callback(functools.partial(self._settled, out))

    def _settled(self, out: Outgoing, future: asyncio.Future[Any]) -> None:
        if out.token is not future or future.cancelled():
            return  # an attempt given up already (overdue, or the connection dropped)
        exc = future.exception()
        if exc is not None:
            self._failed(out, exc)
            return
        if not self._held.acked(out):
            return
        if getattr(future.result(), "duplicate", False):
            self.duplicates += 1
        if out.events:
            self.published_events += out.events
            self.published_messages += 1
        else:
            self.dead_lettered += 1
        self._progress.set()

    def _failed(self, out: Outgoing, exc: BaseException) -> None:
        self.last_error = exc
        if _permanent(exc):
            log.error("producer %s: %s refused %s: %r", self.producer_id, out.subject, out, exc)
            self._held.drop(out)
            self._refused.append(PublishRefusedError(out.subject, repr(exc)))
            self._progress.set()
        else:
            self._held.failed(out, time.monotonic())

    def _abandon(self, out: Outgoing, now: float, backoff: bool = True) -> None:
        """Stop waiting for ``out``'s ack and schedule it again (same bytes, same id)."""
        token = out.token
        self._held.failed(out, now, backoff=backoff)
        if isinstance(token, asyncio.Future) and not token.done():
            token.cancel()  # a plain future: frees nats-py's pending slot, ignored by _settled

    async def flush(self, timeout_s: float | None = None) -> None:
        """Send every buffered event and wait until the stream acknowledged all of it.

        Waits for what was accepted before the call (later sends do not hold it
        up). Nothing is dropped when this raises: unacknowledged messages stay
        held and keep being resent; a later flush waits for them again.

        Args:
            timeout_s: how long to wait; ``publish_timeout_s`` by default.

        Raises:
            UnavailableError: not everything was acknowledged within the timeout.
            PublishRefusedError: the stream refused a message for good (dropped).
        """
        for partition in list(self._buffers):
            self._seal_partition(partition)
        self._ensure_running()
        self._wake.set()
        target = self._sequence
        timeout = self.publish_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        while (oldest := self._held.oldest_seq) is not None and oldest <= target:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UnavailableError(
                    "nats",
                    f"{self._held.held_messages} messages ({self._held.held_events} events) "
                    f"not acknowledged within {timeout:g} s, kept for resending; "
                    f"last error: {self.last_error!r}",
                    retry_after_s=1.0 if self.connected else 2.0,
                )
            await self._await_progress(remaining)
        if self._refused:
            refused, self._refused = self._refused, []
            raise refused[0]

    async def close(self, timeout_s: float | None = None) -> None:
        """Flush, then stop the sending task.

        If the flush raises, the held messages are kept: flush (or close) again
        to send them.
        """
        try:
            await self.flush(timeout_s)
        finally:
            task, self._task = self._task, None
            if task is not None:
                self._wake.set()
                _, running = await asyncio.wait({task}, timeout=self.publish_timeout_s)
                if running:  # stuck in a NATS call; it ends by itself after that
                    log.warning("producer %s: sending task still busy", self.producer_id)


def _permanent(exc: BaseException) -> bool:
    """Whether resending the same message cannot succeed."""
    if isinstance(exc, MaxPayloadError | BadSubjectError):
        return True
    code = exc.code if isinstance(exc, APIError) else None
    return code is not None and 400 <= code < 500
