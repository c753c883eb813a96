"""The producer SDK: validate, batch per partition, publish with a message id.

Events are checked once here; good ones wait in a per-partition buffer until it
holds ``max_batch`` events or its oldest event has waited ``linger_ms``, then go
out as one message on ``audience.events.<partition>`` with a ``Nats-Msg-Id``
unique to this producer, so JetStream drops a re-sent copy. Rejected events go
to the dead-letter subjects. Nothing is lost silently: :meth:`Producer.flush`
waits for the stream's acknowledgement of everything sent so far and raises if
any publish failed.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from typing import Any

import numpy as np
from nats.js import JetStreamContext

from actors.batch import EventBatch
from actors.codec import encode
from actors.deadletter import DeadLetters
from actors.errors import UnavailableError
from actors.partitioning import events_subject, partitions_of
from actors.validation import Checked, ValidationPolicy, check_batch, parse_events

MSG_ID_HEADER = "Nats-Msg-Id"


class Producer:
    """Publishes validated events, many per message, partitioned by user.

    Call :meth:`start` once (it runs the linger timer) and :meth:`close` at the
    end; both are safe to repeat.
    """

    def __init__(
        self,
        js: JetStreamContext,
        partitions: int,
        *,
        policy: ValidationPolicy | None = None,
        max_batch: int = 1000,
        linger_ms: float = 5.0,
        producer_id: str | None = None,
        dead_letters: DeadLetters | None = None,
        publish_timeout_s: float = 10.0,
    ) -> None:
        self._js = js
        self.partitions = partitions
        self.policy = policy or ValidationPolicy()
        self.max_batch = max_batch
        self.linger_s = linger_ms / 1000
        self.producer_id = producer_id or uuid.uuid4().hex[:12]
        self.dead_letters = dead_letters or DeadLetters(js, origin=f"producer:{self.producer_id}")
        self.publish_timeout_s = publish_timeout_s
        self._buffers: dict[int, list[EventBatch]] = {}
        self._buffered: dict[int, int] = {}
        self._since: dict[int, float] = {}
        self._sequence = 0
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._failures: list[BaseException] = []
        self._timer: asyncio.Task[None] | None = None
        self._closing = False
        self.published_events = 0
        self.published_messages = 0
        self.rejected: Counter[str] = Counter()

    async def start(self) -> Producer:
        """Start the linger timer."""
        if self._timer is None and self.linger_s > 0:
            self._timer = asyncio.create_task(self._linger_loop())
        return self

    async def send_json(self, raw: bytes) -> Checked:
        """Validate a JSON array of events, queue the good ones, dead-letter the rest."""
        return await self.publish_checked(parse_events(raw, self.policy))

    async def send(self, batch: EventBatch) -> Checked:
        """Validate a columnar batch, queue the good rows, dead-letter the rest."""
        return await self.publish_checked(check_batch(batch, self.policy))

    async def publish_checked(self, checked: Checked) -> Checked:
        """Queue the accepted part of an already validated input; dead-letter the rest."""
        if checked.rejected:
            await self.dead_letters.publish(checked.rejected)
            self.rejected.update(r.reason.value for r in checked.rejected)
        await self._enqueue(checked.batch)
        return checked

    async def _enqueue(self, batch: EventBatch) -> None:
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
                await self._publish_partition(partition, full_only=True)

    async def _publish_partition(self, partition: int, full_only: bool = False) -> None:
        """Publish a partition's buffer; with ``full_only``, keep a remainder below max_batch."""
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
            await self._publish(partition, pending.slice(start, start + self.max_batch))

    async def _publish(self, partition: int, chunk: EventBatch) -> None:
        self._sequence += 1
        headers = {MSG_ID_HEADER: f"{self.producer_id}-{partition}-{self._sequence}"}
        try:
            future = await self._js.publish_async(
                events_subject(partition),
                encode(chunk),
                headers=headers,
                wait_stall=self.publish_timeout_s,
            )
        except Exception as exc:  # connection closed, stalled: surfaced by flush()
            self._failures.append(exc)
            return
        self._in_flight.add(future)
        future.add_done_callback(self._settled)
        self.published_events += len(chunk)
        self.published_messages += 1

    def _settled(self, future: asyncio.Future[Any]) -> None:
        self._in_flight.discard(future)
        if not future.cancelled() and future.exception() is not None:
            self._failures.append(future.exception())  # type: ignore[arg-type]

    async def _linger_loop(self) -> None:
        # Ends by a flag, not by cancel(): a cancel landing inside nats-py's
        # publish_async (its wait_for on a semaphore) is lost on Python 3.11.
        while not self._closing:
            await asyncio.sleep(self.linger_s / 2)
            deadline = time.monotonic() - self.linger_s
            for partition in [p for p, t in self._since.items() if t <= deadline]:
                await self._publish_partition(partition)

    async def flush(self) -> None:
        """Send every buffered event and wait until the stream acknowledged all of it.

        Raises:
            UnavailableError: if a publish failed or was not acknowledged in time.
        """
        for partition in list(self._buffers):
            await self._publish_partition(partition)
        if self._in_flight:
            _, late = await asyncio.wait(list(self._in_flight), timeout=self.publish_timeout_s)
            if late:
                self._failures.append(TimeoutError(f"{len(late)} publishes not acknowledged"))
        if self._failures:
            failures, self._failures = self._failures, []
            raise UnavailableError("nats", f"{len(failures)} publishes failed: {failures[0]!r}")

    @property
    def buffered_events(self) -> int:
        """Events accepted but not yet published."""
        return sum(self._buffered.values())

    async def close(self) -> None:
        """Flush and stop the linger timer."""
        if self._timer is not None:
            self._closing = True
            await self._timer
            self._timer = None
            self._closing = False
        await self.flush()
