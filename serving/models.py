"""Ray Serve deployments that score the churn and personalization models on live features.

Each replica loads its model from the registry in ``reconfigure`` (Serve calls
it with the deployment's ``user_config``; a new ``user_config`` swaps models in
place without restarting replicas) and, when the configured version is
``"current"``, follows the registry's CURRENT pointer on a timer, so
``audience models promote`` rolls a version out to every replica. A swap is one
reference assignment after the new model is loaded: a request batch scores
with the model it started with, and none is dropped.

Requests are grouped with ``@serve.batch``; each batch costs one call per shard
involved for the users' rows (plus one for the seen-items check of a top-k).
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from actors.pool import PoolSpec, ShardPool
from models.booster import ArtifactError
from models.candidates import ItemIndex
from models.churn import KIND as CHURN
from models.churn import ChurnModel
from models.examples import ITEM_TOP_N
from models.features import FEATURES_VERSION
from models.ranker import KIND as PERSONALIZATION
from models.ranker import Ranker, pair_schema
from models.registry import ModelRegistry
from models.scoring import CandidateLimits, churn_answers, propose, rank_items, recommend

log = logging.getLogger(__name__)

NO_MODEL = "none"


@dataclass(frozen=True)
class ModelsConfig:
    """What the model deployments need, handed down by the launcher."""

    pool: PoolSpec
    registry: str
    poll_s: float = 5.0
    item_refresh_s: float = 5.0
    item_top_n: int = ITEM_TOP_N
    limits: CandidateLimits = field(default_factory=CandidateLimits)


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

    def configure(self, user_config: dict[str, Any], wrap: Any) -> None:
        """Load the configured version now; keep following CURRENT when it is ``"current"``."""
        self.wanted = str(user_config.get("version", "current"))
        self.wrap = wrap
        self.refresh()
        if self._task is None:
            with contextlib.suppress(RuntimeError):  # no running loop: no following
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
class ChurnScorer:
    """Scores churn for users on their live state."""

    def __init__(self, config: ModelsConfig) -> None:
        self.pool = ShardPool.connect(config.pool)
        self.follower = _Follower(config, CHURN, FEATURES_VERSION)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's hook for a new ``user_config``: load the version it names."""
        self.follower.configure(user_config, ChurnModel)

    def model_version(self) -> dict[str, Any]:
        """The version served and why none is, if none."""
        return {"version": self.follower.version, "problem": self.follower.problem}

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0005, max_concurrent_batches=4)
    async def score(self, user_ids: list[str]) -> list[dict[str, Any]]:
        """One answer per user: the score, or ``{"error": ...}`` saying why there is none."""
        model, version = self.follower.model, self.follower.version
        if model is None:
            return [{"error": "unavailable", "detail": self.follower.problem}] * len(user_ids)
        rows = await self.pool.user_rows(user_ids)
        answers = churn_answers(model, version, rows)
        return [
            a if a is not None else {"error": "unknown_user", "detail": f"unknown user {u!r}"}
            for u, a in zip(user_ids, answers, strict=True)
        ]


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=256,
    user_config={"version": "current"},
)
class Personalizer:
    """Recommends and re-ranks items for users on their live state and the merged item index."""

    def __init__(self, config: ModelsConfig) -> None:
        self.config = config
        self.pool = ShardPool.connect(config.pool)
        self.follower = _Follower(config, PERSONALIZATION, pair_schema().version)
        self.index = ItemIndex.empty()
        self.index_at = 0.0
        self._index_task: asyncio.Task[None] | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's hook for a new ``user_config``: load the version it names."""
        self.follower.configure(user_config, Ranker)
        if self._index_task is None:
            with contextlib.suppress(RuntimeError):
                self._index_task = asyncio.get_running_loop().create_task(self._refresh_index())

    async def _refresh_index(self) -> None:
        """Merge the shards' item partials into a fresh index, on a timer.

        Only when a partition's items changed, and never more often than five times
        the last merge took, so the merge stays a small share of a replica's CPU.
        """
        partials: dict[int, dict[str, Any]] = {}  # partition -> its latest partial
        while True:
            pause = self.config.item_refresh_s
            try:
                known = {p: partial["version"] for p, partial in partials.items()}
                fresh = await self.pool.item_partials(self.config.item_top_n, known)
                changed = {p: f for p, f in fresh.items() if f is not None}
                if changed or set(fresh) != set(partials):
                    # Partitions no shard reports any more are dropped (none, normally).
                    partials = {p: changed.get(p) or partials[p] for p in fresh}
                    started = time.perf_counter()
                    merged = list(partials.values())
                    self.index = await asyncio.to_thread(ItemIndex.merge, merged)
                    pause = max(pause, 5 * (time.perf_counter() - started))
                self.index_at = time.time()
            except Exception:  # a restarting shard: keep the last index
                log.warning("could not refresh the item index", exc_info=True)
            await asyncio.sleep(pause)

    def _header(self) -> dict[str, Any]:
        return {"model_version": self.follower.version, "items_indexed": len(self.index)}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0005, max_concurrent_batches=4)  # type: ignore[arg-type]
    async def recommend(  # type: ignore[misc]
        self, user_ids: list[str], ks: list[int]
    ) -> list[dict[str, Any]]:
        """Top-k per user with reasons; unknown users get the popular items (cold start)."""
        ranker, index = self.follower.model, self.index
        rows = await self.pool.user_rows(user_ids)
        proposed = [propose(index, rows, i, self.config.limits) for i in range(len(user_ids))]
        checks = [(u, list(c)) for u, c, h in zip(user_ids, proposed, rows.held, strict=True) if h]
        flags = iter(await self.pool.seen(checks)) if checks else iter(())
        out = []
        for i, user in enumerate(user_ids):
            candidates = proposed[i]
            if rows.held[i]:
                seen = next(flags)
                fresh = {
                    c: why for (c, why), s in zip(candidates.items(), seen, strict=True) if not s
                }
                candidates = fresh or candidates  # all seen: better something than nothing
            items = recommend(ranker, index, rows, i, candidates, ks[i])
            out.append(
                {"user_id": user, "cold_start": not bool(rows.held[i]), "items": items}
                | self._header()
            )
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0005, max_concurrent_batches=4)  # type: ignore[arg-type]
    async def rank(  # type: ignore[misc]
        self, user_ids: list[str], items: list[list[str]]
    ) -> list[dict[str, Any]]:
        """The given items per user, ordered by the model's score for that user."""
        ranker, index = self.follower.model, self.index
        rows = await self.pool.user_rows(user_ids)
        return [
            {
                "user_id": user,
                "cold_start": not bool(rows.held[i]),
                "items": rank_items(ranker, index, rows, i, items[i]),
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
        }
