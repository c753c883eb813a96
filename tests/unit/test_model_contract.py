"""One contract suite for every model: round trip, missing features, determinism, schema checks."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.booster import META_FILE, ArtifactError, BoosterModel
from models.candidates import PAIR_FEATURES
from models.churn import ChurnModel
from models.features import (
    BEHAVIOUR_FEATURES,
    FEATURES_VERSION,
    FeatureMismatch,
    TraitEncoder,
    user_schema,
)
from models.ranker import Ranker, pair_schema


@dataclass
class Contract:
    """How to train and score one model kind on synthetic data."""

    kind: str
    features_version: str
    train: Callable[[int], Any]
    score: Callable[[Any, dict[str, np.ndarray]], np.ndarray]
    columns: dict[str, np.ndarray]
    wrap: Callable[[BoosterModel], Any]


def _churn_data(n: int = 400) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    cols = {name: rng.random(n) * 10 for name in BEHAVIOUR_FEATURES}
    cols["trait_plan"] = rng.integers(0, 3, n).astype(float)
    y = (cols["recency_days"] + rng.normal(0, 2, n) > 5).astype(int)
    return cols, y


def _churn_contract() -> Contract:
    cols, y = _churn_data()
    schema = user_schema(TraitEncoder((), {"plan": ("free", "pro", "team")}))
    return Contract(
        kind="churn",
        features_version=FEATURES_VERSION,
        train=lambda seed: ChurnModel.train(cols, y, schema, seed=seed, rounds=30),
        score=lambda m, c: m.predict(c),
        columns=cols,
        wrap=ChurnModel,
    )


def _ranker_contract() -> Contract:
    rng = np.random.default_rng(1)
    groups = [11] * 40
    n = sum(groups)
    cols = {name: rng.random(n) for name in PAIR_FEATURES}
    relevance = np.zeros(n)
    relevance[np.cumsum([0, *groups[:-1]])] = 1
    cols["covis_weighted"] += relevance  # something to learn
    return Contract(
        kind="personalization",
        features_version=pair_schema().version,
        train=lambda seed: Ranker.train(cols, relevance, groups, seed=seed, rounds=30),
        score=lambda m, c: m.score(c),
        columns=cols,
        wrap=Ranker,
    )


@pytest.fixture(params=["churn", "personalization"])
def contract(request: pytest.FixtureRequest) -> Contract:
    return _churn_contract() if request.param == "churn" else _ranker_contract()


def test_a_saved_model_loads_back_and_scores_the_same(contract: Contract, tmp_path: Path) -> None:
    model = contract.train(0)
    model.model.save(tmp_path)
    loaded = contract.wrap(BoosterModel.load(tmp_path, contract.kind, contract.features_version))
    before, after = (
        contract.score(model, contract.columns),
        contract.score(loaded, contract.columns),
    )
    assert np.allclose(before, after) and loaded.schema == model.schema


def test_a_missing_feature_column_is_refused_with_its_name(contract: Contract) -> None:
    model = contract.train(0)
    columns = dict(contract.columns)
    dropped = model.schema.names[1]
    del columns[dropped]
    with pytest.raises(FeatureMismatch, match=dropped):
        contract.score(model, columns)


def test_a_missing_value_is_scored_not_an_error(contract: Contract) -> None:
    model = contract.train(0)
    columns = {k: v.copy() for k, v in contract.columns.items()}
    columns[model.schema.names[0]][:5] = np.nan
    assert np.isfinite(contract.score(model, columns)).all()


def test_the_same_seed_gives_the_same_model(contract: Contract) -> None:
    a, b = contract.train(7), contract.train(7)
    assert np.array_equal(contract.score(a, contract.columns), contract.score(b, contract.columns))


def test_a_model_of_another_feature_schema_is_refused_at_load(
    contract: Contract, tmp_path: Path
) -> None:
    contract.train(0).model.save(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["schema"]["version"] = "old-features/0"
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(FeatureMismatch, match="schema mismatch"):
        BoosterModel.load(tmp_path, contract.kind, contract.features_version)


def test_a_model_of_another_kind_is_refused(contract: Contract, tmp_path: Path) -> None:
    contract.train(0).model.save(tmp_path)
    other = "churn" if contract.kind != "churn" else "personalization"
    with pytest.raises(ArtifactError, match="not"):
        BoosterModel.load(tmp_path, other, contract.features_version)


def test_churn_probabilities_are_calibrated_and_reasons_are_positive_contributions() -> None:
    cols, y = _churn_data(2000)
    schema = user_schema(TraitEncoder((), {"plan": ("free", "pro", "team")}))
    model = ChurnModel.train(cols, y, schema, seed=0, rounds=60)
    p = model.predict(cols)
    assert ((p > 0) & (p < 1)).all()
    for lo in (0.1, 0.5, 0.8):  # predicted rates roughly match observed rates
        band = (p >= lo) & (p < lo + 0.2)
        if band.sum() > 50:
            assert abs(y[band].mean() - p[band].mean()) < 0.15
    reasons = model.reasons({k: v[:20] for k, v in cols.items()})
    assert any(r.feature == "recency_days" for rs in reasons for r in rs)
    assert all(r.contribution > 0 for rs in reasons for r in rs)
