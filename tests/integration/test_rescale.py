"""Live rebalancing: 2 -> 4 -> 1 shards while events flow and queries are answered.

The stream never stops: a publisher sends events the whole time, a reader asks
for users' profiles the whole time, and the pool rescales twice in between.
The reader must get an answer every time (from the old owner until a
hand-off completes, from the new one after), never see a user's count go
backwards, and the end state must equal the events exactly.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import nats
import pytest
import ray

from actors.checkpoint_store import CheckpointConfig
from actors.jetstream import StreamNames
from actors.pool import NAMESPACE, PoolSpec, ShardPool, shard_name
from actors.producer import Producer
from actors.shard_queries import QueryClient
from actors.windows import WindowConfig
from cluster.autoscaling import ScalingPolicy
from cluster.launcher import Platform
from cluster.nats_server import EmbeddedNats
from cluster.scaling_controller import ScalingController
from tests.support.chaos import prepare
from tests.support.events import event, random_batch
from tests.support.truth import assert_counts, settled_profiles, truth_of
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

PARTITIONS = 8
STREAMS = StreamNames(events="RESCALE_EVENTS", dlq="RESCALE_DLQ")
BATCHES = 40
BATCH_EVENTS = 1500


@pytest.fixture(scope="module")
def nats_for_rescale(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(tmp_path_factory.mktemp("nats-rescale")) as server:
        asyncio.run(prepare(server.url, STREAMS))
        yield server


def _spec(url: str, name: str) -> PoolSpec:
    """A pool of two shards over the module's stream, snapshots only at hand-offs."""
    return PoolSpec(
        PARTITIONS,
        2,
        url,
        STREAMS.events,
        shard_cpus=0.25,
        name=name,
        checkpoints=CheckpointConfig(interval_s=0),
    )


class Reader:
    """Asks for the same users' profiles, model rows, and every partition's partials, in a loop.

    Keeps what went wrong: a failed call, a user's count going backwards (in a
    profile or in the rows the models read, over NATS when the pool asks there),
    an aggregate answer that misses a partition (or holds one twice).
    """

    def __init__(self, pool: ShardPool, users: list[str]) -> None:
        self.pool = pool
        self.users = users
        self.answers = 0
        self.fanouts = 0
        self.errors: list[str] = []
        self.backwards: list[str] = []
        self.partial_counts: set[int] = set()
        self._last: dict[str, int] = {}
        self._rows_last: dict[str, int] = {}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                profiles = await self.pool.profiles(self.users)
                rows = await self.pool.user_rows(self.users)
                partials = await self.pool.insights_partials()
            except Exception as exc:  # every failure is a finding
                self.errors.append(repr(exc))
                await asyncio.sleep(0.05)
                continue
            self.answers += 1
            self.partial_counts.add(len(partials))
            for user, profile in zip(self.users, profiles, strict=True):
                events = profile["events"] if profile else 0
                if events < self._last.get(user, 0):
                    self.backwards.append(f"{user}: {self._last[user]} -> {events}")
                self._last[user] = events
            for user, counts in zip(rows.user_ids, rows.counts.sum(axis=1).tolist(), strict=True):
                if counts < self._rows_last.get(user, 0):
                    self.backwards.append(f"{user} rows: {self._rows_last[user]} -> {counts}")
                self._rows_last[user] = counts
            await asyncio.sleep(0.01)


async def _publish(url: str, batches: list[Any], every_s: float) -> None:
    nc = await nats.connect(url)
    # A producer id of its own: message ids repeat per id, and JetStream drops repeats.
    producer = await Producer(nc.jetstream(), PARTITIONS, producer_id=uuid.uuid4().hex).start()
    for batch in batches:
        await producer.send(batch)
        await asyncio.sleep(every_s)
    await producer.close()
    await nc.close()


async def _scenario(url: str, pool: ShardPool, batches: list[Any]) -> dict[str, Any]:
    truth = truth_of(*batches)
    sample = sorted(truth)[:: max(1, len(truth) // 40)]
    reader = Reader(pool, sample)
    # Another process's view: a pool that learns each layout from the shards, and
    # reads the rows over NATS as the model replicas do.
    queries = QueryClient(pool.spec.nats_url, None, pool.spec.scope)
    elsewhere = Reader(ShardPool.connect(pool.spec, queries), sample)
    stop = asyncio.Event()
    publishing = asyncio.create_task(_publish(url, batches, every_s=0.1))
    reading = asyncio.gather(reader.run(stop), elsewhere.run(stop))
    await asyncio.sleep(1.0)
    up = await pool.rescale(4)
    assert len(pool.handles) == 4
    await asyncio.sleep(1.0)
    down = await pool.rescale(1)
    await publishing
    profiles = await settled_profiles(pool, truth, timeout_s=120)
    stop.set()
    await reading
    assert_counts(profiles, truth)
    # The reads went over NATS. A shard the rescale removes has no responder on its
    # subject any more: a read sent to it just then falls back to the Ray call, which
    # reports the shard gone, and the pool re-reads the layout (the readers' checks above
    # say no answer was wrong or missing).
    assert queries.answered >= elsewhere.answers
    await queries.close()
    return {"up": up, "down": down, "readers": [reader, elsewhere], "pool": pool}


def test_rescale_two_to_four_to_one_while_streaming_keeps_counts_exact(
    ray_local: int, nats_for_rescale: EmbeddedNats
) -> None:
    url = nats_for_rescale.url
    spec = _spec(url, "rescale")
    pool = ShardPool.create(spec)
    batches = [
        random_batch(
            BATCH_EVENTS, 600, seed=600 + i, t0=1_700_000_000_000 + i * 60_000, prefix="rs-"
        )
        for i in range(BATCHES)
    ]
    try:
        started = time.perf_counter()
        result = asyncio.run(_scenario(url, pool, batches))
        took_s = time.perf_counter() - started
        up, down = result["up"], result["down"]
        for reader in result["readers"]:
            assert not reader.errors, reader.errors[:5]
            assert not reader.backwards, reader.backwards[:5]
            assert reader.partial_counts == {PARTITIONS}  # each partition once, always
            assert reader.answers > 10  # it really asked throughout
        # Every moved partition went through a hand-off snapshot, none replayed.
        assert up["moved"] == up["handed_over"] == 4
        assert down["moved"] == down["handed_over"] == 6
        assert pool.layout.version == 3 and pool.layout.owners == (0,) * PARTITIONS
        for gone in (1, 2, 3):
            with pytest.raises(ValueError):
                ray.get_actor(shard_name("rescale", gone), namespace=NAMESPACE)
        # Another process's view: the layout is read from the shards, not assumed.
        other = ShardPool.connect(spec)
        asyncio.run(other.refresh())
        assert other.layout.version == 3 and len(other.handles) == 1
        statuses = asyncio.run(pool.status())
        assert statuses[0]["applied_events"] == BATCHES * BATCH_EVENTS
        answers = [r.answers for r in result["readers"]]
        _record({"up": up, "down": down, "answers": answers, "took_s": took_s})
    finally:
        pool.shutdown()


def _record(result: dict[str, Any]) -> None:
    """Keep the timings for the bench report when asked to (RESCALE_REPORT=path)."""
    path = os.environ.get("RESCALE_REPORT")
    if path:
        with open(path, "w") as out:
            json.dump(result, out, indent=2, default=str)


def test_the_autoscaling_controller_applies_its_decision_live(
    ray_local: int, nats_for_rescale: EmbeddedNats
) -> None:
    url = nats_for_rescale.url
    spec = _spec(url, "autoscaled")
    pool = ShardPool.create(spec)
    # Bounds of exactly three shards: whatever the load, the decision is "3".
    policy = ScalingPolicy(min_shards=3, max_shards=3, up_window_s=0, down_window_s=0)
    controller = ScalingController.options(  # type: ignore[attr-defined]
        name="autoscaled-controller", namespace=NAMESPACE
    ).remote(spec, policy, every_s=0.5, apply=True)
    batch = random_batch(6000, 400, seed=700, prefix="as-")
    try:
        asyncio.run(_publish(url, [batch], every_s=0))

        def rescaled() -> dict[str, Any] | None:
            decisions = ray.get(controller.decisions.remote())["decisions"]
            done = [d for d in decisions if "rescale" in d]
            return done[-1] if done else None

        decision = wait_until(rescaled, timeout_s=60)
        assert decision["current"] == 2 and decision["desired"] == 3
        assert decision["rescale"]["to"] == 3 and decision["rescale"]["moved"] > 0
        assert "error" not in decision["rescale"]
        asyncio.run(pool.refresh())
        assert len(pool.handles) == 3 and pool.layout.shards == 3
        profiles = asyncio.run(settled_profiles(pool, truth_of(batch)))
        assert_counts(profiles, truth_of(batch))
    finally:
        ray.kill(controller, no_restart=True)
        pool.shutdown()


def test_the_api_rescales_the_platform_live_and_back(platform: Platform, api: httpx.Client) -> None:
    assert platform.pool is not None
    users = [f"api-rescale-{i}" for i in range(40)]
    sent = [event(u, "click", ts="2026-01-05T10:00:00Z") for u in users for _ in range(3)]
    assert api.post("/v1/events", json=sent).status_code == 202

    def not_applied() -> list[str]:
        """The users not answered 200 with their three clicks, with what came instead."""
        answers = [(u, api.get(f"/v1/users/{u}")) for u in users]
        return [
            f"{u}: {a.status_code} {a.text[:120]}"
            for u, a in answers
            if a.status_code != 200 or a.json()["counts"]["click"] != 3
        ]

    def all_applied() -> bool:
        return not not_applied()

    wait_until(all_applied, timeout_s=60)
    try:
        grown = api.post("/v1/shards", json={"shards": 3})
        assert grown.status_code == 200, grown.text
        assert grown.json()["from"] == 2 and grown.json()["to"] == 3
        assert grown.json()["moved"] == grown.json()["handed_over"] > 0
        wrong = not_applied()
        assert not wrong, wrong[:5]  # answered at once by the new owners, counts unchanged
        assert len(api.get("/v1/status").json()["shards"]) == 3

        too_many = api.post("/v1/shards", json={"shards": platform.settings.partitions + 1})
        assert too_many.status_code == 400 and "shards" in too_many.json()["detail"]
        assert api.post("/v1/shards", json={"shards": 0}).status_code == 422
    finally:
        back = api.post("/v1/shards", json={"shards": 2})
        asyncio.run(platform.pool.refresh())  # the launcher's own handles, for later tests
    assert back.status_code == 200, back.text
    assert len(platform.pool.handles) == 2
    assert all_applied()


def test_a_pool_of_another_process_rescales_with_the_shards_own_settings(
    ray_local: int, nats_for_rescale: EmbeddedNats
) -> None:
    """A pool that only connected (the API's, the controller's) knows no settings.

    The new shard must be built like the running ones: with other windows its
    hand-off snapshots would be refused (another configuration) and it would
    replay its partitions, answering "recovering" meanwhile (seen in CI).
    """
    url = nats_for_rescale.url
    windows = WindowConfig(allowed_lateness_ms=20 * 365 * 86_400_000)
    pool = ShardPool.create(_spec(url, "elsewhere"), windows=windows)
    batch = random_batch(3000, 300, seed=900, prefix="el-")
    try:
        asyncio.run(_publish(url, [batch], every_s=0))
        truth = truth_of(batch)
        asyncio.run(settled_profiles(pool, truth))
        other = ShardPool.connect(pool.spec)
        report = asyncio.run(other.rescale(3))
        assert report["moved"] == report["handed_over"] > 0
        new = other.handles[2]
        assert ray.get(new.construction.remote())["windows"] == windows
        assert not ray.get(new.counters.remote())["recovering"]  # nothing to replay
        assert_counts(asyncio.run(other.profiles(sorted(truth))), truth)  # at once
    finally:
        pool.shutdown()


def test_a_rescale_whose_driver_dies_half_way_converges_exactly(
    ray_local: int, nats_for_rescale: EmbeddedNats
) -> None:
    """The layout is stored and shard 1 released its partitions, then nobody goes on.

    Every shard follows the stored layout on its own after LAYOUT_GRACE_S: shard 0
    adopts the released partitions from their hand-off snapshots, shard 1 lets
    them go; queries meanwhile are answered (from shard 1's released copies),
    the counts end exact, and the next rescale is not held up by the dead one.
    """
    url = nats_for_rescale.url
    pool = ShardPool.create(_spec(url, "orphaned"))
    first = random_batch(3000, 300, seed=800, prefix="or-")
    later = random_batch(3000, 300, seed=801, prefix="or-")
    try:
        asyncio.run(_publish(url, [first], every_s=0))
        asyncio.run(settled_profiles(pool, truth_of(first)))
        new = pool.layout.rescaled(1)
        ray.get(pool.handles[0].store_layout.remote(new.to_json(), pool.layout.version))
        released = ray.get(pool.handles[1].release.remote(new.to_json()))
        assert sorted(released) == pool.layout.partitions_of(1)
        # The driver is gone. Events go on; shard 1 still answers for its users.
        asyncio.run(_publish(url, [later], every_s=0))

        def converged() -> bool:
            counters = ray.get([h.counters.remote() for h in pool.handles])
            return (
                counters[0]["partitions"] == list(range(PARTITIONS))
                and not counters[1]["partitions"]
            )

        wait_until(converged, timeout_s=60, every_s=0.5)
        truth = truth_of(first, later)
        assert_counts(asyncio.run(settled_profiles(pool, truth)), truth)
        report = asyncio.run(pool.rescale(2))  # not refused: the orphaned one settled
        assert report["from"] == 1 and report["to"] == 2 and report["moved"] > 0
        assert_counts(asyncio.run(settled_profiles(pool, truth)), truth)
    finally:
        pool.shutdown()
