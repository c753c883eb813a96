"""Training with Ray Data: group history by user, replay it, build examples, fit, register.

This is the Ray edge of :mod:`models`: the per-user replays of
:mod:`models.examples` run as a Ray Data ``groupby("user_id").map_groups``,
so they spread over the cluster's CPUs; fitting runs in the caller. The
caller must have started Ray (``audience train`` does).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import ray

from actors.state import DAY_MS, UserRows
from models.candidates import ItemIndex, pair_columns
from models.churn import ChurnModel
from models.examples import (
    churn_examples,
    interacted,
    item_index,
    ranking_states,
    sample_negatives,
)
from models.features import BEHAVIOUR_FEATURES, TraitEncoder, user_schema
from models.ranker import Ranker


@dataclass(frozen=True)
class ChurnPlan:
    """How churn examples are cut from history.

    Attributes:
        horizon_days: churned = no event in this many days after the cutoff.
        train_cutoffs: how many cutoffs (``horizon`` apart) make training examples.
    """

    horizon_days: float = 30.0
    train_cutoffs: int = 6


def per_user(frame: pd.DataFrame, fn: Any, **kwargs: Any) -> pd.DataFrame:
    """Run ``fn(one user's events, **kwargs)`` per user with Ray Data; concatenated results."""
    ds = ray.data.from_pandas(frame.drop(columns=["traits", "properties"]).assign(
        traits=frame["traits"].map(_json_ready), properties=None
    ))  # fmt: skip
    out = ds.groupby("user_id").map_groups(
        lambda g: fn(_restore(g), **kwargs), batch_format="pandas"
    )
    parts = [b for b in out.iter_batches(batch_format="pandas", batch_size=None) if len(b)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _json_ready(traits: Any) -> Any:
    return None if not traits else pickle.dumps(traits)


def _restore(group: pd.DataFrame) -> pd.DataFrame:
    """Undo what ``per_user`` did to cross Arrow, and put the user's events in replay order."""
    group = group.assign(
        traits=group["traits"].map(lambda t: pickle.loads(t) if isinstance(t, bytes) else None)
    )
    return group.sort_values("ts", kind="stable").reset_index(drop=True)


def churn_cutoffs(end_ms: int, plan: ChurnPlan, offset: int) -> list[int]:
    """Cutoffs ``offset``, ``offset+1``... horizons before ``end_ms`` (labels fit before it)."""
    h = int(plan.horizon_days * DAY_MS)
    return [end_ms - (offset + i) * h for i in range(plan.train_cutoffs)][::-1]


def churn_frame(frame: pd.DataFrame, cutoffs: list[int], plan: ChurnPlan) -> pd.DataFrame:
    """Churn examples for every user at each cutoff (Ray Data, per user)."""
    h = int(plan.horizon_days * DAY_MS)
    return per_user(frame, churn_examples, cutoffs=cutoffs, horizon_ms=h)


def churn_columns(examples: pd.DataFrame, traits: TraitEncoder) -> dict[str, np.ndarray]:
    """Feature columns of churn examples (behaviour from the replay, traits encoded)."""
    columns = {
        n: examples[n].to_numpy(dtype=np.float64, na_value=np.nan) for n in BEHAVIOUR_FEATURES
    }
    return {**columns, **traits.columns([t or {} for t in examples["traits"]])}


def train_churn(
    frame: pd.DataFrame, plan: ChurnPlan, *, seed: int = 0
) -> tuple[ChurnModel, dict[str, Any]]:
    """Fit on cutoffs 2..n horizons before the end, evaluate on the cutoff one horizon before.

    The time split means the evaluation labels lie after every training label.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    end = int(frame["ts"].max()) + 1
    train_cut = churn_cutoffs(end, plan, offset=2)
    test_cut = [end - int(plan.horizon_days * DAY_MS)]
    examples = churn_frame(frame, train_cut + test_cut, plan)
    if examples.empty:
        raise ValueError("no user was active before any cutoff; the history is too short")
    train = examples[examples["cutoff"].isin(train_cut)]
    test = examples[examples["cutoff"].isin(test_cut)]
    traits = TraitEncoder.fit([t or {} for t in train["traits"]])
    schema = user_schema(traits)
    window = {"start_ms": int(frame["ts"].min()), "end_ms": end}
    model = ChurnModel.train(
        churn_columns(train, traits),
        train["churned"].to_numpy(),
        schema,
        seed=seed,
        meta={"training_window": window, "horizon_days": plan.horizon_days},
    )
    metrics: dict[str, Any] = {"train_examples": len(train), "test_examples": len(test)}
    y = test["churned"].to_numpy()
    if len(np.unique(y)) == 2:
        p = model.predict(churn_columns(test, traits))
        metrics.update(
            roc_auc=float(roc_auc_score(y, p)), pr_auc=float(average_precision_score(y, p))
        )
    model.model.meta["metrics"] = metrics
    return model, metrics


def drop_last_items(frame: pd.DataFrame, n: int) -> pd.DataFrame:
    """The frame without each user's last ``n`` item interactions (frame order)."""
    has = frame["item_id"].notna()
    rank = frame[has].groupby("user_id").cumcount(ascending=False)
    dropped = rank.index[rank.to_numpy() < n]
    return frame.drop(index=dropped)


def ranking_columns(
    index: ItemIndex, states: pd.DataFrame, candidates: list[list[str]]
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Pair features of each state's candidates, stacked; and the group sizes."""
    parts: dict[str, list[np.ndarray]] = {}
    groups = []
    for blob, items in zip(states["rows"], candidates, strict=True):
        rows: UserRows = pickle.loads(blob)
        cols = pair_columns(index, rows, 0, index.positions(items))
        for name, values in cols.items():
            parts.setdefault(name, []).append(values)
        groups.append(len(items))
    return {k: np.concatenate(v) for k, v in parts.items()}, groups


def train_ranker(
    frame: pd.DataFrame, *, labels: int = 5, negatives: int = 100, seed: int = 0
) -> Ranker:
    """LambdaRank on each user's last ``labels`` item interactions against sampled negatives.

    Item stats come from the history without those label interactions, user
    state from a replay up to each label, so nothing the label reveals leaks in.
    """
    states = per_user(frame, ranking_states, labels=labels)
    states = states.sort_values(["user_id", "cutoff"], kind="stable", ignore_index=True)
    if states.empty:
        raise ValueError("no user has two item interactions; nothing to learn from")
    index = item_index(drop_last_items(frame, labels))
    touched = interacted(frame)
    negs = sample_negatives(list(states["user_id"]), index.items, touched, negatives, seed)
    candidates = [[label, *n] for label, n in zip(states["label_item"], negs, strict=True)]
    columns, groups = ranking_columns(index, states, candidates)
    relevance = np.concatenate([[1.0] + [0.0] * (g - 1) for g in groups])
    window = {"start_ms": int(frame["ts"].min()), "end_ms": int(frame["ts"].max()) + 1}
    ranker = Ranker.train(
        columns, relevance, groups, seed=seed,
        meta={"training_window": window, "label_positions": labels, "negatives": negatives},
    )  # fmt: skip
    return ranker
