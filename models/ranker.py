"""The personalization ranker: LightGBM LambdaRank over user-item pair features.

Training groups are one label item and its sampled negatives per user
cutoff; serving scores the candidates of one user at a time (top-k) or the
items a caller sends (re-ranking).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightgbm as lgb
import numpy as np

from models.booster import BoosterModel
from models.candidates import PAIR_FEATURES, PAIR_FEATURES_VERSION
from models.features import FeatureSchema

KIND = "personalization"

DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "lambdarank",
    "learning_rate": 0.03,
    "num_leaves": 15,
    "min_data_in_leaf": 20,
    "lambdarank_truncation_level": 20,
    "num_threads": 1,
    "deterministic": True,
    "force_row_wise": True,
    "verbosity": -1,
}
DEFAULT_ROUNDS = 600


def pair_schema() -> FeatureSchema:
    """The schema of :func:`models.candidates.pair_columns`."""
    return FeatureSchema(version=PAIR_FEATURES_VERSION, names=PAIR_FEATURES)


class Ranker:
    """Scores (user, item) pairs; higher is a better next item for the user."""

    def __init__(self, model: BoosterModel) -> None:
        self.model = model

    @property
    def schema(self) -> FeatureSchema:
        """The features the model takes."""
        return self.model.schema

    @classmethod
    def train(
        cls,
        columns: dict[str, np.ndarray],
        relevance: np.ndarray,
        groups: Sequence[int],
        *,
        seed: int = 0,
        rounds: int = DEFAULT_ROUNDS,
        params: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Ranker:
        """Fit LambdaRank; ``groups`` are the sizes of consecutive query groups."""
        schema = pair_schema()
        x = schema.matrix(columns)
        settings = {**DEFAULT_PARAMS, **(params or {}), "seed": seed}
        data = lgb.Dataset(
            x, np.asarray(relevance, dtype=np.float64), group=list(groups),
            feature_name=list(schema.names),
        )  # fmt: skip
        booster = lgb.train(settings, data, num_boost_round=rounds)
        meta = {**(meta or {}), "params": {**settings, "rounds": rounds}}
        return cls(BoosterModel(KIND, booster, schema, meta))

    def score(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """One score per pair row."""
        return self.model.raw_scores(columns)
