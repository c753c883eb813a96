"""The evaluation protocols: leave-last-out ranking on MovieLens, churn by time split, Telco CV.

Ranking follows the protocol of this project's dashboard and of Kang & McAuley
(2018): per user, the last interaction (by timestamp, then item) is the test
item, ranked against ``negatives`` items drawn uniformly (seeded) from those
the user never touched; HR@10 and NDCG@10, ties broken at random in
expectation. The popularity and co-visitation baselines score the same
candidates from the same item index.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from actors.state import UserStateTable
from models.churn import ChurnModel
from models.examples import final_state, interacted, item_index, sample_negatives
from models.features import TraitEncoder, user_columns, user_schema
from models.history import frame_to_batch, holdout_last, read_telco
from models.ranker import Ranker
from models.training import ChurnPlan, per_user, ranking_columns, train_churn, train_ranker

K = 10


def rank_of_positive(scores: np.ndarray) -> float:
    """0-based rank of ``scores[0]`` among all, ties counted half (expected random tie-break)."""
    pos, rest = scores[0], scores[1:]
    return float(np.count_nonzero(rest > pos) + 0.5 * np.count_nonzero(rest == pos))


def hit_and_ndcg(groups: Sequence[np.ndarray], k: int = K) -> dict[str, float]:
    """HR@k and NDCG@k over groups whose first score is the positive."""
    ranks = np.array([rank_of_positive(s) for s in groups])
    hit = ranks < k
    ndcg = np.where(hit, 1.0 / np.log2(np.floor(ranks) + 2.0), 0.0)
    return {
        f"hr_at_{k}": float(hit.mean()),
        f"ndcg_at_{k}": float(ndcg.mean()),
        "users": len(groups),
    }


def split_groups(scores: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """Cut a flat score array into consecutive groups."""
    return np.split(scores, np.cumsum(sizes)[:-1])


def ranking_split(frame: pd.DataFrame, negatives: int, seed: int) -> dict[str, Any]:
    """The leave-last-out split: history without test items, and each user's candidates."""
    train, test = holdout_last(frame)
    touched = interacted(frame)
    all_items = sorted(set(frame["item_id"].dropna().map(str)))
    users = [str(u) for u in test["user_id"]]
    negs = sample_negatives(users, all_items, touched, negatives, seed)
    candidates = {
        u: [str(item), *n] for u, item, n in zip(users, test["item_id"], negs, strict=True)
    }
    return {"train": train, "candidates": candidates}


def evaluate_ranking_offline(
    frame: pd.DataFrame, *, negatives: int = 100, seed: int = 0, labels: int = 5
) -> tuple[dict[str, Any], Ranker]:
    """Train on the history without the test items, then score the model and the baselines."""
    split = ranking_split(frame, negatives, seed)
    train, candidates = split["train"], split["candidates"]
    ranker = train_ranker(train, labels=labels, seed=seed)
    index = item_index(train)
    states = per_user(train, final_state)
    states = states[states["user_id"].isin(candidates)].sort_values("user_id", ignore_index=True)
    lists = [candidates[u] for u in states["user_id"]]
    columns, sizes = ranking_columns(index, states, lists)
    results = {
        "personalization": hit_and_ndcg(split_groups(ranker.score(columns), sizes)),
        "popularity": hit_and_ndcg(split_groups(columns["item_popularity"], sizes)),
        "covisitation": hit_and_ndcg(split_groups(columns["covis_sum"], sizes)),
    }
    return results, ranker


def evaluate_churn_history(frame: pd.DataFrame, horizon_days: float = 30.0) -> dict[str, Any]:
    """Churn = no event in the last ``horizon_days`` of the data, among users active before."""
    _, metrics = train_churn(frame, ChurnPlan(horizon_days=horizon_days))
    return metrics


def evaluate_telco(path: Path, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Telco customers loaded as ``identify`` traits through the state code; k-fold ROC AUC."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    at_ms = 1_700_000_000_000
    frame, labels = read_telco(path, at_ms)
    table = UserStateTable(capacity=len(frame))
    table.apply(frame_to_batch(frame))
    users = [str(u) for u in frame["user_id"]]
    rows = table.user_rows(users)
    traits = TraitEncoder.fit(rows.traits)
    columns = user_columns(rows, at_ms, traits)
    y = labels.loc[users].to_numpy().astype(int)
    aucs = []
    for fit_at, test_at in StratifiedKFold(folds, shuffle=True, random_state=seed).split(users, y):
        fit = {k: v[fit_at] for k, v in columns.items()}
        test = {k: v[test_at] for k, v in columns.items()}
        model = ChurnModel.train(fit, y[fit_at], user_schema(traits), seed=seed)
        aucs.append(float(roc_auc_score(y[test_at], model.predict(test))))
    return {"roc_auc": float(np.mean(aucs)), "roc_auc_folds": aucs, "customers": len(users)}
