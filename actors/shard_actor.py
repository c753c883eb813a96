"""The Ray edge of a shard: an async actor that consumes its partitions itself.

There is no router hop: the actor pulls its own subjects from JetStream, so
events go stream -> shard in one step, and queries are answered from the same
event loop between two applied batches.

Each partition keeps its own state (see :mod:`actors.partition_set`) and its
own snapshots, named by partition, not by shard. Which partitions an actor
owns comes from the pool's stored :class:`~actors.layout.Layout`: a rescale
hands partitions over (release on the old owner: a snapshot at a position;
adopt on the new owner: restore it and go on from that position), and an
actor that Ray restarts reads the stored layout rather than its first
arguments.

Recovery: Ray restarts a dead shard actor by running its constructor again
(``max_restarts=-1``). The constructor restores each owned partition's newest
usable snapshot, then replays the partition from the snapshot's position.
Until every partition has reached the end its stream had when the actor
started, state queries raise :class:`~actors.errors.ShardRecovering` (HTTP 503
with Retry-After) instead of answering from a state that is behind.

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
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from actors.checkpoint import SnapshotError
from actors.checkpoint_store import (
    CheckpointConfig,
    CheckpointStore,
    partition_of_name,
    prune,
    snapshot_name,
)
from actors.consumer import StreamReader
from actors.conversion import FunnelSpec
from actors.deadletter import DeadLetters
from actors.errors import AudienceError, ShardRecovering, UnavailableError
from actors.latency import LatencyRing
from actors.layout import Layout
from actors.layout_store import LayoutStore
from actors.metrics import ShardMetrics
from actors.nats_auth import NatsCredentials
from actors.nats_auth import connect as nats_connect
from actors.partitioning import events_subject
from actors.shard import Shard, encode_partitions, partition_configs
from actors.shard_queries import query_subject, respond
from actors.state import StateRules, UserRows
from actors.validation import Rejection, ValidationPolicy
from actors.windows import WindowConfig

log = logging.getLogger(__name__)

MAX_HELD_DEAD_LETTERS = 10_000  # beyond this a shard stops consuming until NATS takes them
LAST_CHECKPOINT_TIMEOUT_S = 15.0  # a stop must finish within the pool's shutdown budget
STOP_STEP_TIMEOUT_S = 5.0
START_RETRY_S = 0.25  # between attempts to start while NATS is away
MAX_MESSAGES_PER_APPLY = 256  # a step: all its partitions in one pass
MAX_BYTES_PER_APPLY = (
    4 * 1024 * 1024
)  # ... and at most about this much (tens of thousands of events)
FOLD_WAKE_S = 0.05  # while events wait for the aggregates, the loop looks at least this often
# A step has a fixed cost (~0.5 ms of numpy calls) whatever it holds: after one,
# the next waits for STEP_BYTES of messages or STEP_GATHER_S, so a trickle of
# tiny messages makes ~20 steps a second, not one per message, while a busy
# stream (32 KiB, ~500 events, every few ms) is not held up.
STEP_BYTES = 32 * 1024
STEP_GATHER_S = 0.05
PARALLEL_LOADS = 4  # snapshot transfers at once when restoring or adopting many partitions
LAYOUT_POLL_S = 2.0  # how often an actor compares its layout with the stored one
LAYOUT_GRACE_S = 10.0  # a stored layout an ordered hand-off has not brought is followed after
RESCALE_LEASE_S = 300.0  # an unsettled rescale older than this no longer blocks the next


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
        max_messages_per_apply: int = MAX_MESSAGES_PER_APPLY,
        windows: WindowConfig | None = None,
        funnel: FunnelSpec | None = None,
        checkpoints: CheckpointConfig | None = None,
        partition_count: int | None = None,
        nats_credentials: NatsCredentials | None = None,
        insights: bool = True,
    ) -> None:
        """Args:
        partitions: what this shard owns when no layout is stored yet.
        partition_count: the stream's partition count P (default: ``max(partitions) + 1``).
        nats_credentials: the shard role's NATS login (None: the server needs none).
        insights: keep the insight aggregates (off: profiles, items and features only).
        """
        count = partition_count or max(partitions) + 1
        part_rules, part_items, part_dedup = partition_configs(count, rules)
        self.shard_id = shard_id
        self.config = {
            "rules": rules,
            "policy": policy,
            "windows": windows,
            "funnel": funnel,
            "insights": insights,
        }
        self.shard = Shard(
            shard_id,
            [],
            part_rules,
            policy,
            windows,
            funnel,
            part_items,
            part_dedup,
            partition_count=count,
            insights=insights,
        )
        self.work_messages = 0  # messages taken from the stream, skipped ones included
        self.snapshot_pause_ms = LatencyRing()  # the synchronous part of each snapshot
        self.first_partitions = list(partitions)
        self.nats_url = nats_url
        self.nats_credentials = nats_credentials
        self.stream = stream
        self.max_messages_per_apply = max_messages_per_apply
        self.checkpoints = checkpoints or CheckpointConfig()
        self.layout: Layout | None = None  # what this shard follows (owns by)
        self.settled_layout: Layout | None = None  # what it tells pools to route by
        self._nc: Client | None = None
        self._queries: Subscription | None = None  # per-request reads over NATS
        self._js: JetStreamContext | None = None
        self._reader: StreamReader | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._timer_task: asyncio.Task[None] | None = None
        self._layout_task: asyncio.Task[None] | None = None
        self._dead_letters: DeadLetters | None = None
        self._held_dead_letters: list[Rejection] = []
        self._store: CheckpointStore | None = None
        self._layouts: LayoutStore | None = None
        self._checkpointing = asyncio.Lock()
        self._moving = asyncio.Lock()  # one layout change at a time
        self._last_checkpoint: dict[str, Any] | None = None
        self._snapshotted: dict[int, int] = {}  # partition -> position of its newest snapshot
        self._checkpoint_failures = 0
        self._targets: dict[int, int] | None = None  # stream ends to reach before answering
        self.started_at = time.time()  # tells incarnations apart after a restart
        self.recovery: dict[str, Any] = {"started_at": self.started_at, "restored": None}
        self.handoffs: list[dict[str, Any]] = []  # the latest partitions moved in and out
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
                log.warning("shard %s cannot start yet: %r", self.shard_id, exc)
                await asyncio.sleep(START_RETRY_S)

    async def _start_once(self) -> None:
        if self._nc is None:
            self._nc = await nats_connect(
                self.nats_url,
                self.nats_credentials,
                name=f"audience-shard-{self.shard_id}",
                max_reconnect_attempts=-1,
                reconnected_cb=self._reconnected,
            )
        if self._queries is None:  # answered from the start: "recovering" until caught up
            subject = query_subject(self.checkpoints.scope, self.shard_id)
            self._queries = await self._nc.subscribe(subject, cb=self._answer_query)
        js = self._js = self._nc.jetstream()
        self._dead_letters = DeadLetters(js, origin=f"shard:{self.shard_id}")
        self._store = self.checkpoints.open(js)
        self._layouts = LayoutStore(js, self.checkpoints.scope, self.checkpoints.replicas)
        if self.recovery["restored"] is None:
            stored = await self._layouts.load()
            self.layout = self.settled_layout = stored.layout if stored is not None else None
            mine = (
                self.layout.partitions_of(self.shard_id)
                if self.layout is not None
                else self.first_partitions
            )
            self.recovery["restored"] = await self._restore_newest(mine)
        self._targets = await self._stream_ends(js, self.shard.partitions)
        if self._reader is not None:  # a start that failed after creating it: retire it
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader.stop(), STOP_STEP_TIMEOUT_S)
        self._reader = StreamReader(self._nc, js, self.stream, self.shard.positions)
        await self._reader.start()
        self.recovery["consuming_at"] = time.time()
        self._loop_task = asyncio.create_task(self._consume())
        self._loop_task.add_done_callback(self._log_crash)
        if self.checkpoints.interval_s > 0:
            self._timer_task = asyncio.create_task(self._checkpoint_forever())
            self._timer_task.add_done_callback(self._log_crash)
        self._layout_task = asyncio.create_task(self._follow_layout())
        self._layout_task.add_done_callback(self._log_crash)
        self._check_caught_up()

    async def _snapshot_names(self) -> dict[int, list[str]]:
        """Stored snapshot names of this pool, by partition, oldest first."""
        assert self._store is not None
        by_partition: dict[int, list[str]] = defaultdict(list)
        for name in await self._store.names(f"{self.checkpoints.scope}.p"):
            partition = partition_of_name(self.checkpoints.scope, name)
            if partition is not None:
                by_partition[partition].append(name)
        return by_partition

    async def _restore_newest(self, partitions: Sequence[int]) -> dict[int, str]:
        """Own ``partitions``, each from its newest usable snapshot (or empty: full replay).

        Returns the snapshot each partition came from ("" for none).
        """
        started = time.perf_counter()
        names = await self._snapshot_names() if partitions else {}
        restored: dict[int, str] = {}
        total_bytes = 0
        loaded = await self._load_many(partitions, names)
        for partition in partitions:
            state, name, size = loaded[partition]
            self._own(partition, state)
            restored[partition] = name
            total_bytes += size
            if name:
                self._snapshotted[partition] = self.shard.positions[partition]
        self.recovery.update(
            restore_s=round(time.perf_counter() - started, 3), snapshot_bytes=total_bytes
        )
        return restored

    def _own(self, partition: int, state: dict[str, Any] | None) -> None:
        """Own a partition from its loaded state, or empty (to be replayed from the start)."""
        if state is None:
            self.shard.add(partition)
        else:
            self.shard.insert(state)

    async def _load_many(
        self, partitions: Sequence[int], names: dict[int, list[str]]
    ) -> dict[int, tuple[dict[str, Any] | None, str, int]]:
        """:meth:`_load_partition` for many partitions, a few transfers at a time."""
        room = asyncio.Semaphore(PARALLEL_LOADS)

        async def one(partition: int) -> tuple[dict[str, Any] | None, str, int]:
            async with room:
                return await self._load_partition(partition, names.get(partition, []))

        states = await asyncio.gather(*(one(p) for p in partitions))
        return dict(zip(partitions, states, strict=True))

    async def _load_partition(
        self, partition: int, names: Sequence[str]
    ) -> tuple[dict[str, Any] | None, str, int]:
        """The state of ``partition`` from the newest usable of ``names``, its name and size.

        Decoding (digest, unpickling) runs in a thread: the shard goes on applying.
        """
        assert self._store is not None
        for name in reversed(names):
            try:
                blob = await self._store.load(name)
            except (NotFoundError, FileNotFoundError):  # pruned since it was listed
                continue
            try:
                header, states = await asyncio.to_thread(self.shard.decode, blob)
                if header.partitions != [partition]:
                    raise SnapshotError(f"snapshot covers {header.partitions}, not {partition}")
            except SnapshotError as exc:
                log.warning("shard %s: snapshot %s unusable (%s)", self.shard_id, name, exc)
                continue
            return states[0], name, len(blob)
        if names:
            log.warning("shard %s: partition %s has no usable snapshot", self.shard_id, partition)
        return None, "", 0

    async def _stream_ends(self, js: JetStreamContext, partitions: Sequence[int]) -> dict[int, int]:
        """The last stream sequence of each partition right now (0 for an empty one)."""
        ends = {}
        for partition in partitions:
            try:
                last = await js.get_last_msg(self.stream, events_subject(partition))
                ends[partition] = int(last.seq or 0)
            except NotFoundError:
                ends[partition] = 0
        return ends

    def _check_caught_up(self) -> None:
        """Drop the targets reached; leave recovery once none is left."""
        if self._targets is None:
            return
        positions = self.shard.positions
        self._targets = {
            p: end for p, end in self._targets.items() if p in positions and positions[p] < end
        }
        if not self._targets and "caught_up_at" not in self.recovery:
            self.recovery["caught_up_at"] = time.time()
            self.recovery["replayed_messages"] = self.shard.applied_messages

    @property
    def recovering(self) -> bool:
        """Whether state queries would see a state behind the stream's end at start."""
        return self._targets is None or bool(self._targets)

    def _ready(self) -> None:
        """Raise :class:`ShardRecovering` while the state is not caught up."""
        if not self.recovering:
            return
        if self._targets is None:
            detail = "restoring the newest snapshots"
        else:
            positions = self.shard.positions
            behind = sum(max(0, end - positions.get(p, 0)) for p, end in self._targets.items())
            detail = f"replaying its partitions ({behind} stream sequences to go)"
        raise ShardRecovering(self.shard_id, detail)

    async def _reconnected(self) -> None:
        if self._reader is not None:
            self._reader.connection_restored()

    async def _consume(self) -> None:
        assert self._reader is not None and self._dead_letters is not None
        last_step = 0.0
        while True:
            await self._reader.gather(STEP_BYTES, last_step + STEP_GATHER_S - time.monotonic())
            if self._held_dead_letters:
                await self._publish_dead_letters()
                if len(self._held_dead_letters) >= MAX_HELD_DEAD_LETTERS:
                    await asyncio.sleep(START_RETRY_S)  # NATS is down: wait, hold no more
                    continue
            # While events wait for the aggregates, wake up in time to fold them.
            wait_s = FOLD_WAKE_S if self.shard.pending_events else 0.5
            deliveries = await self._reader.take(
                self.max_messages_per_apply, timeout_s=wait_s, max_bytes=MAX_BYTES_PER_APPLY
            )
            self._metrics.record_lag(self._reader.pending_by_partition())
            if not deliveries:
                self.shard.fold_due()
                continue
            self.work_messages += len(deliveries)
            last_step = time.monotonic()
            started = time.perf_counter()
            result = self.shard.apply(deliveries)
            self.shard.fold_due()
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
        """Publish the held dead letters; keep them (counted) if NATS does not take them.

        They stay in the held list while the publish is under way, so a snapshot
        or hand-off meanwhile sees them and waits (it would skip past them).
        """
        assert self._dead_letters is not None
        held = list(self._held_dead_letters)
        try:
            await self._dead_letters.publish(held)
        except Exception as exc:  # same ids on the next try: JetStream keeps one copy
            log.warning("shard %s holds %d dead letters: %r", self.shard_id, len(held), exc)
        else:
            del self._held_dead_letters[: len(held)]  # those added meanwhile stay

    async def _checkpoint_forever(self) -> None:
        """Take a snapshot every interval when something changed (and none is in the way)."""
        while True:
            await asyncio.sleep(self.checkpoints.interval_s)
            if self.recovering or self._held_dead_letters:
                continue
            try:
                await self.checkpoint(changed_only=True)
            except Exception as exc:  # the previous snapshots stay; try again next time
                self._checkpoint_failures += 1
                log.warning("shard %s: checkpoint failed: %r", self.shard_id, exc)

    def _refuse_while_holding(self) -> None:
        if self._store is None or self._held_dead_letters:
            raise UnavailableError(
                f"shard {self.shard_id}", "snapshots wait for NATS to take dead letters", 2.0
            )

    async def _snapshot(self, partitions: Sequence[int], created_ms: int) -> list[tuple[str, int]]:
        """Snapshot partitions one at a time; names and sizes.

        Each is exported at once (applying pauses only for that: a consistent
        cut of that partition, at its position), then encoded in a thread,
        stored and pruned while the shard goes on.
        """
        assert self._store is not None
        saved = []
        for p in partitions:
            state = self._cut(p)
            partition, position = int(state["partition"]), int(state["position"])
            _, blob = await asyncio.to_thread(
                encode_partitions, self.shard_id, self.shard.fingerprint, created_ms, [state]
            )
            name = snapshot_name(self.checkpoints.scope, partition, position, created_ms)
            await self._store.save(name, blob)
            self._snapshotted[partition] = position
            await prune(self._store, self.checkpoints.scope, partition, self.checkpoints.keep)
            saved.append((name, len(blob)))
        return saved

    def _cut(self, partition: int) -> dict[str, Any]:
        """Export ``partition`` now: the synchronous part of its snapshot."""
        self._refuse_while_holding()  # checked at the cut: a publish may have failed since
        started = time.perf_counter()
        state = self.shard.export(partition)
        self.snapshot_pause_ms.add((time.perf_counter() - started) * 1000)
        return state

    async def checkpoint(self, changed_only: bool = False) -> dict[str, Any]:
        """Snapshot every owned partition (``changed_only``: those that moved on) now.

        One synchronous cut exports the partitions (applying pauses only for
        that); encoding and storing run while the shard goes on.

        Raises:
            UnavailableError: dead letters still wait for NATS (the snapshot
                would skip past them) or the store is not open yet.
        """
        self._refuse_while_holding()
        async with self._checkpointing:
            started = time.perf_counter()
            created_ms = int(time.time() * 1000)
            moved = [
                p
                for p, position in sorted(self.shard.positions.items())
                if not changed_only or self._snapshotted.get(p) != position
            ]
            if not moved and self._last_checkpoint is not None:
                return dict(self._last_checkpoint)
            saved = await self._snapshot(moved, created_ms)
            self._last_checkpoint = {
                "name": saved[-1][0] if saved else None,
                "partitions": len(saved),
                "created_ms": created_ms,
                "positions": dict(self.shard.positions),
                "bytes": sum(size for _, size in saved),
                "took_s": round(time.perf_counter() - started, 3),
                "pause_ms": self.snapshot_pause_ms.percentiles().get("max"),
            }
            return dict(self._last_checkpoint)

    # -- hand-offs ------------------------------------------------------------------------

    async def construction(self) -> dict[str, Any]:
        """What shaped this shard's state (rules, limits, windows, funnel).

        A rescale driven from any process creates its new shards with these, so
        their state (and the fingerprint a hand-off snapshot is checked against)
        equals the old owners'.
        """
        return dict(self.config)

    async def layout_json(self) -> dict[str, Any] | None:
        """The layout this shard last settled on (None before one was stored).

        Pools route by it. During a rescale the shard already follows the next
        layout, but pools learn that one only once every new owner holds its
        partitions, so a query never reaches a shard that cannot answer it yet.
        """
        return None if self.settled_layout is None else self.settled_layout.to_json()

    async def store_layout(
        self, layout: dict[str, Any], expected_version: int, settled: bool = False
    ) -> int:
        """Store ``layout`` for the pool, compare-and-set; the key's new revision.

        Stored only if the stored one is ``expected_version``; a new version
        only if that one's rescale has settled too (or was left unsettled
        longer than ``RESCALE_LEASE_S`` ago, by a driver that died). A rescale
        stores its layout unsettled, then the same version settled when done.
        Any shard can do it: the pool has no NATS connection of its own.

        Raises:
            AudienceError: another rescale ran meanwhile or is still under way.
        """
        await self._starting
        assert self._layouts is not None
        new = Layout.from_json(layout)
        stored = await self._layouts.load()
        found = stored.layout.version if stored is not None else 0
        if found != expected_version:
            raise AudienceError(
                f"the stored layout is version {found}, not {expected_version}: another rescale ran"
            )
        if stored is not None and new.version != found and not stored.settled:
            age_s = time.time() - stored.written_ms / 1000
            if age_s < RESCALE_LEASE_S:
                raise AudienceError(
                    f"the rescale to layout version {found} started {age_s:.0f} s ago and "
                    "has not settled; try again when it has"
                )
        return await self._layouts.save(new, stored.revision if stored else 0, settled)

    def _stale(self, new: Layout) -> bool:
        """Whether ``new`` is older than the layout followed (a late call: ignored)."""
        return self.layout is not None and new.version < self.layout.version

    async def release(self, layout: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """Hand over the partitions ``layout`` gives to others: stop, snapshot, keep answering.

        Each released partition stops applying events at once (a synchronous
        cut) and leaves the reader, is snapshotted at that position, and
        answers its users' queries until :meth:`settle` forgets it. Returns, per
        partition, the snapshot name, its position and the stream end the new
        owner must reach before answering (this shard's own target while it
        was recovering).

        Raises:
            UnavailableError: dead letters wait for NATS; nothing was released.
        """
        await self._starting
        new = Layout.from_json(layout)
        if self._stale(new):
            return {}
        self._refuse_while_holding()
        out: dict[int, dict[str, Any]] = {}
        assert self._reader is not None
        async with self._moving, self._checkpointing:
            created_ms = int(time.time() * 1000)
            going = [p for p in self.shard.partitions if new.owners[p] != self.shard_id]
            for p in going:  # one cut for all of them: they apply nothing from here on
                self.shard.release(p)
            for p in going:  # nothing of them is taken (and skipped) meanwhile
                await self._reader.remove(p)
            try:
                saved = await self._snapshot(going, created_ms)
            except Exception:
                for p in going:  # not handed over: own and read them again
                    position = self.shard.released[p]
                    self.shard.own_again(p, position)
                    await self._reader.add(p, position)
                raise
            for p, (name, size) in zip(going, saved, strict=True):
                position = self.shard.released[p]
                target = max(position, (self._targets or {}).get(p, 0))
                out[p] = {"name": name, "position": position, "target": target, "bytes": size}
            self.layout = new
            for p in going:
                if self._targets:
                    self._targets.pop(p, None)
            self._note_handoff("out", out)
        return out

    async def adopt(
        self, layout: dict[str, Any], handoffs: dict[int, dict[str, Any]] | None = None
    ) -> dict[int, int]:
        """Own the partitions ``layout`` gives this shard and it does not hold yet.

        A partition with a hand-off (see :meth:`release`) is restored from that
        snapshot and answers at once; one without (its old owner died or
        refused) is restored from its newest snapshot and replayed to the
        stream's end before this shard answers again. A copy this shard still
        holds (released, not yet forgotten) is used when it is the furthest on.
        Returns each adopted partition's position.
        """
        await self._starting
        new = Layout.from_json(layout)
        if self._stale(new):
            return {}
        async with self._moving:
            adopted = await self._adopt_missing(new, handoffs or {})
            self.layout = new
        return adopted

    async def _adopt_missing(
        self, new: Layout, handoffs: dict[int, dict[str, Any]]
    ) -> dict[int, int]:
        """Own what ``new`` gives this shard and it does not own (``_moving`` held)."""
        coming = [p for p in new.partitions_of(self.shard_id) if p not in self.shard.positions]
        names = await self._snapshot_names() if coming else {}
        assert self._reader is not None and self._js is not None
        adopted: dict[int, int] = {}

        def keep(p: int) -> bool:  # handed back before it was forgotten, and as far on
            kept, handoff = self.shard.released.get(p), handoffs.get(p)
            if kept is None:
                return False
            return handoff is None or kept >= handoff["position"]

        # Names sort by position: a hand-off snapshot is the furthest on.
        loaded = await self._load_many([p for p in coming if not keep(p)], names)
        for p in coming:
            handoff = handoffs.get(p)
            if handoff is not None:
                target = int(handoff["target"])
            else:  # its old owner died or refused: replay to the stream's end first
                target = (await self._stream_ends(self._js, [p]))[p]
            if keep(p):
                self.shard.own_again(p, self.shard.released[p])
            else:
                if p in self.shard.released:  # an older copy than the one loaded
                    self.shard.forget(p)
                self._own(p, loaded[p][0])
            position = self.shard.positions[p]
            if target > position:
                self._targets = {**(self._targets or {}), p: target}
            await self._reader.add(p, position)
            adopted[p] = position
        self._check_caught_up()
        self._note_handoff("in", {p: {"position": s} for p, s in adopted.items()})
        return adopted

    async def settle(self, layout: dict[str, Any]) -> list[int]:
        """Hold exactly what ``layout`` (now stored) gives this shard; what it let go.

        Released partitions it gives others are forgotten; owned ones it gives
        others (a release that was refused or never asked for) stop at once,
        without a hand-off: their new owner restored them from a snapshot and
        replays; ones it gives this shard and it does not hold are adopted
        from their newest snapshots. Pools learn the layout from here on.
        """
        new = Layout.from_json(layout)
        if self._stale(new):
            return []
        assert self._reader is not None
        async with self._moving:
            mine = set(new.partitions_of(self.shard_id))
            for p in [p for p in self.shard.partitions if p not in mine]:
                self.shard.release(p)
                await self._reader.remove(p)
                if self._targets:
                    self._targets.pop(p, None)
            gone = [p for p in self.shard.released if p not in mine]
            for p in gone:
                self.shard.forget(p)
            await self._adopt_missing(new, {})
            self.layout = self.settled_layout = new
        return gone

    def _note_handoff(self, direction: str, parts: dict[int, dict[str, Any]]) -> None:
        if parts:
            self.handoffs = [
                *self.handoffs[-9:],
                {"at": time.time(), "direction": direction, "partitions": sorted(parts)},
            ]

    def _follows(self, layout: Layout) -> bool:
        """Whether this shard holds exactly what ``layout`` gives it, and has settled on it."""
        return (
            self.settled_layout is not None
            and self.settled_layout.version >= layout.version
            and set(self.shard.positions) == set(layout.partitions_of(self.shard_id))
            and not self.shard.released
        )

    async def _follow_layout(self) -> None:
        """Converge on the stored layout when no ordered hand-off brought it in time.

        A rescale stores the new layout, then hands partitions over in order;
        if the process driving it dies half-way (or a step failed), every shard
        still ends up holding what the stored layout says, from the partitions'
        snapshots, once the difference has lasted ``LAYOUT_GRACE_S``.
        """
        assert self._layouts is not None
        differs_since: float | None = None
        while True:
            await asyncio.sleep(LAYOUT_POLL_S)
            try:
                stored = await self._layouts.load()
            except Exception as exc:  # NATS away: the next poll tries again
                log.info("shard %s cannot read the layout: %r", self.shard_id, exc)
                continue
            if stored is None or self._stale(stored.layout) or self._follows(stored.layout):
                differs_since = None
                continue
            if differs_since is None:
                differs_since = time.monotonic()
            if time.monotonic() - differs_since < LAYOUT_GRACE_S:
                continue
            log.warning("shard %s converges on layout v%s", self.shard_id, stored.layout.version)
            try:
                target = stored.layout.to_json()
                await self.release(target)  # a hand-off snapshot where it can
                await self.settle(target)
            except Exception as exc:  # NATS away, a snapshot unreadable: the next poll again
                log.warning("shard %s: following the layout failed: %r", self.shard_id, exc)

    def _log_crash(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("shard %s is not consuming", self.shard_id, exc_info=task.exception())

    # -- queries ------------------------------------------------------------------------
    # The per-request reads record no Ray task events: at hundreds of requests a
    # second they would cost the shard, the caller and the GCS more than the read.

    async def _answer_query(self, msg: Msg) -> None:
        """A per-request read over NATS (:mod:`actors.shard_queries`), as its Ray call."""
        await respond(msg, self._query)

    def _query(self, method: str, arg: list[Any]) -> Any:
        self._ready()
        return self.shard.user_rows(arg) if method == "user_rows" else self.shard.seen(arg)

    async def users(self, limit: int) -> list[str]:
        """Up to ``limit`` ids of users this shard holds."""
        self._ready()
        return self.shard.user_ids(limit)

    @ray.method(enable_task_events=False)
    async def profiles(self, user_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Live profiles for ``user_ids``, None for unknown users."""
        self._ready()
        return self.shard.profiles(user_ids)

    @ray.method(enable_task_events=False)
    async def user_rows(self, user_ids: Sequence[str]) -> UserRows:
        """Model-feature state of ``user_ids``: one call per shard per request batch."""
        self._ready()
        return self.shard.user_rows(user_ids)

    @ray.method(enable_task_events=False)
    async def seen(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[list[bool]]:
        """Which candidate items each user has touched (see ``Shard.seen``)."""
        self._ready()
        return self.shard.seen(pairs)

    async def item_partials(
        self, top_n: int, known: dict[int, int | None] | None = None
    ) -> dict[int, tuple[dict[str, Any] | None, bool]]:
        """Item partial of each partition held, and whether it is owned (else released).

        Released partitions answer too: between two owners a partition still counts.
        """
        self._ready()
        owned = self.shard.positions
        return {p: (v, p in owned) for p, v in self.shard.item_partials(top_n, known).items()}

    async def insights_partials(self) -> dict[int, tuple[dict[str, Any], bool]]:
        """Insights partials of each partition held (as far as folded), and whether owned."""
        self._ready()
        owned = self.shard.positions
        return {p: (self.shard.insights_partials(p), p in owned) for p in self.shard.held}

    async def counters(self) -> dict[str, Any]:
        """Cheap progress counters (no NATS round trips), for polling."""
        stats = self._nc.stats if self._nc is not None else {}
        return {
            "pid": os.getpid(),
            "applied_events": self.shard.applied_events,
            "applied_messages": self.shard.applied_messages,
            "work_messages": self.work_messages,
            "users": len(self.shard.table),
            "partitions": self.shard.partitions,
            "layout_version": self.layout.version if self.layout is not None else 0,
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
            "positions": self.shard.positions,
            "pending_fold_events": self.shard.pending_events,
            "insights_lag_ms": self.shard.insights_lag_ms.percentiles(),
            "snapshot_pause_ms": self.snapshot_pause_ms.percentiles(),
        }

    async def freshness_ring(self) -> tuple[int, np.ndarray]:
        """The raw store-to-applied delays (ms) of the latest messages; see Shard."""
        return self.shard.freshness_ring()

    async def insights_lag_ring(self) -> tuple[int, np.ndarray]:
        """The raw apply-to-fold delays (ms) of the latest folds; see Shard."""
        return self.shard.insights_lag_ms.raw()

    async def status(self) -> dict[str, Any]:
        """Counters, positions and per-partition lag of this shard."""
        status = self.shard.status()
        status["snapshot_pause_ms"] = self.snapshot_pause_ms.percentiles()
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
        status["layout_version"] = self.layout.version if self.layout is not None else 0
        status["handoffs"] = list(self.handoffs)
        if self._reader is not None:
            status["consumer_resyncs"] = self._reader.resyncs
            status["consumer_gaps"] = self._reader.gaps
        return status

    async def stop(self) -> None:
        """Stop consuming, take a last snapshot (if configured) and close the connection."""
        if not self._starting.done():
            self._starting.cancel()
        for task in (self._layout_task, self._timer_task, self._loop_task):
            if task is not None:
                task.cancel()
                # Bounded: a cancel that lands inside nats-py's publish can be lost
                # (Python 3.11), and a stop must not hang on it.
                await asyncio.wait({task}, timeout=STOP_STEP_TIMEOUT_S)
        self._layout_task = self._timer_task = self._loop_task = None
        if self.checkpoints.on_stop and self._store is not None and not self.recovering:
            if self._held_dead_letters:
                await self._publish_dead_letters()
            try:
                await asyncio.wait_for(
                    self.checkpoint(changed_only=True), timeout=LAST_CHECKPOINT_TIMEOUT_S
                )
            except Exception as exc:  # stopping goes on; the previous snapshots stay
                log.warning("shard %s: last checkpoint failed: %r", self.shard_id, exc)
        if self._reader is not None:
            with contextlib.suppress(Exception):  # its consumers expire on their own anyway
                await asyncio.wait_for(self._reader.stop(), STOP_STEP_TIMEOUT_S)
            self._reader = None
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), STOP_STEP_TIMEOUT_S)
            self._nc = self._queries = None
