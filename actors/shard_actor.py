"""The Ray edge of a shard: an async actor that consumes its partitions itself.

There is no router hop: the actor pulls its own subjects from JetStream, so
events go stream -> shard in one step, and queries are answered from the same
event loop between two applied batches.

Recovery: Ray restarts a dead shard actor by running its constructor again
(``max_restarts=-1``). The constructor restores the newest usable snapshot,
then replays each partition from the snapshot's position. Until every
partition has reached the end its stream had when the actor started, state
queries raise :class:`~actors.errors.ShardRecovering` (HTTP 503 with
Retry-After) instead of answering from a state that is behind.

Dead letters are published with their stream position as message id and held
until the stream acknowledges them; a snapshot is only taken when none is
waiting, so a restore never loses one and a replay never doubles one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import nats
import numpy as np
import ray
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from actors.checkpoint import SnapshotError
from actors.checkpoint_store import (
    CheckpointConfig,
    CheckpointStore,
    prune,
    shard_prefix,
    snapshot_name,
)
from actors.consumer import StreamReader
from actors.conversion import FunnelSpec
from actors.deadletter import DeadLetters
from actors.errors import ShardRecovering, UnavailableError
from actors.jetstream import server_list
from actors.metrics import ShardMetrics
from actors.partitioning import events_subject
from actors.shard import Shard
from actors.state import StateRules, UserRows
from actors.validation import Rejection, ValidationPolicy
from actors.windows import WindowConfig

log = logging.getLogger(__name__)

MAX_HELD_DEAD_LETTERS = 10_000  # beyond this a shard stops consuming until NATS takes them
LAST_CHECKPOINT_TIMEOUT_S = 15.0  # a stop must finish within the pool's shutdown budget
STOP_STEP_TIMEOUT_S = 5.0
START_RETRY_S = 0.25  # between attempts to start while NATS is away


@ray.remote(max_restarts=-1, max_task_retries=0)
class ShardActor:
    """Owns partitions: consumes them, keeps their users' state, answers queries."""

    def __init__(
        self,
        shard_id: int,
        partitions: Sequence[int],
        nats_url: str,
        stream: str,
        rules: StateRules | None = None,
        policy: ValidationPolicy | None = None,
        max_messages_per_apply: int = 32,
        windows: WindowConfig | None = None,
        funnel: FunnelSpec | None = None,
        checkpoints: CheckpointConfig | None = None,
    ) -> None:
        self.shard = Shard(shard_id, partitions, rules, policy, windows, funnel)
        self.nats_url = nats_url
        self.stream = stream
        self.max_messages_per_apply = max_messages_per_apply
        self.checkpoints = checkpoints or CheckpointConfig()
        self._nc: Client | None = None
        self._reader: StreamReader | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._timer_task: asyncio.Task[None] | None = None
        self._dead_letters: DeadLetters | None = None
        self._held_dead_letters: list[Rejection] = []
        self._store: CheckpointStore | None = None
        self._checkpointing = asyncio.Lock()
        self._last_checkpoint: dict[str, Any] | None = None
        self._checkpoint_failures = 0
        self._targets: dict[int, int] | None = None  # stream ends to reach before answering
        self.started_at = time.time()  # tells incarnations apart after a restart
        self.recovery: dict[str, Any] = {"started_at": self.started_at, "restored": None}
        self._metrics = ShardMetrics(shard_id)
        # Ray runs an async actor's constructor inside its event loop, so
        # consumption starts here, also when Ray restarts a dead actor.
        self._starting = asyncio.get_running_loop().create_task(self._start())
        self._starting.add_done_callback(self._log_crash)

    async def start(self) -> dict[str, Any]:
        """Wait until the shard consumes (raising if it could not start); its status."""
        await asyncio.shield(self._starting)
        return self.shard.status()

    async def _start(self) -> None:
        """Connect, restore, find the stream ends, consume; retried until NATS answers."""
        while True:
            try:
                await self._start_once()
                return
            except Exception as exc:  # NATS away or restarting mid-way: every step is retried
                log.warning("shard %s cannot start yet: %r", self.shard.shard_id, exc)
                await asyncio.sleep(START_RETRY_S)

    async def _start_once(self) -> None:
        if self._nc is None:
            self._nc = await nats.connect(
                server_list(self.nats_url),
                name=f"audience-shard-{self.shard.shard_id}",
                max_reconnect_attempts=-1,
                reconnected_cb=self._reconnected,
            )
        js = self._nc.jetstream()
        self._dead_letters = DeadLetters(js, origin=f"shard:{self.shard.shard_id}")
        self._store = self.checkpoints.open(js)
        if self.recovery["restored"] is None:
            self.recovery["restored"] = await self._restore_newest(self._store)
        self._targets = await self._stream_ends(js)
        if self._reader is not None:  # a start that failed after creating it: retire it
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader.stop(), STOP_STEP_TIMEOUT_S)
        self._reader = StreamReader(self._nc, js, self.stream, dict(self.shard.positions))
        await self._reader.start()
        self.recovery["consuming_at"] = time.time()
        self._loop_task = asyncio.create_task(self._consume())
        self._loop_task.add_done_callback(self._log_crash)
        if self.checkpoints.interval_s > 0:
            self._timer_task = asyncio.create_task(self._checkpoint_forever())
            self._timer_task.add_done_callback(self._log_crash)
        self._check_caught_up()

    async def _restore_newest(self, store: CheckpointStore) -> str:
        """Restore the newest usable snapshot; its name, or "" for none (full replay)."""
        names = await store.names(shard_prefix(self.checkpoints.scope, self.shard.shard_id))
        for name in reversed(names):
            started = time.perf_counter()
            blob = await store.load(name)
            try:
                header = self.shard.restore(blob)
            except SnapshotError as exc:
                log.warning("shard %s: snapshot %s unusable (%s)", self.shard.shard_id, name, exc)
                continue
            self.recovery.update(
                restore_s=round(time.perf_counter() - started, 3),
                snapshot_bytes=len(blob),
                restored_positions=header.positions,
            )
            log.info("shard %s restored %s", self.shard.shard_id, name)
            return name
        if names:
            log.warning(
                "shard %s: no usable snapshot; replaying from the start", self.shard.shard_id
            )
        return ""

    async def _stream_ends(self, js: JetStreamContext) -> dict[int, int]:
        """The last stream sequence of each partition right now (0 for an empty one)."""
        ends = {}
        for partition in self.shard.partitions:
            try:
                last = await js.get_last_msg(self.stream, events_subject(partition))
                ends[partition] = int(last.seq or 0)
            except NotFoundError:
                ends[partition] = 0
        return ends

    def _check_caught_up(self) -> None:
        """Leave recovery once every partition reached the end it had at start."""
        if self._targets is None or "caught_up_at" in self.recovery:
            return
        positions = self.shard.positions
        if all(positions[p] >= end for p, end in self._targets.items()):
            self.recovery["caught_up_at"] = time.time()
            self.recovery["replayed_messages"] = self.shard.applied_messages

    @property
    def recovering(self) -> bool:
        """Whether state queries would see a state behind the stream's end at start."""
        return "caught_up_at" not in self.recovery

    def _ready(self) -> None:
        """Raise :class:`ShardRecovering` while the state is not caught up."""
        if not self.recovering:
            return
        if self._targets is None:
            detail = "restoring the newest snapshot"
        else:
            behind = sum(max(0, end - self.shard.positions[p]) for p, end in self._targets.items())
            detail = f"replaying its partitions ({behind} stream sequences to go)"
        raise ShardRecovering(self.shard.shard_id, detail)

    async def _reconnected(self) -> None:
        if self._reader is not None:
            self._reader.connection_restored()

    async def _consume(self) -> None:
        assert self._reader is not None and self._dead_letters is not None
        while True:
            if self._held_dead_letters:
                await self._publish_dead_letters()
                if len(self._held_dead_letters) >= MAX_HELD_DEAD_LETTERS:
                    await asyncio.sleep(START_RETRY_S)  # NATS is down: wait, hold no more
                    continue
            deliveries = await self._reader.take(self.max_messages_per_apply, timeout_s=0.5)
            self._metrics.record_lag(self._reader.pending_by_partition())
            if not deliveries:
                continue
            started = time.perf_counter()
            result = self.shard.apply(deliveries)
            self._metrics.record_apply(
                result.applied,
                time.perf_counter() - started,
                (d.stored_ns for d in deliveries),
                (r.reason.value for r in result.rejected),
            )
            self._check_caught_up()
            if result.rejected:
                self._held_dead_letters.extend(result.rejected)
                await self._publish_dead_letters()

    async def _publish_dead_letters(self) -> None:
        """Publish the held dead letters; keep them (counted) if NATS does not take them."""
        assert self._dead_letters is not None
        held, self._held_dead_letters = self._held_dead_letters, []
        try:
            await self._dead_letters.publish(held)
        except Exception as exc:  # same ids on the next try: JetStream keeps one copy
            self._held_dead_letters = held + self._held_dead_letters
            log.warning("shard %s holds %d dead letters: %r", self.shard.shard_id, len(held), exc)

    async def _checkpoint_forever(self) -> None:
        """Take a snapshot every interval when something changed (and none is in the way)."""
        while True:
            await asyncio.sleep(self.checkpoints.interval_s)
            last = self._last_checkpoint
            if last is not None and last["positions"] == self.shard.positions:
                continue
            if self.recovering or self._held_dead_letters:
                continue
            try:
                await self.checkpoint()
            except Exception as exc:  # the previous snapshot stays; try again next time
                self._checkpoint_failures += 1
                log.warning("shard %s: checkpoint failed: %r", self.shard.shard_id, exc)

    async def checkpoint(self) -> dict[str, Any]:
        """Snapshot the state with its positions now, store it, prune old ones.

        Raises:
            UnavailableError: dead letters still wait for NATS (the snapshot
                would skip past them) or the store is not open yet.
        """
        if self._store is None or self._held_dead_letters:
            raise UnavailableError(
                f"shard {self.shard.shard_id}", "snapshots wait for NATS to take dead letters", 2.0
            )
        async with self._checkpointing:
            started = time.perf_counter()
            created_ms = int(time.time() * 1000)
            header, blob = self.shard.snapshot(created_ms)  # synchronous: a consistent cut
            encoded_s = time.perf_counter() - started
            name = snapshot_name(self.checkpoints.scope, self.shard.shard_id, created_ms)
            await self._store.save(name, blob)
            pruned = await prune(
                self._store, self.checkpoints.scope, self.shard.shard_id, self.checkpoints.keep
            )
            self._last_checkpoint = {
                "name": name,
                "created_ms": created_ms,
                "positions": dict(header.positions),
                "bytes": len(blob),
                "encode_s": round(encoded_s, 3),
                "took_s": round(time.perf_counter() - started, 3),
                "pruned": len(pruned),
            }
            return dict(self._last_checkpoint)

    def _log_crash(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("shard %s is not consuming", self.shard.shard_id, exc_info=task.exception())

    async def users(self, limit: int) -> list[str]:
        """Up to ``limit`` ids of users this shard holds."""
        self._ready()
        return self.shard.table.users(limit)

    async def profiles(self, user_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Live profiles for ``user_ids``, None for unknown users."""
        self._ready()
        return self.shard.profiles(user_ids)

    async def user_rows(self, user_ids: Sequence[str]) -> UserRows:
        """Model-feature state of ``user_ids``: one call per shard per request batch."""
        self._ready()
        return self.shard.user_rows(user_ids)

    async def seen(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[list[bool]]:
        """Which candidate items each user has touched (see ``Shard.seen``)."""
        self._ready()
        return self.shard.seen(pairs)

    async def item_partial(self, top_n: int, known: int | None = None) -> dict[str, Any] | None:
        """Item stats and co-visitation partial of this shard (see ``Shard.item_partial``)."""
        self._ready()
        return self.shard.item_partial(top_n, known)

    async def insights_partials(self) -> dict[str, Any]:
        """This shard's insights partials (see ``Shard.insights_partials``), for the merge."""
        self._ready()
        return self.shard.insights_partials()

    async def counters(self) -> dict[str, Any]:
        """Cheap progress counters (no NATS round trips), for polling."""
        stats = self._nc.stats if self._nc is not None else {}
        return {
            "pid": os.getpid(),
            "applied_events": self.shard.applied_events,
            "applied_messages": self.shard.applied_messages,
            "users": len(self.shard.table),
            "reconnects": int(stats.get("reconnects", 0)),
            "in_msgs": int(stats.get("in_msgs", 0)),
            "consumer_gaps": self._reader.gaps if self._reader else 0,
            "consumer_resyncs": self._reader.resyncs if self._reader else 0,
            "recovering": self.recovering,
            "recovery": dict(self.recovery),
            "checkpoint": (self._last_checkpoint or {}).get("name"),
            "busy_s": self.shard.busy_s,
            "backlog": (
                sum(self._reader.pending_by_partition().values()) + self._reader.buffered
                if self._reader
                else 0
            ),
            "started_at": self.started_at,
            "positions": dict(self.shard.positions),
        }

    async def freshness_ring(self) -> tuple[int, np.ndarray]:
        """The raw store-to-applied delays (ms) of the latest messages; see Shard."""
        return self.shard.freshness_ring()

    async def status(self) -> dict[str, Any]:
        """Counters, positions and per-partition lag of this shard."""
        status = self.shard.status()
        if self._reader is not None:
            status["lag"] = await self._reader.lag()
            status["buffered_messages"] = self._reader.buffered
        status["consuming"] = self._loop_task is not None and not self._loop_task.done()
        status["started_at"] = self.started_at
        status["recovering"] = self.recovering
        status["recovery"] = dict(self.recovery)
        status["checkpoint"] = self._last_checkpoint
        status["checkpoint_failures"] = self._checkpoint_failures
        status["dead_letters_held"] = len(self._held_dead_letters)
        if self._reader is not None:
            status["consumer_resyncs"] = self._reader.resyncs
            status["consumer_gaps"] = self._reader.gaps
        return status

    async def stop(self) -> None:
        """Stop consuming, take a last snapshot (if configured) and close the connection."""
        if not self._starting.done():
            self._starting.cancel()
        for task in (self._timer_task, self._loop_task):
            if task is not None:
                task.cancel()
                # Bounded: a cancel that lands inside nats-py's publish can be lost
                # (Python 3.11), and a stop must not hang on it.
                await asyncio.wait({task}, timeout=STOP_STEP_TIMEOUT_S)
        self._timer_task = self._loop_task = None
        if self.checkpoints.on_stop and self._store is not None and not self.recovering:
            if self._held_dead_letters:
                await self._publish_dead_letters()
            try:
                await asyncio.wait_for(self.checkpoint(), timeout=LAST_CHECKPOINT_TIMEOUT_S)
            except Exception as exc:  # stopping goes on; the previous snapshot stays
                log.warning("shard %s: last checkpoint failed: %r", self.shard.shard_id, exc)
        if self._reader is not None:
            with contextlib.suppress(Exception):  # its consumers expire on their own anyway
                await asyncio.wait_for(self._reader.stop(), STOP_STEP_TIMEOUT_S)
            self._reader = None
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), STOP_STEP_TIMEOUT_S)
            self._nc = None
