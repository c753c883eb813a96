"""The producer side of a bench phase, in its own (spawned) process.

It is the real producer path: :class:`~actors.producer.Producer` validates,
partitions, encodes and publishes with message ids. Running it in a separate
process keeps its CPU out of the bench driver's event loop and lets it compete
with the shards for the two cores the way a co-located producer would. Events
are generated before the ``go`` signal, so the simulator's cost is not timed.

Protocol over the pipe (:class:`PublisherProcess` is the parent's end): the
child sends ``("ready", events)``, waits for ``"go"``, publishes, flushes and
sends ``("done", stats)`` (or ``("error", text)``).
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import multiprocessing
import os
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import nats
import numpy as np

from actors.batch import EventBatch
from actors.partitioning import EVENTS_SUBJECT_PREFIX
from actors.producer import Producer
from tests.bench.workload import Workload, generate, slices

_IDS_AT = b'"e":["'


@dataclass(frozen=True)
class PublishPlan:
    """What one publisher process does.

    Attributes:
        nats_url: the phase's own server (the phase fills it in).
        workload: the events (re-generated here, deterministically).
        paced: send each chunk at its wall offset (a fixed rate), or all at once.
        send_events: unpaced only: events per ``send()`` call. Big sends let each
            partition's buffer reach ``max_batch`` several times per call, so
            messages are nearly full (see the report's events per message).
    """

    nats_url: str
    partitions: int
    workload: Workload
    paced: bool
    max_batch: int
    linger_ms: float
    send_events: int = 250_000


class TimedJetStream:
    """Wraps a JetStream context to time each message from ``send()`` to its ack.

    The producer publishes a partition's events in arrival order, so the first
    event id of a message names its oldest event; its chunk's ``send()`` time
    is when that event entered the pipeline. Everything else is delegated.
    """

    def __init__(self, js: Any, prefix: str, chunk_starts: list[int]) -> None:
        self._js = js
        self._prefix = prefix.encode()
        self._starts = chunk_starts  # id of the first event of each chunk
        self.sent_at: list[float] = []  # perf_counter of each chunk's send(), filled by the caller
        self.samples_ms: list[tuple[float, float]] = []  # (ack time, send-to-ack ms)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)

    async def publish_async(self, subject: str, payload: bytes, **kwargs: Any) -> Any:
        future = await self._js.publish_async(subject, payload, **kwargs)
        if not subject.startswith(EVENTS_SUBJECT_PREFIX):  # dead letters: not timed
            return future
        chunk = bisect.bisect_right(self._starts, self._first_id(payload)) - 1
        born = self.sent_at[chunk]

        def settled(f: asyncio.Future[Any]) -> None:
            if not f.cancelled() and f.exception() is None:
                now = time.perf_counter()
                self.samples_ms.append((now, (now - born) * 1000))

        future.add_done_callback(settled)
        return future

    def _first_id(self, payload: bytes) -> int:
        at = payload.index(_IDS_AT) + len(_IDS_AT)
        end = payload.index(b'"', at)
        return int(payload[at + len(self._prefix) : end])


class PublisherProcess:
    """A spawned :mod:`tests.bench.publisher` process and its pipe."""

    def __init__(self, plan: PublishPlan) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=run, args=(plan, child), name="bench-publisher")
        self.process.start()
        child.close()
        self.done: dict[str, Any] | None = None

    def _receive(self, conn: Connection) -> tuple[str, Any]:
        kind, payload = conn.recv()
        if kind == "error":
            raise RuntimeError(f"publisher failed:\n{payload}")
        return kind, payload

    async def ready(self, timeout_s: float = 300) -> int:
        """Wait until the events are generated and the producer is connected."""
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self._conn.poll, timeout_s):
            raise TimeoutError("publisher not ready")
        kind, events = self._receive(self._conn)
        assert kind == "ready", kind
        return int(events)

    def go(self) -> None:
        self._conn.send("go")

    def poll_done(self) -> bool:
        """Whether the publisher has flushed everything (its stats are then in ``done``)."""
        if self.done is None and self._conn.poll():
            _, self.done = self._receive(self._conn)
        return self.done is not None

    def close(self) -> None:
        self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
        self._conn.close()


def run(plan: PublishPlan, conn: Connection) -> None:
    """Process entry point."""
    try:
        asyncio.run(_run(plan, conn))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    finally:
        conn.close()


async def _close(producer: Producer, linger_s: float) -> bool:
    """Close the producer; False if ``close()`` hangs.

    ``Producer.close()`` cancels its linger task and awaits it, but nats-py's
    ``Client._flush_pending`` swallows ``CancelledError``: a cancel that lands
    while the task is inside ``publish`` is lost and ``close()`` never returns.
    With the buffers flushed and one linger period waited, the task is asleep
    when cancelled; the timeout is the safety net.
    """
    await asyncio.sleep(linger_s)
    await producer.flush()
    closing = asyncio.ensure_future(producer.close())
    done, _ = await asyncio.wait({closing}, timeout=10)
    return bool(done)


async def _run(plan: PublishPlan, conn: Connection) -> None:
    chunks = generate(plan.workload)
    if plan.paced:
        offsets = [offset for offset, _ in chunks]
        batches = [batch for _, batch in chunks]
    else:
        joined = EventBatch.concat(batch for _, batch in chunks)
        batches = slices(joined, plan.send_events)
        offsets = [0.0] * len(batches)
    sizes = [len(b) for b in batches]
    gc.collect()
    gc.freeze()  # millions of pre-generated objects would make every full GC pass a pause
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    nc = await nats.connect(plan.nats_url, name="bench-publisher")
    timed = TimedJetStream(nc.jetstream(), f"sim{plan.workload.seed}-", starts)
    producer = Producer(
        timed,  # type: ignore[arg-type]  # a delegating proxy
        plan.partitions,
        max_batch=plan.max_batch,
        linger_ms=plan.linger_ms,
    )
    await producer.start()
    conn.send(("ready", sum(sizes)))
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    started = time.perf_counter()
    behind_s = 0.0
    for offset, batch in zip(offsets, batches, strict=True):
        if plan.paced:
            delay = started + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                behind_s = max(behind_s, -delay)
        timed.sent_at.append(time.perf_counter())
        await producer.send(batch)
    sent = time.perf_counter()
    await producer.flush()  # everything published and acknowledged
    acked = time.perf_counter()
    close_hung = not await _close(producer, plan.linger_ms / 1000)
    if not close_hung:
        await nc.close()
    conn.send(
        (
            "done",
            {
                "close_hung": close_hung,
                "events": producer.published_events,
                "messages": producer.published_messages,
                "rejected": sum(producer.rejected.values()),
                "send_s": sent - started,
                "acked_s": acked - started,
                "max_behind_schedule_s": behind_s,
                "started_at": started,
                "ack_samples": [(t - started, ms) for t, ms in timed.samples_ms],
            },
        )
    )
    if close_hung:  # the linger task cannot be stopped; asyncio.run would wait for it forever
        conn.close()
        os._exit(0)
