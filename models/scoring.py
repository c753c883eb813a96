"""Answers of the model endpoints, from live user rows: plain Python, no Ray.

The Serve deployments fetch :class:`~actors.state.UserRows` for a request batch
from the owning shards and call these functions, so what a response says (the
score, the reasons, the cold-start answer) is unit-tested here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.state import UserRows, iso_ms
from models.candidates import ItemIndex, pair_columns
from models.churn import ChurnModel
from models.features import TraitEncoder, user_columns
from models.ranker import Ranker


@dataclass(frozen=True)
class CandidateLimits:
    """How many items candidate generation proposes.

    Attributes:
        per_recent_item: co-visited partners taken per recent item (and per
            favourite category).
        popular: most popular items added for everyone (and all a cold user gets).
        scored: at most this many candidates go to the ranker, the ones with the
            most co-visitation with the user's recent items first (a cheap first
            stage, so a request costs a bounded amount of model time).
    """

    per_recent_item: int = 20
    popular: int = 50
    scored: int = 100


def churn_answers(
    model: ChurnModel, version: str, rows: UserRows, top_reasons: int = 3
) -> list[dict[str, Any] | None]:
    """Per user, the churn probability with its reasons; None for users the shards do not hold.

    Time features are taken as of the owning shard's newest event time (the
    stream's "now", which is also what segments use): live traffic reads as
    wall-clock recency, and a replayed history is scored as of its own end.
    """
    held = np.flatnonzero(rows.held)
    out: list[dict[str, Any] | None] = [None] * len(rows)
    if not held.size:
        return out
    known = rows.take(held.tolist())
    now = np.maximum(known.as_of, known.last)
    columns = user_columns(known, now, TraitEncoder.from_schema(model.schema))
    probability = model.predict(columns)
    reasons = model.reasons(columns, top_reasons)
    names = list(columns)
    values = np.column_stack([columns[n] for n in names])
    for j, (i, p, why) in enumerate(zip(held.tolist(), probability.tolist(), reasons, strict=True)):
        out[i] = {
            "user_id": rows.user_ids[i],
            "churn_probability": p,
            "reasons": [r.to_dict() for r in why],
            "as_of": iso_ms(int(now[j])),
            "features": {
                n: None if np.isnan(v) else v
                for n, v in zip(names, values[j].tolist(), strict=True)
            },
            "model_version": version,
        }
    return out


def propose(index: ItemIndex, rows: UserRows, user: int, limits: CandidateLimits) -> dict[str, str]:
    """Candidate items (id -> why proposed) for one user; the user's recent items excluded."""
    recent = rows.recent[user]
    found = index.candidates(recent, rows.affinity[user], limits.per_recent_item, limits.popular)
    mine = set(recent)
    kept = [p for p in found if index.items[p] not in mine]
    if len(kept) > limits.scored:
        at = index.positions(recent)
        weights = index.covis(at[:, None], np.asarray(kept)[None, :]).sum(axis=0)
        popularity = index.count[kept] / max(float(index.count.max()), 1.0)
        best = np.argsort(-(weights + popularity), kind="stable")[: limits.scored]
        kept = [kept[i] for i in sorted(best.tolist())]
    return {index.items[p]: found[p] for p in kept}


def recommend(
    ranker: Ranker | None,
    index: ItemIndex,
    rows: UserRows,
    user: int,
    candidates: dict[str, str],
    k: int,
    scores: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """The ``k`` best candidates with scores and reasons (popularity order without a ranker).

    ``scores``: the candidates' scores in ``candidates``' order, when the caller
    scored a whole batch at once (:func:`scores_many`).
    """
    items = list(candidates)
    if not items:
        return []
    positions = index.positions(items)
    if scores is None:
        scores = _scores(ranker, index, rows, user, positions)
    top = np.argsort(-scores, kind="stable")[:k]
    top_list = top.tolist()
    partners = (
        index.top_partners(rows.recent[user], positions[top])
        if rows.held[user]
        else [None] * len(top_list)
    )
    out = []
    for i, partner in zip(top_list, partners, strict=True):
        why = candidates[items[i]]
        if why.startswith("viewed with") and partner:
            why = f"viewed with {partner}"
        out.append({"item_id": items[i], "score": float(scores[i]), "reason": why})
    return out


def rank_items(
    ranker: Ranker | None,
    index: ItemIndex,
    rows: UserRows,
    user: int,
    items: Sequence[str],
    scores: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """``items`` ordered by score for the user, each with its score (re-ranking)."""
    if not items:
        return []
    positions = index.positions(items)
    if scores is None:
        scores = _scores(ranker, index, rows, user, positions)
    order = np.argsort(-scores, kind="stable")
    return [
        {"item_id": items[i], "score": float(scores[i]), "known_item": bool(positions[i] >= 0)}
        for i in order.tolist()
    ]


def _scores(
    ranker: Ranker | None, index: ItemIndex, rows: UserRows, user: int, positions: np.ndarray
) -> np.ndarray:
    """The ranker's scores, or log popularity for a cold user or when no model is loaded.

    An empty index (no item merged yet: a fresh platform, a replica just started)
    knows no item: every score is then 0, whatever the model.
    """
    if not len(index.count):
        return np.zeros(len(positions))
    if ranker is None or not rows.held[user]:
        return np.log1p(np.where(positions >= 0, index.count[np.maximum(positions, 0)], 0.0))
    return ranker.score(pair_columns(index, rows, user, positions))


def scores_many(
    ranker: Ranker | None, index: ItemIndex, rows: UserRows, items: Sequence[Sequence[str]]
) -> list[np.ndarray]:
    """The scores of ``items[i]`` for user ``i`` of ``rows``, the ranker's in one call.

    The same numbers as scoring each user alone (a tree ensemble scores each row
    on its own), with LightGBM's fixed cost per call paid once per batch.
    """
    positions = [index.positions(list(some)) for some in items]
    out: list[np.ndarray] = [np.zeros(0)] * len(items)
    by_model = []
    for user, at in enumerate(positions):
        if not len(at):
            continue
        if ranker is None or not len(index.count) or not rows.held[user]:
            out[user] = _scores(ranker, index, rows, user, at)
        else:
            by_model.append(user)
    if by_model and ranker is not None:
        parts = [pair_columns(index, rows, user, positions[user]) for user in by_model]
        merged = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        scored = ranker.score(merged)
        ends = np.cumsum([len(positions[user]) for user in by_model])
        for user, end, size in zip(
            by_model, ends, (len(positions[u]) for u in by_model), strict=True
        ):
            out[user] = scored[end - size : end]
    return out
