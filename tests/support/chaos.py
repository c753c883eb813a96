"""A chaos run: a stream with duplicates, garbage and deletions, while shards die and NATS restarts.

:func:`build_workload` is pure: what to publish, in order, and the ground truth
computed straight from the events (unique event ids, valid events, users not
deleted). :func:`run_chaos` publishes it through the producer SDK against a
real nats-server and shard pool, kills random shard actors and restarts
nats-server at set points of the stream, then compares every user's counts with
the truth. Used at a small size by the integration suite and at full size by
``make chaos`` / the benchmark.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import nats
import numpy as np
import orjson
import ray
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from actors.batch import EventBatch
from actors.codec import encode
from actors.errors import AudienceError, ShardRecovering
from actors.events import TYPE_CODE, EventType
from actors.jetstream import MSG_ID_HEADER, StreamNames, dead_letter_counts, ensure_streams
from actors.partitioning import events_subject
from actors.pool import ShardPool
from actors.producer import Producer
from cluster.nats_server import EmbeddedNats
from tests.support.truth import Truth, mismatched, truth_of

FAR_FUTURE_MS = 4_102_444_800_000  # 2100-01-01


@dataclass(frozen=True)
class ChaosPlan:
    """The size of the stream and the faults injected into it."""

    events: int = 100_000
    users: int = 2_000
    duplicate_fraction: float = 0.05
    malformed_fraction: float = 0.01
    deletions: int = 20
    kills: int = 3
    restart_nats: bool = True
    rate: float = 25_000.0  # events published per second
    chunk: int = 1_000
    partitions: int = 8
    seed: int = 0


@dataclass
class Workload:
    """What to publish, in order, and what the state must be afterwards."""

    steps: list[tuple[str, Any]]  # ("events", EventBatch) | ("json", bytes) | ("raw", (p, body))
    truth: Truth
    deleted: set[str]
    malformed: int
    duplicates: int
    events: int  # events in the steps, duplicates and malformed ones included


def build_workload(plan: ChaosPlan) -> Workload:
    """The steps of a chaos run and their ground truth (no NATS, no Ray)."""
    rng = np.random.default_rng(plan.seed)
    base = _base_events(plan, rng)
    base, deletions, deleted = _with_deletions(base, plan, rng)
    chunks = [base.slice(i, i + plan.chunk) for i in range(0, len(base), plan.chunk)]
    cut = len(chunks) * 3 // 5  # deletions go out after 60% of the stream
    steps: list[tuple[str, Any]] = [("events", c) for c in chunks[:cut]]
    steps.append(("events", deletions))
    steps += [("events", c) for c in chunks[cut:]]

    duplicates = 0
    budget = int(plan.events * plan.duplicate_fraction)
    while duplicates < budget:  # half whole batches resent, half single events repeated
        at = int(rng.integers(1, len(steps)))
        if duplicates < budget // 2:
            earlier = [s for s in steps[:at] if s[0] == "events" and s[1] is not deletions]
            if not earlier:
                continue
            again = earlier[int(rng.integers(0, len(earlier)))][1]
            again = again.slice(0, min(len(again), budget - duplicates))
        else:
            n = min(200, budget - duplicates)
            again = base.take(rng.integers(0, len(base), n))
        steps.insert(at, ("events", again))
        duplicates += len(again)

    malformed = 0
    target = max(3, int(plan.events * plan.malformed_fraction))
    kind = 0
    while malformed < target:
        at = int(rng.integers(0, len(steps) + 1))
        step, count = _malformed_step(kind, malformed, plan, rng)
        steps.insert(at, step)
        malformed += count
        kind = (kind + 1) % 3

    truth = {u: c for u, c in truth_of(base).items() if u not in deleted}
    events = sum(len(s[1]) if s[0] == "events" else 0 for s in steps)
    return Workload(steps, truth, deleted, malformed, duplicates, events)


def _base_events(plan: ChaosPlan, rng: np.random.Generator) -> EventBatch:
    kinds = [TYPE_CODE[t] for t in EventType if t not in (EventType.USER_DELETED,)]
    n = plan.events
    return EventBatch(
        event_id=[f"chaos-{plan.seed}-{i}" for i in range(n)],
        user_id=[f"cu{x}" for x in rng.integers(0, plan.users, n)],
        type=rng.choice(kinds, size=n).astype(np.uint8),
        ts=1_700_000_000_000 + np.sort(rng.integers(0, 7 * 86_400_000, n)),
        item_id=[f"item-{x}" for x in rng.zipf(1.4, n) % 1000],
        category=[f"cat-{x}" for x in rng.integers(0, 20, n)],
        value=np.round(rng.random(n) * 20, 2),
        source=np.zeros(n, dtype=np.uint8),
    )


def _with_deletions(
    base: EventBatch, plan: ChaosPlan, rng: np.random.Generator
) -> tuple[EventBatch, EventBatch, set[str]]:
    """Pick users to delete at 60% of the stream; drop their later events."""
    cut_index = (len(base) // plan.chunk * 3 // 5) * plan.chunk
    early = sorted(set(base.user_id[:cut_index]))
    deleted = {early[i] for i in rng.choice(len(early), size=plan.deletions, replace=False)}
    keep = [i for i, u in enumerate(base.user_id) if i < cut_index or u not in deleted]
    base = base.take(keep)
    users = sorted(deleted)
    deletions = EventBatch(
        event_id=[f"chaos-delete-{u}" for u in users],
        user_id=users,
        type=np.full(len(users), TYPE_CODE[EventType.USER_DELETED], dtype=np.uint8),
        ts=np.full(len(users), int(base.ts[cut_index - 1]), dtype=np.int64),
        item_id=[None] * len(users),
        category=[None] * len(users),
        value=np.full(len(users), np.nan),
        source=np.zeros(len(users), dtype=np.uint8),
    )
    return base, deletions, deleted


def _malformed_step(
    kind: int, serial: int, plan: ChaosPlan, rng: np.random.Generator
) -> tuple[tuple[str, Any], int]:
    """One malformed step and how many dead letters it must make."""
    if kind == 0:  # bad JSON events at the producer: unknown type, no user, far future
        events = [
            {"event_id": f"bad-{serial}-a", "user_id": "x", "type": "teleport", "ts": 1.7e12},
            {"event_id": f"bad-{serial}-b", "type": "click", "ts": 1_700_000_000_000},
            {"event_id": f"bad-{serial}-c", "user_id": "y", "type": "click", "ts": FAR_FUTURE_MS},
        ]
        return ("json", orjson.dumps(events)), len(events)
    if kind == 1:  # a body that is not the wire format, straight to a partition
        partition = int(rng.integers(0, plan.partitions))
        return ("raw", (partition, f"\x00garbage {serial}".encode())), 1
    # a wire batch whose rows break the rules (skipping the producer's checks)
    bad = EventBatch(
        event_id=[f"badrow-{serial}-{i}" for i in range(4)],
        user_id=["", "cu-bad-1", "cu-bad-2", "cu-bad-3"],
        type=np.array([1, 200, 1, 1], dtype=np.uint8),
        ts=np.array([1_700_000_000_000, 1_700_000_000_000, FAR_FUTURE_MS, 5], dtype=np.int64),
        item_id=[None] * 4,
        category=[None] * 4,
        value=np.full(4, np.nan),
        source=np.zeros(4, dtype=np.uint8),
    )
    partition = int(rng.integers(0, plan.partitions))
    return ("raw", (partition, encode(bad))), 4


@dataclass
class ChaosResult:
    """What happened, and whether the state came out exact."""

    plan: ChaosPlan
    events_published: int
    duplicates: int
    malformed: int
    dead_letters: int
    users_checked: int
    mismatched_users: list[str]
    deleted_present: list[str]
    kills: list[dict[str, Any]] = field(default_factory=list)
    nats_restart_s: float | None = None
    publish_s: float = 0.0
    settle_s: float = 0.0

    @property
    def exact(self) -> bool:
        """Every count right, every dead letter once, every deleted user gone."""
        return (
            not self.mismatched_users
            and not self.deleted_present
            and self.dead_letters == self.malformed
        )

    def recovery_times(self, key: str = "consuming_after_s") -> list[float]:
        """Per kill, seconds from the kill to the restarted shard consuming (or caught up)."""
        return [k[key] for k in self.kills if k.get(key) is not None]


async def run_chaos(
    plan: ChaosPlan,
    server: EmbeddedNats,
    pool: ShardPool,
    streams: StreamNames,
    settle_timeout_s: float = 300.0,
) -> ChaosResult:
    """Publish the workload while killing shards and restarting NATS; check the state."""
    workload = build_workload(plan)
    progress = {"events": 0}
    result = ChaosResult(
        plan, workload.events, workload.duplicates, workload.malformed, 0, 0, [], []
    )
    started = time.monotonic()
    publishing = asyncio.create_task(_publish(server.url, workload, plan, progress))
    chaos = asyncio.create_task(_inject(plan, server, pool, workload, progress, result))
    await publishing
    result.publish_s = time.monotonic() - started
    await chaos
    settle_from = time.monotonic()
    await _settled(server.url, pool, streams, settle_timeout_s)
    result.settle_s = time.monotonic() - settle_from
    await _check(server.url, pool, streams, workload, result)
    return result


async def _connect(url: str) -> Client:
    return await nats.connect(
        url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, error_cb=_expected
    )


async def _expected(exc: Exception) -> None:
    """Connection errors are the point of the run (NATS restarts); nats-py would print them."""


async def _publish(url: str, workload: Workload, plan: ChaosPlan, progress: dict[str, int]) -> None:
    """Publish every step at ``plan.rate``; retry what NATS refuses while it is away."""
    nc = await _connect(url)
    js = nc.jetstream()
    # Every producer message id is new, so a batch sent again is caught only by
    # event-id de-duplication; a message resent across the NATS restart keeps
    # its id and is dropped by JetStream's duplicate window.
    producer = Producer(js, plan.partitions, max_batch=500, producer_id=f"chaos-{plan.seed}")
    await producer.start()
    started = time.monotonic()
    sent = 0
    try:
        for index, (kind, payload) in enumerate(workload.steps):
            if kind == "events":
                await _retry(lambda b=payload: producer.send(b))
                sent += len(payload)
            elif kind == "json":
                await _retry(lambda raw=payload: producer.send_json(raw))
            else:
                partition, body = payload
                headers = {MSG_ID_HEADER: f"chaos-raw-{plan.seed}-{index}"}
                await _retry(
                    lambda p=partition, b=body, h=headers: js.publish(
                        events_subject(p), b, headers=h, timeout=5
                    )
                )
            progress["events"] = sent
            ahead = sent / plan.rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
        await _retry(producer.flush)
        await producer.close()
    finally:
        await nc.close()


async def _retry(call: Any, timeout_s: float = 120.0) -> Any:
    """Await ``call()`` until NATS takes it (it may be restarting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await call()
        except (AudienceError, nats.errors.Error, OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _inject(
    plan: ChaosPlan,
    server: EmbeddedNats,
    pool: ShardPool,
    workload: Workload,
    progress: dict[str, int],
    result: ChaosResult,
) -> None:
    """Kill shards at evenly spread points of the stream; restart NATS once in between."""
    rng = random.Random(plan.seed)
    points = [(i + 1) / (plan.kills + 1) for i in range(plan.kills)]
    actions: list[tuple[float, str]] = [(p, "kill") for p in points]
    if plan.restart_nats:
        actions.append((0.5 + 0.5 / (plan.kills + 2), "nats"))
    measuring = []
    for fraction, action in sorted(actions):
        while progress["events"] < fraction * workload.events * 0.9:
            await asyncio.sleep(0.05)
        if action == "nats":
            # Once the shards killed so far are back: each kill's recovery time is
            # then its own, not that of a kill during a NATS outage (also covered
            # for correctness by the shards' start retries, but slower).
            await asyncio.gather(*measuring)
            began = time.monotonic()
            await asyncio.to_thread(server.restart)
            result.nats_restart_s = time.monotonic() - began
            continue
        victim, before = await _live_shard(pool, rng)
        measuring.append(asyncio.create_task(_kill_and_time(pool, victim, before, result)))
    await asyncio.gather(*measuring)


async def _live_shard(pool: ShardPool, rng: random.Random) -> tuple[int, float]:
    """A random shard that is up, caught up and has a snapshot.

    So each kill's recovery is measured alone, and every kill exercises a
    restore plus replay (on a busy machine the first timed snapshot can come late).
    """
    while True:
        victim = rng.randrange(len(pool.handles))
        try:
            counters = await pool.handles[victim].counters.remote()
        except ray.exceptions.RayActorError:
            counters = None
        if counters and not counters["recovering"] and counters["checkpoint"]:
            return victim, counters["started_at"]
        await asyncio.sleep(0.1)


async def _kill_and_time(pool: ShardPool, victim: int, before: float, result: ChaosResult) -> None:
    """Kill one shard actor; time until its next incarnation consumes and has caught up."""
    handle = pool.handles[victim]
    killed_at = time.time()
    ray.kill(handle, no_restart=False)
    record: dict[str, Any] = {"shard": victim, "killed_at": killed_at}
    result.kills.append(record)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            counters = await handle.counters.remote()
        except ray.exceptions.RayActorError:
            counters = None
        if counters and counters["started_at"] != before:
            recovery = counters["recovery"]
            if "consuming_at" in recovery and "consuming_after_s" not in record:
                record["consuming_after_s"] = round(recovery["consuming_at"] - killed_at, 3)
                record["restored"] = recovery.get("restored")
                record["restore_s"] = recovery.get("restore_s")
            if "caught_up_at" in recovery:
                record["caught_up_after_s"] = round(recovery["caught_up_at"] - killed_at, 3)
                return
        await asyncio.sleep(0.05)


async def _settled(url: str, pool: ShardPool, streams: StreamNames, timeout_s: float) -> None:
    """Wait until every shard is caught up with the whole stream."""
    nc = await _connect(url)
    js = nc.jetstream()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            ends = {}
            for partition in range(pool.spec.partitions):
                try:
                    last = await js.get_last_msg(streams.events, events_subject(partition))
                    ends[partition] = int(last.seq or 0)
                except NotFoundError:
                    ends[partition] = 0
            try:
                counters = await asyncio.gather(*(h.counters.remote() for h in pool.handles))
            except ray.exceptions.RayActorError:
                counters = []
            positions = {int(p): s for c in counters for p, s in c["positions"].items()}
            done = counters and all(not c["recovering"] for c in counters)
            if done and all(positions.get(p, 0) >= end for p, end in ends.items()):
                return
            if time.monotonic() > deadline:
                behind = {p: (positions.get(p, 0), end) for p, end in ends.items()}
                states = [
                    {k: c.get(k) for k in ("recovering", "recovery", "applied_events", "pid")}
                    for c in counters
                ]
                raise AssertionError(f"shards not caught up in {timeout_s} s: {behind}; {states}")
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def _check(
    url: str, pool: ShardPool, streams: StreamNames, workload: Workload, result: ChaosResult
) -> None:
    """Compare every user's counts with the truth; count dead letters; look for the deleted."""
    users = sorted(workload.truth)
    profiles = []
    for start in range(0, len(users), 1000):
        while True:
            try:
                profiles += await pool.profiles(users[start : start + 1000])
                break
            except ShardRecovering:
                await asyncio.sleep(0.2)
    result.mismatched_users = mismatched(profiles, workload.truth)
    result.users_checked = len(users)
    gone = sorted(workload.deleted)
    result.deleted_present = [u for u, p in zip(gone, await pool.profiles(gone), strict=True) if p]
    nc = await _connect(url)
    try:
        result.dead_letters = sum((await dead_letter_counts(nc.jetstream(), streams)).values())
    finally:
        await nc.close()


async def prepare(url: str, streams: StreamNames) -> None:
    """Create the streams of a fresh server."""
    nc = await _connect(url)
    try:
        await ensure_streams(nc.jetstream(), streams)
    finally:
        await nc.close()
