"""The Ray edge of a shard: an async actor that consumes its partitions itself.

There is no router hop: the actor pulls its own subjects from JetStream, so
events go stream -> shard in one step, and queries are answered from the same
event loop between two applied batches.
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

from actors.consumer import StreamReader
from actors.conversion import FunnelSpec
from actors.deadletter import DeadLetters
from actors.metrics import ShardMetrics
from actors.shard import Shard
from actors.state import StateRules, UserRows
from actors.validation import ValidationPolicy
from actors.windows import WindowConfig

log = logging.getLogger(__name__)


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
    ) -> None:
        self.shard = Shard(shard_id, partitions, rules, policy, windows, funnel)
        self.nats_url = nats_url
        self.stream = stream
        self.max_messages_per_apply = max_messages_per_apply
        self._nc: Client | None = None
        self._reader: StreamReader | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._dead_letters: DeadLetters | None = None
        self.started_at = time.time()  # tells incarnations apart after a restart
        self._metrics = ShardMetrics(shard_id)
        # Ray runs an async actor's constructor inside its event loop, so
        # consumption starts here, also when Ray restarts a dead actor: it then
        # replays its partitions from their start and rebuilds the state.
        self._starting = asyncio.get_running_loop().create_task(self._start())
        self._starting.add_done_callback(self._log_crash)

    async def start(self) -> dict[str, Any]:
        """Wait until the shard consumes (raising if it could not start); its status."""
        await asyncio.shield(self._starting)
        return self.shard.status()

    async def _start(self) -> None:
        self._nc = await nats.connect(
            self.nats_url,
            name=f"audience-shard-{self.shard.shard_id}",
            max_reconnect_attempts=-1,
            reconnected_cb=self._reconnected,
        )
        js = self._nc.jetstream()
        self._dead_letters = DeadLetters(js, origin=f"shard:{self.shard.shard_id}")
        self._reader = StreamReader(self._nc, js, self.stream, dict(self.shard.positions))
        await self._reader.start()
        self._loop_task = asyncio.create_task(self._consume())
        self._loop_task.add_done_callback(self._log_crash)

    async def _reconnected(self) -> None:
        if self._reader is not None:
            self._reader.connection_restored()

    async def _consume(self) -> None:
        assert self._reader is not None and self._dead_letters is not None
        while True:
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
            if result.rejected:
                try:
                    await self._dead_letters.publish(result.rejected)
                except Exception:  # the records are counted; keep consuming
                    log.exception("shard %s could not dead-letter", self.shard.shard_id)

    def _log_crash(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("shard %s is not consuming", self.shard.shard_id, exc_info=task.exception())

    async def users(self, limit: int) -> list[str]:
        """Up to ``limit`` ids of users this shard holds."""
        return self.shard.table.users(limit)

    async def profiles(self, user_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Live profiles for ``user_ids``, None for unknown users."""
        return self.shard.profiles(user_ids)

    async def user_rows(self, user_ids: Sequence[str]) -> UserRows:
        """Model-feature state of ``user_ids``: one call per shard per request batch."""
        return self.shard.user_rows(user_ids)

    async def seen(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[list[bool]]:
        """Which candidate items each user has touched (see ``Shard.seen``)."""
        return self.shard.seen(pairs)

    async def item_partial(self, top_n: int, known: int | None = None) -> dict[str, Any] | None:
        """Item stats and co-visitation partial of this shard (see ``Shard.item_partial``)."""
        return self.shard.item_partial(top_n, known)

    async def insights_partials(self) -> dict[str, Any]:
        """This shard's insights partials (see ``Shard.insights_partials``), for the merge."""
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
        if self._reader is not None:
            status["consumer_resyncs"] = self._reader.resyncs
            status["consumer_gaps"] = self._reader.gaps
        return status

    async def stop(self) -> None:
        """Stop consuming and close the NATS connection."""
        if not self._starting.done():
            self._starting.cancel()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._reader is not None:
            await self._reader.stop()
            self._reader = None
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None
