"""Events published through the producer end up, exactly, in the owning shards' state."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
import pytest
import ray

from actors.events import EVENT_TYPES
from actors.nats_auth import NatsCredentials, connect
from actors.partitioning import events_subject
from actors.producer import Producer
from cluster.launcher import Platform
from tests.support.events import event, random_batch
from tests.support.truth import Truth, settled_profiles, truth_of
from tests.support.waiting import async_wait_until, wait_until

pytestmark = pytest.mark.integration


async def profiles_when_applied(platform: Platform, truth: Truth) -> list[dict[str, Any]]:
    assert platform.pool is not None
    return await settled_profiles(platform.pool, truth, timeout_s=180)


async def dead_letters(
    url: str, admin: NatsCredentials | None, since_seq: int = 0
) -> list[tuple[str, str, bytes]]:
    """(subject, reason header, body) of every dead letter after ``since_seq``."""
    nc = await connect(url, admin)
    try:
        js = nc.jetstream()
        info = await js.stream_info("AUDIENCE_DLQ")
        out = []
        for seq in range(since_seq + 1, info.state.last_seq + 1):
            msg = await js.get_msg("AUDIENCE_DLQ", seq)
            out.append((msg.subject, (msg.headers or {}).get("Audience-Reason", ""), msg.data))
        return out
    finally:
        await nc.close()


async def dlq_last_seq(url: str, admin: NatsCredentials | None) -> int:
    nc = await connect(url, admin)
    try:
        return int((await nc.jetstream().stream_info("AUDIENCE_DLQ")).state.last_seq)
    finally:
        await nc.close()


def test_counts_per_user_equal_the_ground_truth_of_the_events_sent(platform: Platform) -> None:
    batch = random_batch(30_000, 800, seed=11, prefix="pipe-")

    async def run() -> list[dict[str, Any]]:
        nc = await connect(platform.nats_url, platform.credentials("producer"))
        producer = await Producer(nc.jetstream(), 8, max_batch=500).start()
        for start in range(0, len(batch), 3000):
            await producer.send(batch.take(range(start, min(start + 3000, len(batch)))))
        await producer.close()
        await nc.close()
        assert producer.published_events == len(batch)
        return await profiles_when_applied(platform, truth)

    truth = truth_of(batch)
    profiles = asyncio.run(run())
    for profile in profiles:
        expected = truth[profile["user_id"]]
        assert profile["counts"] == {t.value: expected[t.value] for t in EVENT_TYPES}
        own = [
            t
            for u, t in zip(batch.user_id, batch.ts.tolist(), strict=True)
            if u == profile["user_id"]
        ]
        assert (profile["first_seen_ms"], profile["last_seen_ms"]) == (min(own), max(own))


def test_a_resent_batch_with_the_same_message_id_is_applied_once(platform: Platform) -> None:
    batch = random_batch(400, 20, seed=12, prefix="dup-")

    async def run() -> list[dict[str, Any]]:
        nc = await connect(platform.nats_url, platform.credentials("producer"))
        js = nc.jetstream()
        producer = await Producer(js, 8, max_batch=10_000, producer_id="resender").start()
        await producer.send(batch)
        await producer.close()
        # A producer restarted with the same id re-sends the same numbered messages.
        again = await Producer(js, 8, max_batch=10_000, producer_id="resender").start()
        await again.send(batch)
        await again.close()
        await nc.close()
        return await profiles_when_applied(platform, truth)

    truth = truth_of(batch)
    profiles = asyncio.run(run())
    assert sum(p["events"] for p in profiles) == len(batch)


def test_malformed_events_land_in_the_dead_letter_subject_with_their_reasons(
    platform: Platform,
) -> None:
    items = [
        event("dlq-ok-1"),
        event("dlq-x", type="teleport"),
        event("", type="click"),
        event("dlq-y", ts="not a time"),
        event("dlq-z", surprise=1),
        event("dlq-ok-2", type="like"),
    ]

    async def run() -> tuple[list[tuple[str, str, bytes]], int]:
        before = await dlq_last_seq(platform.nats_url, platform.credentials("admin"))
        nc = await connect(platform.nats_url, platform.credentials("producer"))
        producer = await Producer(nc.jetstream(), 8).start()
        checked = await producer.send_json(orjson.dumps(items))
        await producer.close()
        await nc.close()
        await profiles_when_applied(
            platform, {"dlq-ok-1": Counter(page_view=1), "dlq-ok-2": Counter(like=1)}
        )
        return await dead_letters(platform.nats_url, platform.credentials("admin"), before), len(
            checked.batch
        )

    letters, accepted = asyncio.run(run())
    assert accepted == 2
    assert [(s, r) for s, r, _ in letters] == [
        ("audience.dlq.unknown_type", "unknown_type"),
        ("audience.dlq.missing_user", "missing_user"),
        ("audience.dlq.bad_timestamp", "bad_timestamp"),
        ("audience.dlq.unknown_field", "unknown_field"),
    ]
    assert [orjson.loads(body) for _, _, body in letters] == items[1:5]


def test_a_message_that_is_not_the_wire_format_is_dead_lettered_by_the_shard(
    platform: Platform,
) -> None:
    async def run() -> list[tuple[str, str, bytes]]:
        before = await dlq_last_seq(platform.nats_url, platform.credentials("admin"))
        nc = await connect(platform.nats_url, platform.credentials("producer"))
        await nc.jetstream().publish(events_subject(3), b"\x00 not a batch")
        await nc.close()

        async def letters() -> list[tuple[str, str, bytes]]:
            return await dead_letters(platform.nats_url, platform.credentials("admin"), before)

        return await async_wait_until(letters, timeout_s=120)

    letters = asyncio.run(run())
    assert letters == [("audience.dlq.bad_wire", "bad_wire", b"\x00 not a batch")]


def test_a_killed_shard_is_restarted_and_rebuilds_exact_state_from_the_stream(
    platform: Platform,
) -> None:
    assert platform.pool is not None
    pool = platform.pool
    batch = random_batch(5000, 100, seed=13, prefix="crash-")
    truth = truth_of(batch)

    async def publish() -> None:
        nc = await connect(platform.nats_url, platform.credentials("producer"))
        producer = await Producer(nc.jetstream(), 8).start()
        await producer.send(batch)
        await producer.close()
        await nc.close()

    asyncio.run(publish())
    asyncio.run(profiles_when_applied(platform, truth))
    victim = pool.owner(batch.user_id[0])
    before = ray.get(pool.handles[victim].status.remote())["started_at"]
    ray.kill(pool.handles[victim], no_restart=False)

    def restarted() -> bool:
        try:
            status = ray.get(pool.handles[victim].status.remote(), timeout=10)
        except ray.exceptions.RayError:
            return False
        return bool(status["started_at"] != before)

    wait_until(restarted, timeout_s=120)
    profiles = asyncio.run(profiles_when_applied(platform, truth))
    for profile in profiles:
        expected = truth[profile["user_id"]]
        assert profile["counts"] == {t.value: expected[t.value] for t in EVENT_TYPES}
