"""Ray Serve deployments that score the churn and personalization models on live features.

Each replica loads its model from the registry in ``reconfigure`` (Serve calls
it with the deployment's ``user_config``; a new ``user_config`` swaps models in
place without restarting replicas) and, when the configured version is
``"current"``, follows the registry's CURRENT pointer on a timer, so
``audience models promote`` rolls a version out to every replica. A swap is one
reference assignment after the new model is loaded: a request batch scores
with the model it started with, and none is dropped.

Each deployment is the HTTP ingress of its own Serve application
(:mod:`serving.model_routes`): ``/v1/churn`` and ``/v1/personalize`` reach the
model replica straight from Serve's ingress, with the gateway's keys, limits and
error answers. Requests are grouped with ``@serve.batch``; each batch costs one
read per shard involved for the users' rows (plus one for the seen-items check of
a top-k), asked over NATS (:mod:`actors.shard_queries`; ~0.3 ms instead of a Ray
call's ~2 ms here).
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from actors.latency import LatencyRing
from actors.nats_auth import NatsCredentials
from actors.pool import PoolSpec, ShardPool
from actors.shard_queries import QueryClient
from models.booster import ArtifactError
from models.candidates import ItemIndex
from models.churn import KIND as CHURN
from models.churn import ChurnModel
from models.examples import ITEM_TOP_N
from models.features import FEATURES_VERSION
from models.ranker import KIND as PERSONALIZATION
from models.ranker import Ranker, pair_schema
from models.registry import ModelRegistry
from models.scoring import (
    CandidateLimits,
    churn_answers,
    propose,
    rank_items,
    recommend,
    scores_many,
)
from serving.guard import AuthConfig, Guard
from serving.model_routes import churn_api, personalize_api

log = logging.getLogger(__name__)

NO_MODEL = "none"
# A request for many users is answered in chunks of this many, each with one read per
# shard and one model call, computed off the replica's loop: single requests (grouped
# by @serve.batch) keep being answered meanwhile.
CHUNK_USERS = 100
# Chunks of one request computed at once: LightGBM releases the GIL, so two chunks use
# both cores of a small machine; more would only queue behind them.
CHUNKS_IN_FLIGHT = 2
# Each model deployment is the ingress of its own Serve application (a Serve config
# must use these names: the gateway finds the deployments by them).
CHURN_APP = "audience-churn"
PERSONALIZE_APP = "audience-personalize"
MODEL_APPS = {CHURN: ("ChurnScorer", CHURN_APP), PERSONALIZATION: ("Personalizer", PERSONALIZE_APP)}


@dataclass(frozen=True)
class ModelsConfig:
    """What the model deployments need, handed down by the launcher."""

    pool: PoolSpec
    registry: str
    poll_s: float = 5.0
    item_refresh_s: float = 5.0
    item_top_n: int = ITEM_TOP_N
    limits: CandidateLimits = field(default_factory=CandidateLimits)
    auth: AuthConfig = field(default_factory=AuthConfig)  # the gateway's, as handed down
    max_json_body_bytes: int = 1024 * 1024
    nats_credentials: NatsCredentials | None = None  # the API's NATS login (api role)
    reads_over_nats: bool = True  # ask the shards over NATS, Ray calls as the fallback

    def connect_pool(self) -> ShardPool:
        """The shard pool, asking its per-request reads over NATS if configured."""
        queries = None
        if self.reads_over_nats:
            queries = QueryClient(self.pool.nats_url, self.nats_credentials, self.pool.scope)
        return ShardPool.connect(self.pool, queries)


def _read_counts(pool: ShardPool) -> dict[str, int] | None:
    """How a replica's shard reads went: over NATS, or left to Ray calls (None: Ray only)."""
    return pool.queries.counts() if pool.queries is not None else None


class _Follower:
    """Keeps the model of one kind that a replica serves, following the registry if asked."""

    def __init__(self, config: ModelsConfig, kind: str, features_version: str) -> None:
        self.registry = ModelRegistry(Path(config.registry))
        self.kind = kind
        self.features_version = features_version
        self.poll_s = config.poll_s
        self.wanted = "current"
        self.version = NO_MODEL
        self.model: Any = None
        self.problem: str | None = f"no {kind} model loaded yet"
        self._task: asyncio.Task[None] | None = None

    async def configure(self, user_config: dict[str, Any], wrap: Any) -> None:
        """Load the configured version now; keep following CURRENT when it is ``"current"``.

        The load runs in a thread: the replica's loop (which runs the requests in
        Serve's throughput mode) keeps answering with the model it has meanwhile.
        """
        self.wanted = str(user_config.get("version", "current"))
        self.wrap = wrap
        await asyncio.to_thread(self.refresh)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._follow())

    def refresh(self) -> None:
        """Load the wanted version if it is not the one served (errors keep the old model)."""
        want = self.registry.current(self.kind) if self.wanted == "current" else self.wanted
        if want is None:
            self.problem = f"no {self.kind} model in the registry; run `audience train`"
            return
        if want == self.version:
            return
        try:
            loaded = self.registry.load(self.kind, want, self.features_version)
        except (ArtifactError, ValueError) as exc:
            self.problem = str(exc)
            log.warning("keeping %s model %s: %s", self.kind, self.version, exc)
            return
        self.model, self.version, self.problem = self.wrap(loaded), want, None
        log.info("serving %s model %s", self.kind, want)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            if self.wanted == "current":
                try:
                    await asyncio.to_thread(self.refresh)
                except Exception:  # never let the follower die
                    log.exception("could not refresh the %s model", self.kind)


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=256,
    user_config={"version": "current"},
)
@serve.ingress(churn_api)
class ChurnScorer:
    """Scores churn for users on their live state; answers ``/v1/churn``."""

    def __init__(self, config: ModelsConfig) -> None:
        self.config = config
        self.guard = Guard(config.auth)
        self.api_latency = LatencyRing()
        self.pool = config.connect_pool()
        self.follower = _Follower(config, CHURN, FEATURES_VERSION)

    def body_limit(self, path: str) -> int:
        """Most bytes of a request body (JSON lists of user ids)."""
        return self.config.max_json_body_bytes

    async def churn_answers(self, user_ids: list[str]) -> list[dict[str, Any]]:
        """One answer per user, in order (the routes' entry).

        A single user joins the next batch of concurrent requests; many users are
        scored in chunks (:data:`CHUNK_USERS`).
        """
        if len(user_ids) == 1:
            answer: dict[str, Any] = await self.score(user_ids[0])
            return [answer]
        out: list[dict[str, Any]] = []
        for at in range(0, len(user_ids), CHUNK_USERS):
            out += await self._scored(user_ids[at : at + CHUNK_USERS], in_thread=True)
        return out

    async def _scored(self, user_ids: list[str], in_thread: bool) -> list[dict[str, Any]]:
        """One answer per user: the score, or ``{"error": ...}`` saying why there is none."""
        model, version = self.follower.model, self.follower.version
        if model is None:
            return [{"error": "unavailable", "detail": self.follower.problem}] * len(user_ids)
        rows = await self.pool.user_rows(user_ids)
        if in_thread:
            answers = await asyncio.to_thread(churn_answers, model, version, rows)
        else:
            answers = churn_answers(model, version, rows)
        return [
            a if a is not None else {"error": "unknown_user", "detail": f"unknown user {u!r}"}
            for u, a in zip(user_ids, answers, strict=True)
        ]

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's hook for a new ``user_config``: load the version it names."""
        await self.follower.configure(user_config, ChurnModel)

    def model_version(self) -> dict[str, Any]:
        """The version served and why none is, if none."""
        return {
            "version": self.follower.version,
            "problem": self.follower.problem,
            "shard_reads": _read_counts(self.pool),
            "api_latency_ms": self.api_latency.percentiles(),
        }

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0005, max_concurrent_batches=4)
    async def score(self, user_ids: list[str]) -> list[dict[str, Any]]:
        """Concurrent single requests, grouped: one call per shard, one model call."""
        return await self._scored(user_ids, in_thread=False)


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=256,
    user_config={"version": "current"},
)
@serve.ingress(personalize_api)
class Personalizer:
    """Recommends and re-ranks items for users on their live state and the merged item index;
    answers ``/v1/personalize``."""

    def __init__(self, config: ModelsConfig) -> None:
        self.config = config
        self.guard = Guard(config.auth)
        self.api_latency = LatencyRing()
        self.pool = config.connect_pool()
        self.follower = _Follower(config, PERSONALIZATION, pair_schema().version)
        self.index = ItemIndex.empty()
        self.index_at = 0.0
        self._index_task: asyncio.Task[None] | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's hook for a new ``user_config``: load the version it names."""
        await self.follower.configure(user_config, Ranker)
        if self._index_task is None:
            with contextlib.suppress(RuntimeError):
                self._index_task = asyncio.get_running_loop().create_task(self._refresh_index())

    async def _refresh_index(self) -> None:
        """Merge the shards' item partials into a fresh index, on a timer.

        Only when a partition's items changed, and never more often than five times
        the last refresh took (the shards' partials and the merge), so it stays a
        small share of the shards' and the replica's CPU. Under steady ingest every
        partition changes, and each refresh still pauses the shards and the replica
        (see the serving bench's under-ingest run).
        """
        partials: dict[int, dict[str, Any]] = {}  # partition -> its latest partial
        while True:
            pause = self.config.item_refresh_s
            try:
                known = {p: partial["version"] for p, partial in partials.items()}
                started = time.perf_counter()
                fresh = await self.pool.item_partials(self.config.item_top_n, known)
                changed = {p: f for p, f in fresh.items() if f is not None}
                if changed or set(fresh) != set(partials):
                    # Partitions no shard reports any more are dropped (none, normally).
                    partials = {p: changed.get(p) or partials[p] for p in fresh}
                    merged = list(partials.values())
                    self.index = await asyncio.to_thread(ItemIndex.merge, merged)
                    pause = max(pause, 5 * (time.perf_counter() - started))
                self.index_at = time.time()
            except Exception:  # a restarting shard: keep the last index
                log.warning("could not refresh the item index", exc_info=True)
            await asyncio.sleep(pause)

    def body_limit(self, path: str) -> int:
        """Most bytes of a request body (user ids, items to rank)."""
        return self.config.max_json_body_bytes

    async def top_items(self, user_ids: list[str], k: int) -> list[dict[str, Any]]:
        """Top-``k`` per user, in order (the routes' entry).

        A single user joins the next batch of concurrent requests; many users are
        answered in chunks (:data:`CHUNK_USERS`).
        """
        if len(user_ids) == 1:
            batched: Any = self.recommend  # type: ignore[misc]  # @serve.batch: its typing
            answer: dict[str, Any] = await batched(user_ids[0], k)
            return [answer]
        room = asyncio.Semaphore(CHUNKS_IN_FLIGHT)

        async def chunk_of(at: int) -> list[dict[str, Any]]:
            chunk = user_ids[at : at + CHUNK_USERS]
            async with room:
                return await self._recommended(chunk, [k] * len(chunk), in_thread=True)

        chunks = await asyncio.gather(*map(chunk_of, range(0, len(user_ids), CHUNK_USERS)))
        return [answer for chunk in chunks for answer in chunk]

    async def ranked_items(self, user_id: str, items: list[str]) -> dict[str, Any]:
        """``items`` ordered for ``user_id`` (the route's entry)."""
        batched: Any = self.rank  # type: ignore[misc]
        answer: dict[str, Any] = await batched(user_id, items)
        return answer

    def _header(self) -> dict[str, Any]:
        return {"model_version": self.follower.version, "items_indexed": len(self.index)}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0005, max_concurrent_batches=4)  # type: ignore[arg-type]
    async def recommend(  # type: ignore[misc]
        self, user_ids: list[str], ks: list[int]
    ) -> list[dict[str, Any]]:
        """Concurrent single requests, grouped (see :meth:`_recommended`)."""
        return await self._recommended(user_ids, ks, in_thread=False)

    async def _recommended(
        self, user_ids: list[str], ks: list[int], in_thread: bool
    ) -> list[dict[str, Any]]:
        """Top-k per user with reasons; unknown users get the popular items (cold start).

        One call per shard for the rows, one for the seen-items check, one model call.
        """
        ranker, index, header = self.follower.model, self.index, self._header()
        rows = await self.pool.user_rows(user_ids)
        limits = self.config.limits

        def proposals() -> list[dict[str, str]]:
            return [propose(index, rows, i, limits) for i in range(len(user_ids))]

        proposed = await asyncio.to_thread(proposals) if in_thread else proposals()
        checks = [(u, list(c)) for u, c, h in zip(user_ids, proposed, rows.held, strict=True) if h]
        flags = iter(await self.pool.seen(checks)) if checks else iter(())
        candidates = []
        for i, found in enumerate(proposed):
            if rows.held[i]:
                seen = next(flags)
                fresh = {c: why for (c, why), s in zip(found.items(), seen, strict=True) if not s}
                found = fresh or found  # all seen: better something than nothing
            candidates.append(found)

        def answers() -> list[dict[str, Any]]:
            scores = scores_many(ranker, index, rows, [list(c) for c in candidates])
            return [
                {
                    "user_id": user,
                    "cold_start": not bool(rows.held[i]),
                    "items": recommend(ranker, index, rows, i, candidates[i], ks[i], scores[i]),
                }
                | header
                for i, user in enumerate(user_ids)
            ]

        return await asyncio.to_thread(answers) if in_thread else answers()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0005, max_concurrent_batches=4)  # type: ignore[arg-type]
    async def rank(  # type: ignore[misc]
        self, user_ids: list[str], items: list[list[str]]
    ) -> list[dict[str, Any]]:
        """The given items per user, ordered by the model's score for that user."""
        ranker, index = self.follower.model, self.index
        rows = await self.pool.user_rows(user_ids)
        scores = scores_many(ranker, index, rows, items)
        return [
            {
                "user_id": user,
                "cold_start": not bool(rows.held[i]),
                "items": rank_items(ranker, index, rows, i, items[i], scores[i]),
            }
            | self._header()
            for i, user in enumerate(user_ids)
        ]

    def model_version(self) -> dict[str, Any]:
        """The version served, the index size and age, and why no model is served, if so."""
        return {
            "version": self.follower.version,
            "problem": self.follower.problem,
            "items_indexed": len(self.index),
            "index_age_s": round(time.time() - self.index_at, 1) if self.index_at else None,
            "shard_reads": _read_counts(self.pool),
            "api_latency_ms": self.api_latency.percentiles(),
        }
