"""Publish simulated traffic at a wall-clock pace: ``audience simulate`` and ``up --demo``."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from actors.nats_auth import NatsCredentials
from actors.nats_auth import connect as nats_connect
from actors.producer import DEFAULT_LINGER_MS, Producer
from actors.simulator import Simulator
from actors.validation import ValidationPolicy, now_ms


@dataclass(frozen=True)
class SimulationReport:
    """What a simulation run published."""

    events: int
    messages: int
    rejected: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        """Achieved publish rate."""
        return self.events / self.seconds if self.seconds else 0.0


async def publish_simulation(
    nats_url: str,
    partitions: int,
    *,
    users: int,
    rate: float,
    duration_s: float,
    seed: int,
    start_ms: int | None = None,
    time_scale: float = 1.0,
    max_batch: int = 1000,
    linger_ms: float = DEFAULT_LINGER_MS,
    policy: ValidationPolicy | None = None,
    stop: asyncio.Event | None = None,
    credentials: NatsCredentials | None = None,
) -> SimulationReport:
    """Generate a seeded audience and publish it at ``rate`` events/s for ``duration_s``.

    Falls behind gracefully: when publishing is slower than ``rate``, chunks go
    out back to back instead of piling up.
    """
    start = now_ms() if start_ms is None else start_ms
    simulator = Simulator(users, seed, start, time_scale=time_scale)
    nc = await nats_connect(
        nats_url, credentials, name="audience-simulator", max_reconnect_attempts=-1
    )
    producer = await Producer(
        nc.jetstream(), partitions, policy=policy, max_batch=max_batch, linger_ms=linger_ms
    ).start()
    started = time.monotonic()
    try:
        for offset_s, batch in simulator.batches(rate, duration_s):
            if stop is not None and stop.is_set():
                break
            delay = started + offset_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await producer.send(batch)
        await producer.close()
    finally:
        await nc.close()
    return SimulationReport(
        events=producer.published_events,
        messages=producer.published_messages,
        rejected=sum(producer.rejected.values()),
        seconds=time.monotonic() - started,
    )
