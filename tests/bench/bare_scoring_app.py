"""The serving benchmark's reference: the same models on the same features, in a bare FastAPI app.

No Ray Serve, no shard round trips: at startup it loads the two model versions
the platform serves from the same registry folder, and a snapshot of the live
features the benchmark took from the shards (per-user ``UserRows``, the merged
``ItemIndex``, and which proposed candidates each user has already touched).
Each request then costs HTTP plus the same :mod:`models.scoring` calls the
Serve deployments make, for one user.

    BENCH_BARE_SNAPSHOT=/tmp/snapshot.pickle \\
        python -m uvicorn tests.bench.bare_scoring_app:app --port 8123

The snapshot is written by :mod:`tests.bench.serving` (see ``write_snapshot``).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Query, Response

from actors.state import UserRows
from models.candidates import ItemIndex
from models.churn import KIND as CHURN
from models.churn import ChurnModel
from models.features import FEATURES_VERSION
from models.ranker import KIND as PERSONALIZATION
from models.ranker import Ranker, pair_schema
from models.registry import ModelRegistry
from models.scoring import CandidateLimits, churn_answers, propose, recommend

SNAPSHOT_ENV = "BENCH_BARE_SNAPSHOT"


@dataclass
class Snapshot:
    """What the benchmark hands the bare app (pickled): model versions and live features."""

    registry: str
    versions: dict[str, str]  # kind -> version, the ones the platform serves
    rows: UserRows  # the benchmark users, as the shards returned them
    index: ItemIndex  # the merged item index, as the Personalizer builds it
    seen: dict[str, set[str]]  # per user, the proposed candidates the shards say it touched
    limits: CandidateLimits


@dataclass
class Scoring:
    """The loaded models and the snapshot split per user."""

    churn: ChurnModel
    churn_version: str
    ranker: Ranker
    ranker_version: str
    index: ItemIndex
    limits: CandidateLimits
    rows: dict[str, UserRows]
    seen: dict[str, set[str]]


def load(path: Path) -> Scoring:
    """Read the snapshot and load its model versions from the registry."""
    snap: Snapshot = pickle.loads(path.read_bytes())
    registry = ModelRegistry(Path(snap.registry))
    churn_version, ranker_version = snap.versions[CHURN], snap.versions[PERSONALIZATION]
    return Scoring(
        churn=ChurnModel(registry.load(CHURN, churn_version, FEATURES_VERSION)),
        churn_version=churn_version,
        ranker=Ranker(registry.load(PERSONALIZATION, ranker_version, pair_schema().version)),
        ranker_version=ranker_version,
        index=snap.index,
        limits=snap.limits,
        rows={u: snap.rows.take([i]) for i, u in enumerate(snap.rows.user_ids)},
        seen=snap.seen,
    )


state: dict[str, Scoring] = {}


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    state["scoring"] = load(Path(os.environ[SNAPSHOT_ENV]))
    yield
    state.clear()


app = FastAPI(title="bare scoring reference", lifespan=lifespan)


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _unknown(user_id: str) -> Response:
    return _json({"detail": f"unknown user {user_id!r}"}, 404)


@app.get("/churn/{user_id}")
async def churn(user_id: str) -> Response:
    """As ``ChurnScorer.score`` for one user."""
    s = state["scoring"]
    rows = s.rows.get(user_id)
    if rows is None:
        return _unknown(user_id)
    answer = churn_answers(s.churn, s.churn_version, rows)[0]
    return _unknown(user_id) if answer is None else _json(answer)


@app.get("/personalize/{user_id}")
async def personalize(user_id: str, k: int = Query(default=10, ge=1, le=100)) -> Response:
    """As ``Personalizer.recommend`` for one held user (the seen check from the snapshot)."""
    s = state["scoring"]
    rows = s.rows.get(user_id)
    if rows is None or not rows.held[0]:
        return _unknown(user_id)  # only live users are benchmarked
    candidates = propose(s.index, rows, 0, s.limits)
    seen = s.seen.get(user_id, set())
    fresh = {c: why for c, why in candidates.items() if c not in seen}
    candidates = fresh or candidates  # all seen: better something than nothing
    items = recommend(s.ranker, s.index, rows, 0, candidates, k)
    return _json(
        {
            "user_id": user_id,
            "cold_start": False,
            "items": items,
            "model_version": s.ranker_version,
            "items_indexed": len(s.index),
        }
    )


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
