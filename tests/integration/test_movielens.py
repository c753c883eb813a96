"""The evaluation protocols on the real datasets, offline and through the live pipeline.

The data is not part of the project (license): it is read from ``../shared/data``
next to the project (or ``AUDIENCE_SHARED_DATA``), and these tests skip when it
is absent.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cluster.evaluate import evaluate_live
from cluster.launcher import Platform
from cluster.replay import replay_history
from models.evaluation import evaluate_churn_history, evaluate_ranking_offline, evaluate_telco
from models.history import read_ratings
from models.ranker import Ranker
from models.registry import ModelRegistry

pytestmark = pytest.mark.integration

DATA = Path(os.environ.get("AUDIENCE_SHARED_DATA", Path(__file__).parents[3] / "shared" / "data"))
MOVIELENS = DATA / "ml-latest-small"
TELCO = DATA / "telco-churn" / "Telco-Customer-Churn.csv"

needs_movielens = pytest.mark.skipif(
    not (MOVIELENS / "ratings.csv").exists(),
    reason=f"MovieLens latest-small not found at {MOVIELENS} (set AUDIENCE_SHARED_DATA)",
)


@pytest.fixture(scope="module")
def ratings() -> pd.DataFrame:
    return read_ratings(MOVIELENS / "ratings.csv", MOVIELENS / "movies.csv")


@pytest.fixture(scope="module")
def offline(ray_local: int, ratings: pd.DataFrame) -> tuple[dict[str, Any], Ranker]:
    return evaluate_ranking_offline(ratings, seed=0)


@needs_movielens
def test_the_ranker_beats_both_baselines_on_movielens(
    offline: tuple[dict[str, Any], Ranker],
) -> None:
    results, _ = offline
    model, covis, popular = (
        results["personalization"],
        results["covisitation"],
        results["popularity"],
    )
    assert model["users"] == 610
    assert model["hr_at_10"] > covis["hr_at_10"] > popular["hr_at_10"]
    assert model["ndcg_at_10"] > covis["ndcg_at_10"] > popular["ndcg_at_10"]


@needs_movielens
def test_the_live_pipeline_answers_what_the_offline_evaluation_measured(
    platform: Platform,
    offline: tuple[dict[str, Any], Ranker],
    ratings: pd.DataFrame,
    api_key: str,
) -> None:
    results, ranker = offline
    assert platform.info is not None

    def replay(frame: pd.DataFrame) -> Any:
        producer = platform.credentials("producer")
        return asyncio.run(
            replay_history(
                platform.nats_url, platform.settings.partitions, frame, credentials=producer
            )
        )

    registry = ModelRegistry(platform.settings.registry_path)
    live = evaluate_live(
        ratings, ranker, registry, platform.info.http_url, replay, seed=0, api_key=api_key
    )
    assert live["personalization"]["users"] == 610
    offline_hr = results["personalization"]["hr_at_10"]
    assert abs(live["personalization"]["hr_at_10"] - offline_hr) < 0.03


@needs_movielens
def test_movielens_churn_separates_users_who_stopped_rating(
    ray_local: int, ratings: pd.DataFrame
) -> None:
    metrics = evaluate_churn_history(ratings, horizon_days=30)
    assert metrics["test_examples"] > 500 and metrics["roc_auc"] > 0.9


@pytest.mark.skipif(not TELCO.exists(), reason=f"Telco churn table not found at {TELCO}")
def test_telco_traits_through_the_state_code_predict_churn() -> None:
    metrics = evaluate_telco(TELCO)
    assert metrics["customers"] == 7043 and metrics["roc_auc"] > 0.83
