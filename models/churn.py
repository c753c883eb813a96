"""The churn model: LightGBM on user features, calibrated, with reasons per user.

Label: no activity in the ``horizon`` after a cutoff. The booster's margin is
calibrated to a probability by Platt scaling fitted on a slice of the training
examples the booster did not see, and the reasons are the features that pushed
a user's score up the most, from LightGBM's own per-feature contributions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightgbm as lgb
import numpy as np

from models.booster import BoosterModel
from models.features import FeatureSchema

KIND = "churn"

DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "learning_rate": 0.03,
    "num_leaves": 7,
    "min_data_in_leaf": 20,
    "min_data_per_group": 20,
    "feature_fraction": 0.7,
    "lambda_l2": 5.0,
    "cat_smooth": 20,
    "num_threads": 1,
    "deterministic": True,
    "force_row_wise": True,
    "verbosity": -1,
}
DEFAULT_ROUNDS = 300
_CALIBRATION_STREAM = 0xCA11B


@dataclass
class Reason:
    """Why a user's churn score is high: a feature, its value and how much it added."""

    feature: str
    value: float | None
    contribution: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"feature": self.feature, "value": self.value, "contribution": self.contribution}


class ChurnModel:
    """A calibrated churn classifier over a :class:`FeatureSchema`."""

    def __init__(self, model: BoosterModel) -> None:
        self.model = model
        self.calibration = tuple(model.meta.get("calibration", (1.0, 0.0)))

    @property
    def schema(self) -> FeatureSchema:
        """The features the model takes."""
        return self.model.schema

    @classmethod
    def train(
        cls,
        columns: dict[str, np.ndarray],
        labels: np.ndarray,
        schema: FeatureSchema,
        *,
        seed: int = 0,
        rounds: int = DEFAULT_ROUNDS,
        params: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> ChurnModel:
        """Fit the booster on 80% of the examples and the calibration on the other 20%."""
        x, y = schema.matrix(columns), np.asarray(labels, dtype=np.float64)
        if len(np.unique(y)) < 2:
            raise ValueError("churn training needs both churned and retained users")
        rng = np.random.default_rng((seed, _CALIBRATION_STREAM))  # apart from callers' streams
        calib = rng.random(len(y)) < 0.2
        if len(np.unique(y[calib])) < 2 or len(np.unique(y[~calib])) < 2:
            calib = np.zeros(len(y), dtype=bool)  # too few examples to hold some out
        settings = {**DEFAULT_PARAMS, **(params or {}), "seed": seed}
        categorical = [schema.names.index(n) for n in schema.categorical]
        data = lgb.Dataset(
            x[~calib],
            y[~calib],
            feature_name=list(schema.names),
            categorical_feature=categorical or "auto",
            free_raw_data=False,
        )
        booster = lgb.train(settings, data, num_boost_round=rounds)
        model = BoosterModel(KIND, booster, schema, dict(meta or {}))
        margin = model.raw_scores({n: x[calib, i] for i, n in enumerate(schema.names)})
        model.meta["calibration"] = list(_platt(margin, y[calib])) if calib.any() else [1.0, 0.0]
        model.meta["params"] = {**settings, "rounds": rounds}
        return cls(model)

    def predict(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """Calibrated probability of churn per user."""
        a, b = self.calibration
        return 1.0 / (1.0 + np.exp(-(a * self.model.raw_scores(columns) + b)))

    def reasons(self, columns: dict[str, np.ndarray], top: int = 3) -> list[list[Reason]]:
        """Per user, the ``top`` features that raised the score most (positive contributions)."""
        contrib = self.model.contributions(columns)
        x = self.model.matrix(columns)
        names = self.schema.names
        out = []
        for row, values in zip(contrib, x, strict=True):
            order = [int(i) for i in np.argsort(-row, kind="stable")[:top] if row[i] > 0]
            out.append([Reason(names[i], _value(values[i]), float(row[i])) for i in order])
        return out


def _value(v: float) -> float | None:
    return None if np.isnan(v) else float(v)


def _platt(margin: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Fit p = sigmoid(a * margin + b) by Newton steps on the log loss (Platt scaling)."""
    a, b = 1.0, 0.0
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(a * margin + b)))
        w = np.maximum(p * (1 - p), 1e-9)
        grad = np.array([np.sum((p - y) * margin), np.sum(p - y)])
        hess = np.array(
            [
                [np.sum(w * margin * margin) + 1e-6, np.sum(w * margin)],
                [np.sum(w * margin), np.sum(w) + 1e-6],
            ]
        )
        step = np.linalg.solve(hess, grad)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-8:
            break
    # A slope <= 0 would turn the booster's order around (noise on a small slice):
    # keep the order and let the intercept carry the base rate.
    return max(float(a), 1e-6), float(b)
