"""The shard pool: N named shard actors, partitions assigned, queries fanned out in batches.

Routing is user -> partition (CRC-32) -> owning shard. A query for many users
costs one actor call per shard involved, never one per user.

Shard actors restart themselves (Ray ``max_restarts``) and keep their names,
so the handles stay valid. While a shard is dead or restarting, calls to it
raise :class:`~actors.errors.ShardRecovering`, as the shard itself does while
it replays: callers answer "recovering" (HTTP 503) and retry, never stale data.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.actor import ActorHandle
from ray.exceptions import GetTimeoutError, RayActorError

from actors.checkpoint_store import CheckpointConfig
from actors.conversion import FunnelSpec
from actors.errors import AudienceError, ShardRecovering
from actors.partitioning import assign_partitions, partition_of
from actors.shard_actor import ShardActor
from actors.state import StateRules, UserRows
from actors.validation import ValidationPolicy
from actors.windows import WindowConfig

NAMESPACE = "audience"

log = logging.getLogger(__name__)


def shard_name(pool: str, shard_id: int) -> str:
    """The Ray actor name of a shard, so other processes can find it."""
    return f"{pool}-shard-{shard_id}"


@dataclass(frozen=True)
class PoolSpec:
    """What a pool is made of; enough for any process to find its shards."""

    partitions: int
    shards: int
    nats_url: str
    stream: str
    shard_cpus: float = 0.5
    name: str = "audience"
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)


class ShardPool:
    """Handles to the shard actors and the partition map that routes to them."""

    def __init__(self, spec: PoolSpec, handles: Sequence[ActorHandle]) -> None:
        self.spec = spec
        self.handles = list(handles)
        self.assignment = assign_partitions(spec.partitions, spec.shards)
        self._owner = {p: s for s, parts in enumerate(self.assignment) for p in parts}

    @classmethod
    def create(
        cls,
        spec: PoolSpec,
        rules: StateRules | None = None,
        policy: ValidationPolicy | None = None,
        timeout_s: float = 60.0,
        windows: WindowConfig | None = None,
        funnel: FunnelSpec | None = None,
        detached: bool = False,
    ) -> ShardPool:
        """Start the shard actors (named, in the ``audience`` namespace) and their consumers.

        ``detached`` shards outlive the process that created them (on Kubernetes a
        Serve application builder creates them in a task that then exits), and
        creating a detached pool again attaches to the shards already running, so
        the call is idempotent.

        Raises:
            AudienceError: (detached) shards of this pool run with other partitions
                than the spec gives them: a pool of another shard count.
        """
        assignment = assign_partitions(spec.partitions, spec.shards)
        lifetime: dict[str, Any] = {}
        if detached:
            _check_layout(spec, assignment, timeout_s)
            lifetime = {"lifetime": "detached", "get_if_exists": True}
        handles = [
            ShardActor.options(  # type: ignore[attr-defined]
                name=shard_name(spec.name, i),
                namespace=NAMESPACE,
                num_cpus=spec.shard_cpus,
                scheduling_strategy="SPREAD",  # one node's loss takes as few shards as can be
                **lifetime,
            ).remote(
                i,
                parts,
                spec.nats_url,
                spec.stream,
                rules,
                policy,
                windows=windows,
                funnel=funnel,
                checkpoints=dataclasses.replace(
                    spec.checkpoints, scope=f"{spec.stream}.{spec.name}"
                ),
            )
            for i, parts in enumerate(assignment)
        ]
        ray.get([h.start.remote() for h in handles], timeout=timeout_s)
        return cls(spec, handles)

    @classmethod
    def connect(cls, spec: PoolSpec) -> ShardPool:
        """Handles to a pool another process created."""
        handles = [
            ray.get_actor(shard_name(spec.name, i), namespace=NAMESPACE) for i in range(spec.shards)
        ]
        return cls(spec, handles)

    async def _call(self, shard: int, method: str, *args: Any) -> Any:
        """Call ``method`` on a shard; a dead or restarting actor is "recovering"."""
        try:
            return await getattr(self.handles[shard], method).remote(*args)
        except RayActorError as exc:  # ActorDiedError, ActorUnavailableError
            raise ShardRecovering(
                shard, f"the actor is restarting ({type(exc).__name__})"
            ) from None

    def owner(self, user_id: str) -> int:
        """The shard that holds ``user_id``."""
        return self._owner[partition_of(user_id, self.spec.partitions)]

    async def profiles(self, user_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Profiles of ``user_ids`` in order; one call per shard involved."""
        by_shard = self._by_shard(user_ids)
        shards = list(by_shard)
        answers: list[list[dict[str, Any] | None]] = await asyncio.gather(
            *(self._call(s, "profiles", [user_ids[i] for i in by_shard[s]]) for s in shards)
        )
        out: list[dict[str, Any] | None] = [None] * len(user_ids)
        for shard, profiles in zip(shards, answers, strict=True):
            for index, profile in zip(by_shard[shard], profiles, strict=True):
                out[index] = profile
        return out

    def _by_shard(self, user_ids: Sequence[str]) -> dict[int, list[int]]:
        """Indices of ``user_ids`` grouped by owning shard."""
        by_shard: dict[int, list[int]] = defaultdict(list)
        for index, user_id in enumerate(user_ids):
            by_shard[self.owner(user_id)].append(index)
        return by_shard

    async def user_rows(self, user_ids: Sequence[str]) -> UserRows:
        """Model-feature state of ``user_ids`` in order; one call per shard involved."""
        by_shard = self._by_shard(user_ids)
        shards = list(by_shard)
        answers: list[UserRows] = await asyncio.gather(
            *(self._call(s, "user_rows", [user_ids[i] for i in by_shard[s]]) for s in shards)
        )
        merged = UserRows.concat(answers)
        order = np.argsort(np.concatenate([by_shard[s] for s in shards]), kind="stable")
        return merged.take(order.tolist())

    async def seen(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[list[bool]]:
        """Per (user, items), which items the user touched; one call per shard involved."""
        by_shard = self._by_shard([user for user, _ in pairs])
        shards = list(by_shard)
        answers: list[list[list[bool]]] = await asyncio.gather(
            *(self._call(s, "seen", [pairs[i] for i in by_shard[s]]) for s in shards)
        )
        out: list[list[bool]] = [[] for _ in pairs]
        for shard, flags in zip(shards, answers, strict=True):
            for index, row in zip(by_shard[shard], flags, strict=True):
                out[index] = row
        return out

    async def item_partials(
        self, top_n: int, known: Sequence[int | None] | None = None
    ) -> list[dict[str, Any] | None]:
        """Every shard's item partial (one call per shard), for the item index merge.

        With ``known`` (the versions the caller holds, per shard), a shard whose
        items did not change answers None instead of its partial.
        """
        versions = list(known) if known is not None else [None] * len(self.handles)
        calls = (self._call(s, "item_partial", top_n, v) for s, v in enumerate(versions))
        return list(await asyncio.gather(*calls))

    async def users(self, limit: int) -> list[str]:
        """Up to ``limit`` known user ids, drawn from every shard."""
        per_shard = -(-limit // len(self.handles))
        found: list[list[str]] = await asyncio.gather(
            *(self._call(s, "users", per_shard) for s in range(len(self.handles)))
        )
        return [user for users in found for user in users][:limit]

    async def insights_partials(self) -> list[dict[str, Any]]:
        """Every shard's insights partials (one call per shard), for the merge timer."""
        shards = range(len(self.handles))
        return list(await asyncio.gather(*(self._call(s, "insights_partials") for s in shards)))

    async def status(self) -> list[dict[str, Any]]:
        """Every shard's status, in shard order; a restarting shard says only that."""
        answers = await asyncio.gather(
            *(self._call(s, "status") for s in range(len(self.handles))), return_exceptions=True
        )
        out: list[dict[str, Any]] = []
        for shard, answer in enumerate(answers):
            if isinstance(answer, ShardRecovering):
                out.append({"shard": shard, "recovering": True, "detail": str(answer)})
            elif isinstance(answer, BaseException):
                raise answer
            else:
                out.append(answer)
        return out

    async def checkpoint(self) -> list[dict[str, Any]]:
        """Snapshot every shard now (on demand); what each stored."""
        shards = range(len(self.handles))
        return list(await asyncio.gather(*(self._call(s, "checkpoint") for s in shards)))

    def shutdown(self, timeout_s: float = 45.0) -> None:
        """Stop consuming (each shard takes a last snapshot) and end the actors.

        A shard that does not stop in time is ended all the same: its restart
        then replays from its previous snapshot, which is slower, not wrong.
        """
        try:
            ray.get([h.stop.remote() for h in self.handles], timeout=timeout_s)
        except (GetTimeoutError, RayActorError) as exc:
            log.warning("shards did not all stop cleanly (%r); ending them", exc)
        finally:
            for handle in self.handles:
                ray.kill(handle, no_restart=True)


def _check_layout(spec: PoolSpec, assignment: list[list[int]], timeout_s: float) -> None:
    """Refuse to start shards next to running ones of this pool that own other partitions.

    Raises:
        AudienceError: a shard of this name runs with partitions the spec gives another.
    """
    running: list[ActorHandle] = []
    while True:  # shards are named 0..N-1: the running ones are the first names found
        try:
            running.append(ray.get_actor(shard_name(spec.name, len(running)), namespace=NAMESPACE))
        except ValueError:
            break
    if not running:
        return
    statuses: list[dict[str, Any]] = ray.get([h.start.remote() for h in running], timeout=timeout_s)
    found = [list(status["partitions"]) for status in statuses]
    if found != assignment[: len(found)]:
        raise AudienceError(
            f"pool {spec.name!r} runs {len(found)} shards with other partitions than "
            f"{spec.shards} shards over {spec.partitions} partitions would own; stop it first"
        )
