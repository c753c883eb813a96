"""The two bench phases that run the real pipeline: producer -> JetStream -> shard actors.

Each phase gets its own nats-server and shard pool, so its counters start at
zero. Progress is read with the shards' cheap ``counters()`` instead of
``pool.status()``: status also asks JetStream for every partition's consumer
info, which would load the very event loops being measured. The freshness ring
is read raw, so percentiles come from every message after the warm-up rather
than from the last 4096 at the end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nats
import numpy as np
import ray

from actors.jetstream import StreamNames, ensure_streams
from actors.pool import PoolSpec, ShardPool
from cluster.nats_server import EmbeddedNats
from tests.bench.machine import CpuMeter, wait_for_quiet
from tests.bench.publisher import PublisherProcess, PublishPlan


@dataclass(frozen=True)
class PoolShape:
    """The pipeline under test."""

    partitions: int = 16
    shards: int = 2
    shard_cpus: float = 0.5
    insights: bool = True  # off: the profile-only mode


class Stage:
    """A fresh nats-server with the platform's streams and a shard pool reading it."""

    def __init__(self, folder: Path, name: str, shape: PoolShape) -> None:
        self.name, self.shape = name, shape
        self.server = EmbeddedNats(folder / f"nats-{name}").start()
        self.pool: ShardPool | None = None

    async def start(self) -> Stage:
        nc = await nats.connect(self.server.url)
        try:
            await ensure_streams(nc.jetstream(), StreamNames())
        finally:
            await nc.close()
        spec = PoolSpec(
            self.shape.partitions,
            self.shape.shards,
            self.server.url,
            StreamNames().events,
            shard_cpus=self.shape.shard_cpus,
            name=f"bench-{self.name}",
        )
        self.pool = ShardPool.create(spec, insights=self.shape.insights)
        return self

    async def call(self, method: str) -> list[Any]:
        """A shard actor method on every shard, in shard order."""
        assert self.pool is not None
        calls = (getattr(h, method).remote() for h in self.pool.handles)
        return list(await asyncio.gather(*calls))

    async def counters(self) -> list[dict[str, Any]]:
        """Each shard's cheap counters (no JetStream round trips, unlike status)."""
        return await self.call("counters")

    def stop(self) -> None:
        try:
            if self.pool is not None:
                self.pool.shutdown()
        finally:
            self.server.stop()


def _percentiles(samples: np.ndarray) -> dict[str, float | None]:
    if not len(samples):
        return {"p50": None, "p99": None, "max": None}
    p50, p99 = np.percentile(samples, [50, 99]).tolist()
    return {"p50": round(p50, 2), "p99": round(p99, 2), "max": round(float(samples.max()), 2)}


class Progress:
    """Applied events over time, and whether the shards stopped making progress.

    A phase ends when every event is applied, or when the publisher is done and
    the count has not moved for ``stall_s`` (events that will never arrive; 20 s
    outlasts the stream reader's watchdog, which re-asks silent partitions after
    10 to 15 s), or at ``deadline``; ``seconds`` runs to the last increase.
    """

    def __init__(self, expected: int, started: float, stall_s: float, deadline: float) -> None:
        self.expected, self.started = expected, started
        self.stall_s, self.deadline = stall_s, deadline
        self.applied = 0
        self.last_change = started

    def update(self, applied: int) -> None:
        if applied != self.applied:
            self.applied, self.last_change = applied, time.perf_counter()

    @property
    def complete(self) -> bool:
        return self.applied >= self.expected

    def running(self, publisher_done: bool) -> bool:
        now = time.perf_counter()
        stalled = publisher_done and now - self.last_change > self.stall_s
        return not self.complete and not stalled and now < self.deadline

    @property
    def seconds(self) -> float:
        return self.last_change - self.started


async def _health(stage: Stage) -> dict[str, Any]:
    """What the stream and the connections say at the end of a phase."""
    assert stage.pool is not None
    status = await stage.pool.status()
    return {
        "status": status,
        "lag_messages": sum(sum(s.get("lag", {}).values()) for s in status),
        "connections": [
            {"reconnects": c["reconnects"], "in_msgs": c["in_msgs"]} for c in await stage.counters()
        ],
    }


async def _meter(stage: Stage, child: PublisherProcess) -> CpuMeter:
    """A CPU meter over the shards, the nats-server, the publisher and this driver."""
    pids = {f"shard_{i}": pid for i, pid in enumerate(c["pid"] for c in await stage.counters())}
    assert stage.server.pid is not None and child.process.pid is not None
    pids |= {"nats_server": stage.server.pid, "publisher": child.process.pid}
    return CpuMeter(pids | {"bench_driver": os.getpid()})


async def _publisher_done(child: PublisherProcess, deadline: float) -> None:
    """Wait for the publisher's stats (it may finish flushing after the last apply)."""
    while not child.poll_done() and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)


def _server_log_count(stage: Stage, text: str) -> int:
    """Lines of the nats-server log that contain ``text`` (e.g. slow consumer drops)."""
    try:
        return stage.server.log_path.read_text().count(text)
    except OSError:
        return -1


async def ingest(
    folder: Path,
    shape: PoolShape,
    plan: PublishPlan,
    poll_s: float = 0.05,
    stall_s: float = 20,
    name: str = "ingest",
) -> dict[str, Any]:
    """Publish the workload as fast as possible; time until the shards applied all of it.

    ``name`` names the phase's NATS folder and pool: a phase of its own starts empty.
    """
    stage = await Stage(folder, name, shape).start()
    plan = replace(plan, nats_url=stage.server.url)
    child = PublisherProcess(plan)
    try:
        expected = await child.ready()
        cpu = await _meter(stage, child)
        quiet = wait_for_quiet()
        cpu.start()
        started = time.perf_counter()
        child.go()
        progress = Progress(expected, started, stall_s, started + max(120.0, expected / 20_000))
        while progress.running(child.poll_done()):
            await asyncio.sleep(poll_s)
            progress.update(sum(c["applied_events"] for c in await stage.counters()))
        cpu_s = cpu.stop()
        await _publisher_done(child, progress.deadline)
        health = await _health(stage)
        probe_started = time.perf_counter()
        await stage.pool.status()  # type: ignore[union-attr]
        status_call_ms = (time.perf_counter() - probe_started) * 1000
    finally:
        child.close()
        stage.stop()
    done = child.done or {}
    status = health["status"]
    messages = sum(s["applied_messages"] for s in status)
    return {
        "events": expected,
        "applied_events": progress.applied,
        "complete": progress.complete,
        "seconds": progress.seconds,
        "events_per_s": progress.applied / progress.seconds if progress.seconds else 0.0,
        "producer_events_per_s": done["events"] / done["send_s"] if done else None,
        "producer_acked_events_per_s": done["events"] / done["acked_s"] if done else None,
        "producer_close_hung": done.get("close_hung"),
        "messages": messages,
        "events_per_message": progress.applied / messages if messages else None,
        "max_batch": plan.max_batch,
        "linger_ms": plan.linger_ms,
        "send_events": plan.send_events,
        "shard_busy_s": [s["busy_s"] for s in status],
        "fold_us_per_event": (
            1e6 * sum(s["fold_s"] for s in status) / max(1, sum(s["folded_events"] for s in status))
        ),
        "state_bytes": sum(s["state_bytes"] for s in status),
        "users": sum(s["users"] for s in status),
        "rejected": sum(sum(s["rejected"].values()) for s in status),
        "lag_messages_at_end": health["lag_messages"],
        "shard_connections": health["connections"],
        "server_slow_consumer_events": _server_log_count(stage, "Slow Consumer Detected"),
        "cpu_s": cpu_s,
        "background_busy": quiet,
        "status_call_ms": round(status_call_ms, 1),
    }


class _Ring:
    """New samples of one shard's ring (freshness, insights lag) since the last read."""

    def __init__(self) -> None:
        self.seen = 0
        self.lost = 0

    def new(self, count: int, ring: np.ndarray) -> np.ndarray:
        size = len(ring)
        fresh, self.seen = count - self.seen, count
        if fresh >= size:
            self.lost += fresh - size
            return ring.copy()
        return ring[np.arange(count - fresh, count) % size]


async def freshness(
    folder: Path,
    shape: PoolShape,
    plan: PublishPlan,
    warmup_s: float,
    poll_s: float = 0.25,
    name: str = "freshness",
    snapshots: int = 1,
) -> dict[str, Any]:
    """Publish at a fixed rate; store->applied delay per message after the warm-up.

    Also the apply-to-fold delay of the insight aggregates (insights lag), and
    ``snapshots`` checkpoints of every shard taken on the way (spread over the
    run after the warm-up), with the longest time applying paused for one. One
    checkpoint in a run of about 20 s is three times the default cadence (one
    a minute), so the delays include what snapshots cost.
    """
    stage = await Stage(folder, name, shape).start()
    plan = replace(plan, nats_url=stage.server.url)
    child = PublisherProcess(plan)
    rings = [_Ring() for _ in range(shape.shards)]
    lag_rings = [_Ring() for _ in range(shape.shards)]
    kept: list[np.ndarray] = []
    lags: list[np.ndarray] = []
    span = plan.workload.duration_s - warmup_s
    snapshot_at = [warmup_s + span * (k + 1) / (snapshots + 1) for k in range(snapshots)]
    taken: list[dict[str, Any]] = []
    try:
        expected = await child.ready()
        cpu = await _meter(stage, child)
        quiet = wait_for_quiet()
        cpu.start()
        started = time.perf_counter()
        child.go()
        deadline = started + plan.workload.duration_s + 120
        progress = Progress(expected, started, stall_s=20, deadline=deadline)
        while progress.running(child.poll_done()):
            await asyncio.sleep(poll_s)
            reads = await stage.call("freshness_ring")
            lag_reads = await stage.call("insights_lag_ring")
            elapsed = time.perf_counter() - started
            warm = elapsed >= warmup_s
            for ring, (count, samples) in zip(rings, reads, strict=True):
                new = ring.new(count, samples)
                if warm:
                    kept.append(new)
            for ring, (count, samples) in zip(lag_rings, lag_reads, strict=True):
                new = ring.new(count, samples)
                if warm:
                    lags.append(new)
            if snapshot_at and elapsed >= snapshot_at[0]:
                snapshot_at.pop(0)
                taken.append({"at_s": round(elapsed, 2), "shards": await stage.call("checkpoint")})
            progress.update(sum(c["applied_events"] for c in await stage.counters()))
        cpu_s = cpu.stop()
        await _publisher_done(child, deadline)
        health = await _health(stage)
        pauses = [c["snapshot_pause_ms"]["max"] for c in await stage.counters()]
    finally:
        child.close()
        stage.stop()
    done = child.done or {}
    status = health["status"]
    store_to_applied = np.concatenate(kept) if kept else np.zeros(0)
    insights_lag = np.concatenate(lags) if lags else np.zeros(0)
    messages = sum(s["applied_messages"] for s in status)
    acks = np.array([ms for t, ms in done.get("ack_samples", []) if t >= warmup_s])
    return {
        "rate_target": plan.workload.rate,
        "events": expected,
        "applied_events": progress.applied,
        "complete": progress.complete,
        "duration_s": plan.workload.duration_s,
        "achieved_rate": done["events"] / done["send_s"] if done else None,
        "max_behind_schedule_ms": round(done["max_behind_schedule_s"] * 1000, 1) if done else None,
        "max_batch": plan.max_batch,
        "linger_ms": plan.linger_ms,
        "chunk_ms": plan.workload.chunk_s * 1000,
        "warmup_s": warmup_s,
        "messages": messages,
        "events_per_message": progress.applied / messages if messages else None,
        "samples": len(store_to_applied),
        "samples_lost": sum(r.lost for r in rings),
        "store_to_applied_ms": _percentiles(store_to_applied),
        "send_to_ack_ms": _percentiles(acks),
        "publish_to_visible_est_ms": _percentiles(_sum_of_independent(acks, store_to_applied)),
        "insights_lag_ms": _percentiles(insights_lag),
        "snapshots": taken,
        "snapshot_apply_pause_max_ms": max((p for p in pauses if p is not None), default=None),
        "status_at_end_ms": [s["freshness_ms"] for s in status],
        "apply_ms": [s["apply_ms"] for s in status],  # per step, the latest 2048
        "fold_ms": [s["fold_ms"] for s in status],  # per fold chunk
        "lag_messages_at_end": health["lag_messages"],
        "shard_connections": health["connections"],
        "server_slow_consumer_events": _server_log_count(stage, "Slow Consumer Detected"),
        "producer_close_hung": done.get("close_hung"),
        "cpu_s": cpu_s,
        "background_busy": quiet,
    }


def _sum_of_independent(a: np.ndarray, b: np.ndarray, n: int = 200_000) -> np.ndarray:
    """Samples of A + B for independent A and B (the two legs are measured separately)."""
    if not len(a) or not len(b):
        return np.zeros(0)
    rng = np.random.default_rng(0)
    return np.asarray(rng.choice(a, n) + rng.choice(b, n))


def init_ray(cpus: int) -> None:
    """A local Ray the way the issue prescribes, quiet."""
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )


async def steady_cpu(folder: Path, shape: PoolShape, plan: PublishPlan, warmup_s: float) -> dict:
    """Publish at a low steady rate; the shards' CPU time per event once warm.

    The shards' CPU is read from ``/proc`` through the meter over the window after
    the warm-up, and divided by the events they applied in that window.
    """
    stage = await Stage(folder, "steady", shape).start()
    plan = replace(plan, nats_url=stage.server.url)
    child = PublisherProcess(plan)
    try:
        expected = await child.ready()
        cpu = await _meter(stage, child)
        wait_for_quiet()
        started = time.perf_counter()
        child.go()
        await asyncio.sleep(warmup_s)
        before = sum(c["applied_events"] for c in await stage.counters())
        cpu.start()
        deadline = started + plan.workload.duration_s
        while time.perf_counter() < deadline - 0.5:
            await asyncio.sleep(0.5)
        cpu_s = cpu.stop()
        counters = await stage.counters()
        applied = sum(c["applied_events"] for c in counters) - before
        messages = sum(c["applied_messages"] for c in counters)
        await _publisher_done(child, deadline + 60)
    finally:
        child.close()
        stage.stop()
    shards = sum(v for k, v in cpu_s.items() if k.startswith("shard_"))
    return {
        "rate_target": plan.workload.rate,
        "events": expected,
        "window_s": cpu_s["wall_s"],
        "window_events": applied,
        "events_per_message": sum(c["applied_events"] for c in counters) / messages
        if messages
        else None,
        "linger_ms": plan.linger_ms,
        "shard_cpu_s": round(shards, 3),
        "shard_cpu_us_per_event": shards / applied * 1e6 if applied else None,
        "nats_cpu_us_per_event": cpu_s["nats_server"] / applied * 1e6 if applied else None,
        "publisher_cpu_us_per_event": cpu_s["publisher"] / applied * 1e6 if applied else None,
        "cpu_s": cpu_s,
    }
