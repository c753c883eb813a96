"""The model registry: versions, CURRENT, atomic writes, pruning, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.booster import ArtifactError
from models.candidates import PAIR_FEATURES
from models.ranker import Ranker, pair_schema
from models.registry import ModelRegistry


def small_ranker(seed: int = 0) -> Ranker:
    rng = np.random.default_rng(seed)
    n = 60
    cols = {name: rng.random(n) for name in PAIR_FEATURES}
    relevance = (rng.random(n) < 0.2).astype(float)
    return Ranker.train(cols, relevance, [10] * 6, seed=seed, rounds=5)


def test_versions_count_up_and_the_newest_saved_is_current(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    assert registry.current("personalization") is None
    assert registry.save(small_ranker().model) == "v0001"
    assert registry.save(small_ranker(1).model) == "v0002"
    assert registry.versions("personalization") == ["v0001", "v0002"]
    assert registry.current("personalization") == "v0002"
    loaded = registry.load("personalization", "current", pair_schema().version)
    assert loaded.meta["version"] == "v0002"


def test_promote_moves_current_and_unpromoted_saves_do_not(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    registry.save(small_ranker().model)
    registry.save(small_ranker(1).model, promote=False)
    assert registry.current("personalization") == "v0001"
    registry.promote("personalization", "v0002")
    assert registry.current("personalization") == "v0002"
    with pytest.raises(ArtifactError, match="no personalization model 'v0009'"):
        registry.promote("personalization", "v0009")


def test_half_written_versions_are_invisible_and_bad_names_are_refused(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    (tmp_path / "personalization" / "v0005").mkdir(parents=True)  # no meta.json: incomplete
    (tmp_path / "personalization" / ".staging-x").mkdir()
    assert registry.versions("personalization") == []
    with pytest.raises(ArtifactError, match="run `audience train`"):
        registry.load("personalization", "current", pair_schema().version)
    with pytest.raises(ArtifactError, match="bad model version"):
        registry.load("personalization", "../../etc", pair_schema().version)


def test_prune_keeps_the_newest_and_never_the_current(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    for seed in range(4):
        registry.save(small_ranker(seed).model, promote=seed == 0)
    assert registry.prune("personalization", keep=1) == ["v0002", "v0003"]
    assert registry.versions("personalization") == ["v0001", "v0004"]
