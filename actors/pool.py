"""The shard pool: N named shard actors, partitions laid out, queries fanned out in batches.

Routing is user -> partition (CRC-32) -> owning shard, by the pool's
:class:`~actors.layout.Layout`. A query for many users costs one actor call per
shard involved, never one per user.

:meth:`ShardPool.rescale` changes N while the stream flows: it stores the new
layout, then hands each moving partition over (the old owner snapshots it at a
position and keeps answering for its users; the new owner restores that
snapshot and goes on from the position), then tells everyone. Other processes'
pools learn the new layout from the shards: when a shard says it does not hold
a user's partition any more, or every few seconds for fan-out queries.

Shard actors restart themselves (Ray ``max_restarts``) and keep their names,
so the handles stay valid. While a shard is dead or restarting, calls to it
raise :class:`~actors.errors.ShardRecovering`, as the shard itself does while
it replays: callers answer "recovering" (HTTP 503) and retry, never stale data.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import GetTimeoutError, RayActorError

from actors.checkpoint_store import CheckpointConfig
from actors.conversion import FunnelSpec
from actors.errors import AudienceError, NotOwner, ShardRecovering
from actors.layout import Layout
from actors.nats_auth import NatsCredentials
from actors.partitioning import partition_of
from actors.shard_actor import ShardActor
from actors.shard_queries import METHODS as NATS_READS
from actors.shard_queries import QueryClient
from actors.state import StateRules, UserRows
from actors.validation import ValidationPolicy
from actors.windows import WindowConfig

NAMESPACE = "audience"
REFRESH_EVERY_S = 2.0  # fan-out queries re-read the layout at most this often
REFRESH_TIMEOUT_S = 5.0  # a shard that does not say its layout by then is skipped
START_TIMEOUT_S = 60.0  # new shards of a rescale must be placed and started by then
NOT_OWNER_RETRIES = 20  # a user query re-routed after a hand-off, this many times at most
NOT_OWNER_PAUSE_S = 0.05

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
    nats_credentials: NatsCredentials | None = None  # the shards' NATS login (shard role)

    @property
    def scope(self) -> str:
        """What this pool's snapshots and layout are stored under."""
        return f"{self.stream}.{self.name}"


@dataclass(frozen=True)
class ShardTemplate:
    """What every shard of a pool is created with, also the ones a rescale adds."""

    rules: StateRules | None = None
    policy: ValidationPolicy | None = None
    windows: WindowConfig | None = None
    funnel: FunnelSpec | None = None
    insights: bool = True  # off: profiles, items and features only (no insight aggregates)
    detached: bool = False


class ShardPool:
    """Handles to the shard actors and the layout that routes to them."""

    def __init__(
        self,
        spec: PoolSpec,
        handles: Sequence[ActorHandle],
        layout: Layout | None = None,
        template: ShardTemplate | None = None,
    ) -> None:
        self.spec = spec
        self.handles = list(handles)
        self.layout = layout or Layout.initial(spec.partitions, len(self.handles))
        self.template = template or ShardTemplate()
        # The handles of shards this pool created: a non-detached actor lives as
        # long as its creator's handles, whatever ``handles`` is re-resolved to.
        self._created: list[ActorHandle] = []
        self._refreshed_at = time.monotonic()
        self._rescaling: asyncio.Lock | None = None
        self.queries: QueryClient | None = None  # per-request reads over NATS, if asked

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
        insights: bool = True,
    ) -> ShardPool:
        """Start the shard actors (named, in the ``audience`` namespace) and their consumers.

        The pool follows the layout stored for it (a platform started again
        comes back with the shard count it was last rescaled to, whatever
        ``spec.shards`` says), or stores the initial one of ``spec.shards``.

        ``detached`` shards outlive the process that created them (on Kubernetes a
        Serve application builder creates them in a task that then exits), and
        creating a detached pool again attaches to the shards already running, so
        the call is idempotent.
        """
        template = ShardTemplate(rules, policy, windows, funnel, insights, detached)
        initial = Layout.initial(spec.partitions, spec.shards)
        first = _spawn(spec, template, 0, initial.partitions_of(0))
        ray.get(first.start.remote(), timeout=timeout_s)
        stored = ray.get(first.layout_json.remote(), timeout=timeout_s)
        layout = Layout.from_json(stored) if stored is not None else initial
        handles = [first] + [
            _spawn(spec, template, i, layout.partitions_of(i)) for i in range(1, layout.shards)
        ]
        ray.get([h.start.remote() for h in handles], timeout=timeout_s)
        if stored is None:
            ray.get(first.store_layout.remote(layout.to_json(), 0, True), timeout=timeout_s)
            ray.get([h.settle.remote(layout.to_json()) for h in handles], timeout=timeout_s)
        if layout.shards != spec.shards:
            log.info("pool %s comes back with its stored %d shards", spec.name, layout.shards)
        pool = cls(spec, handles, layout, template)
        pool._created = list(handles)
        return pool

    @classmethod
    def connect(cls, spec: PoolSpec, queries: QueryClient | None = None) -> ShardPool:
        """Handles to a pool another process created (its layout is read on first use).

        ``queries``: ask the per-request reads (``user_rows``, ``seen``) over NATS
        (:mod:`actors.shard_queries`), falling back to Ray calls when NATS cannot answer.
        """
        handles = _running(spec)
        if not handles:
            raise AudienceError(f"no shard of pool {spec.name!r} is running")
        pool = cls(spec, handles, Layout.initial(spec.partitions, len(handles)))
        pool._refreshed_at = 0.0  # the initial layout is a guess: read the real one first
        pool.queries = queries
        return pool

    async def refresh(self) -> bool:
        """Re-read the layout from the shards and their handles by name; whether either changed.

        Every shard reports the layout it last settled on; the newest wins. A
        shard that does not answer in time (dead, or never placed) does not
        hold the others up. While this pool rescales, its own steps decide.
        """
        if self._rescaling is not None and self._rescaling.locked():
            return False
        return await self._refresh_now()

    async def _refresh_now(self) -> bool:
        answers: list[Any] = await asyncio.gather(
            *(asyncio.wait_for(h.layout_json.remote(), REFRESH_TIMEOUT_S) for h in self.handles),
            return_exceptions=True,
        )
        found = [Layout.from_json(a) for a in answers if isinstance(a, dict)]
        newest = max(found, key=lambda layout: layout.version, default=self.layout)
        failed = any(isinstance(a, BaseException) for a in answers)
        changed = newest.version > self.layout.version
        if changed or failed or len(self.handles) != newest.shards:
            # Names outlive incarnations and rescales: look every shard up again.
            old = self.handles
            found_now = [_lookup(self.spec, i) for i in range(newest.shards)]
            handles: list[ActorHandle] = []
            for i, now in enumerate(found_now):
                if now is None and i >= len(old):
                    break  # not found by name and never held: still being created
                handles.append(now if now is not None else old[i])
            changed = changed or handles != old
            self.handles = handles
            self.layout = max(newest, self.layout, key=lambda layout: layout.version)
        self._refreshed_at = time.monotonic()
        return changed

    async def _fresh(self) -> None:
        """Refresh the layout if it was read long enough ago (fan-out queries)."""
        if time.monotonic() - self._refreshed_at >= REFRESH_EVERY_S:
            await self.refresh()

    async def _call(self, shard: int, method: str, *args: Any) -> Any:
        """Call ``method`` on a shard; a dead or restarting actor is "recovering".

        The per-request reads go over NATS first when the pool was given a
        :class:`QueryClient`; the Ray call answers when NATS cannot.
        """
        if shard >= len(self.handles):
            raise ShardRecovering(shard, "the shard is not found yet")
        if self.queries is not None and method in NATS_READS:
            answered, value = await self.queries.ask(shard, method, args[0])
            if answered:
                return value
        try:
            return await getattr(self.handles[shard], method).remote(*args)
        except RayActorError as exc:  # ActorDiedError, ActorUnavailableError
            raise ShardRecovering(
                shard, f"the actor is restarting ({type(exc).__name__})"
            ) from None

    def owner(self, user_id: str) -> int:
        """The shard that holds ``user_id`` (by the layout this pool knows)."""
        return self.layout.owners[partition_of(user_id, self.spec.partitions)]

    def _by_shard(self, user_ids: Sequence[str]) -> dict[int, list[int]]:
        """Indices of ``user_ids`` grouped by owning shard."""
        by_shard: dict[int, list[int]] = defaultdict(list)
        for index, user_id in enumerate(user_ids):
            by_shard[self.owner(user_id)].append(index)
        return by_shard

    async def _route(
        self, method: str, keys: Sequence[str], items: Sequence[Any]
    ) -> tuple[dict[int, list[int]], list[Any]]:
        """``method`` over ``items`` (keyed by user ``keys``): one call per owning shard.

        Returns the item indices each shard got and the shards' answers, in the
        same order. A shard that no longer holds a partition (handed over since
        this pool read the layout), or is gone (removed by a rescale), makes
        the pool re-read the layout and ask again.
        """
        if not self._refreshed_at:
            await self.refresh()
        for attempt in range(NOT_OWNER_RETRIES):
            by_shard = self._by_shard(keys)
            try:
                answers = await asyncio.gather(
                    *(self._call(s, method, [items[i] for i in at]) for s, at in by_shard.items())
                )
                return by_shard, list(answers)
            except (NotOwner, ShardRecovering) as exc:
                if attempt:
                    await asyncio.sleep(NOT_OWNER_PAUSE_S)
                changed = await self.refresh()
                if isinstance(exc, ShardRecovering) and not changed:
                    raise  # a restarting shard, not a stale layout or handle
        raise ShardRecovering(-1, "partitions are being handed over; try again")

    async def _per_user(self, method: str, keys: Sequence[str], items: Sequence[Any]) -> list[Any]:
        """``method``'s per-item answers over ``items``, in order (see :meth:`_route`)."""
        by_shard, answers = await self._route(method, keys, items)
        out: list[Any] = [None] * len(items)
        for at, answer in zip(by_shard.values(), answers, strict=True):
            for index, value in zip(at, answer, strict=True):
                out[index] = value
        return out

    async def profiles(self, user_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Profiles of ``user_ids`` in order; one call per shard involved."""
        return await self._per_user("profiles", user_ids, user_ids)

    async def user_rows(self, user_ids: Sequence[str]) -> UserRows:
        """Model-feature state of ``user_ids`` in order; one call per shard involved."""
        by_shard, answers = await self._route("user_rows", user_ids, user_ids)
        if not answers:
            return await self._call(0, "user_rows", [])
        order = sorted(
            range(len(user_ids)), key=[i for at in by_shard.values() for i in at].__getitem__
        )
        return UserRows.concat(answers).take(order)

    async def seen(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[list[bool]]:
        """Per (user, items), which items the user touched; one call per shard involved."""
        return await self._per_user("seen", [user for user, _ in pairs], pairs)

    def _pick(self, answers: Sequence[dict[int, tuple[Any, bool]]]) -> dict[int, Any]:
        """One answer per partition, from ``(value, owned)`` answers per shard.

        The owner's by this pool's layout first, then any owner's, then a
        released copy's (a partition between two owners still counts, once).
        """
        out: dict[int, Any] = {}
        rank: dict[int, int] = {}
        for shard, answer in enumerate(answers):
            for partition, (value, owned) in answer.items():
                score = 2 if owned and self.layout.owners[partition] == shard else int(owned)
                if score >= rank.get(partition, -1):
                    out[partition], rank[partition] = value, score
        return out

    async def _everywhere(self, method: str, *args: Any) -> list[Any]:
        """``method`` on every shard, in shard order.

        A shard that is gone or replaced (a rescale elsewhere) makes the pool
        re-read the layout and ask again; one that restarts is "recovering".
        """
        await self._fresh()
        retries = 2
        while True:
            calls = (self._call(s, method, *args) for s in range(len(self.handles)))
            try:
                return list(await asyncio.gather(*calls))
            except ShardRecovering:
                retries -= 1
                if retries < 0 or not await self.refresh():
                    raise

    async def _per_partition(self, method: str, *args: Any) -> dict[int, Any]:
        """One answer per partition from every shard's ``(value, owned)`` answers.

        A partition nobody answered for means shards this pool does not know
        yet (a rescale elsewhere added them): it re-reads the layout and asks again.
        """
        for _ in range(3):
            picked = self._pick(await self._everywhere(method, *args))
            if len(picked) == self.spec.partitions or not await self.refresh():
                break
        return picked

    async def item_partials(
        self, top_n: int, known: dict[int, int | None] | None = None
    ) -> dict[int, dict[str, Any] | None]:
        """Every partition's item partial, for the item index merge (one call per shard).

        With ``known`` (partition -> the version the caller holds), a partition
        whose items did not change answers None instead of its partial.
        """
        return await self._per_partition("item_partials", top_n, known)

    async def users(self, limit: int) -> list[str]:
        """Up to ``limit`` known user ids, drawn from every shard."""
        per_shard = -(-limit // max(1, len(self.handles)))
        found: list[list[str]] = await self._everywhere("users", per_shard)
        return [user for users in found for user in users][:limit]

    async def insights_partials(self) -> list[dict[str, Any]]:
        """Every partition's insights partials (one call per shard), for the merge timer."""
        return list((await self._per_partition("insights_partials")).values())

    async def status(self) -> list[dict[str, Any]]:
        """Every shard's status, in shard order; a restarting shard says only that."""
        await self._fresh()
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
        return await self._everywhere("checkpoint")

    async def rescale(self, shards: int, timeout_s: float = 120.0) -> dict[str, Any]:
        """Change the shard count to ``shards`` while the stream flows; what moved and when.

        Steps: start the new shards; store the new layout (compare-and-set: a
        concurrent rescale fails); each old owner releases its moving
        partitions (a snapshot at a position; its users still answered); each
        new owner adopts them from those snapshots and goes on from the
        positions; every shard settles on the layout (old owners forget what
        they gave away); shards past the new count stop. Shards a rescale adds
        are detached (they outlive the process that rescaled, such as a
        restarted controller); :meth:`shutdown` ends them with the others. An old owner that
        cannot release (it died) leaves its partitions to be restored from
        their newest snapshots and replayed: slower, just as exact.

        Raises:
            AudienceError: ``shards`` out of range, or the layout changed meanwhile.
        """
        if self._rescaling is None:
            self._rescaling = asyncio.Lock()
        async with self._rescaling:
            return await asyncio.wait_for(self._rescale(shards), timeout_s)

    async def _rescale(self, shards: int) -> dict[str, Any]:
        started = time.perf_counter()
        await self._refresh_now()
        old = self.layout
        settled: list[Any] = await asyncio.gather(*(h.layout_json.remote() for h in self.handles))
        if all(a is not None and a["version"] == old.version for a in settled):
            # Every shard settled on it (a rescale whose driver died, converged
            # since): say so, or the next layout would wait for the lease.
            await self._call(0, "store_layout", old.to_json(), old.version, True)
        new = old.rescaled(shards)
        report: dict[str, Any] = {"from": old.shards, "to": shards, "version": new.version}
        if new.owners == old.owners:  # already so: nothing to store or move
            report.update(version=old.version, moved=0, handed_over=0, snapshot_bytes=0)
            return {
                **report,
                "started_s": 0.0,
                "released_s": 0.0,
                "adopted_s": 0.0,
                "took_s": _since(started),
            }
        # New shards are shaped like the running ones, whichever process rescales
        # (this pool's own template may be a default: a pool that connected).
        like = ShardTemplate(**await self._call(0, "construction"))
        spawned = [
            _spawn(self.spec, like, shard, [], detached=True) for shard in range(old.shards, shards)
        ]
        try:
            await asyncio.wait_for(
                asyncio.gather(*(h.start.remote() for h in spawned)), START_TIMEOUT_S
            )
            await self._call(0, "store_layout", new.to_json(), old.version)
        except BaseException as exc:  # cancelled, never placed, refused: nothing moved yet
            for handle in spawned:
                ray.kill(handle, no_restart=True)
            if isinstance(exc, asyncio.TimeoutError):
                raise AudienceError(
                    f"{len(spawned)} new shards did not start within {START_TIMEOUT_S:g} s "
                    "(no room in the cluster for their CPUs?); nothing moved"
                ) from None
            raise
        removed = self.handles[shards:]
        self.handles = self.handles[: old.shards] + spawned
        self._created += spawned
        report["started_s"] = _since(started)
        moves = old.moves_to(new)
        sources = sorted({m.source for m in moves})
        released = await asyncio.gather(
            *(self._call(s, "release", new.to_json()) for s in sources), return_exceptions=True
        )
        handoffs: dict[int, dict[str, Any]] = {}
        for source, answer in zip(sources, released, strict=True):
            if isinstance(answer, BaseException):
                log.warning("shard %s did not release (%r): its partitions replay", source, answer)
            else:
                handoffs.update(answer)
        report["released_s"] = _since(started)
        targets = sorted({m.target for m in moves})
        await asyncio.gather(
            *(
                self._call(
                    t,
                    "adopt",
                    new.to_json(),
                    {
                        m.partition: handoffs[m.partition]
                        for m in moves
                        if m.target == t and m.partition in handoffs
                    },
                )
                for t in targets
            )
        )
        report["adopted_s"] = _since(started)
        self.layout = new
        await asyncio.gather(*(self._call(s, "settle", new.to_json()) for s in range(shards)))
        await self._call(0, "store_layout", new.to_json(), new.version, True)
        del self.handles[shards:]  # before they end: fan-outs meanwhile skip them
        for handle in removed:
            await _end(handle)
        report.update(
            moved=len(moves),
            handed_over=len(handoffs),
            snapshot_bytes=sum(int(h["bytes"]) for h in handoffs.values()),
            took_s=_since(started),
        )
        log.info("pool %s rescaled: %s", self.spec.name, report)
        return report

    def shutdown(self, timeout_s: float = 45.0) -> None:
        """Stop consuming (each shard takes a last snapshot) and end the actors.

        A shard that does not stop in time is ended all the same: its restart
        then replays from its previous snapshots, which is slower, not wrong.
        """
        running = _running(self.spec)  # by name: a rescale elsewhere may have changed them
        try:
            ray.get([h.stop.remote() for h in running], timeout=timeout_s)
        except (GetTimeoutError, RayActorError) as exc:
            log.warning("shards did not all stop cleanly (%r); ending them", exc)
        finally:
            for handle in running + self._created:
                with contextlib.suppress(Exception):  # ended already
                    ray.kill(handle, no_restart=True)


def _spawn(
    spec: PoolSpec,
    template: ShardTemplate,
    shard: int,
    partitions: list[int],
    detached: bool = False,
) -> ActorHandle:
    """Create (or, detached, attach to) shard ``shard`` of the pool.

    ``detached``: the shard must not end with the process creating it (a
    rescale run by the autoscaling controller, which Ray may restart).
    """
    lifetime: dict[str, Any] = {}
    if template.detached or detached:
        lifetime = {"lifetime": "detached", "get_if_exists": True}
    return ShardActor.options(  # type: ignore[attr-defined]
        name=shard_name(spec.name, shard),
        namespace=NAMESPACE,
        num_cpus=spec.shard_cpus,
        scheduling_strategy="SPREAD",  # one node's loss takes as few shards as can be
        **lifetime,
    ).remote(
        shard,
        partitions,
        spec.nats_url,
        spec.stream,
        template.rules,
        template.policy,
        windows=template.windows,
        funnel=template.funnel,
        insights=template.insights,
        checkpoints=dataclasses.replace(spec.checkpoints, scope=spec.scope),
        partition_count=spec.partitions,
        nats_credentials=spec.nats_credentials,
    )


def _get(spec: PoolSpec, shard: int) -> ActorHandle:
    return ray.get_actor(shard_name(spec.name, shard), namespace=NAMESPACE)


def _lookup(spec: PoolSpec, shard: int) -> ActorHandle | None:
    try:
        return _get(spec, shard)
    except ValueError:
        return None


def _running(spec: PoolSpec) -> list[ActorHandle]:
    """The pool's running shards: named 0..N-1, so the first names found."""
    found: list[ActorHandle] = []
    while True:
        try:
            found.append(_get(spec, len(found)))
        except ValueError:
            return found


async def _end(handle: ActorHandle, timeout_s: float = 30.0) -> None:
    """Stop a shard a rescale removed (it owns nothing by now) and end its actor."""
    try:
        await asyncio.wait_for(handle.stop.remote(), timeout_s)
    except (asyncio.TimeoutError, RayActorError) as exc:
        log.warning("a removed shard did not stop cleanly (%r); ending it", exc)
    ray.kill(handle, no_restart=True)


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)
