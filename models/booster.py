"""What every model here is: a LightGBM booster, its feature schema, and its metadata.

Saved as LightGBM's own text format plus a JSON file (no pickle), so an
artifact can be read by any version of this code that computes the same
features, and refused with a clear error by one that does not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from actors.errors import AudienceError
from models.features import FeatureSchema

MODEL_FILE = "model.txt"
META_FILE = "meta.json"


class ArtifactError(AudienceError):
    """A model artifact is missing, unreadable or of another kind."""


@dataclass
class BoosterModel:
    """A trained booster with the schema of its inputs and free-form metadata.

    Attributes:
        kind: ``"churn"`` or ``"personalization"``; a load of the wrong kind fails.
        booster: the LightGBM model.
        schema: the features it takes, in order.
        meta: metrics, training window, parameters, calibration...; JSON-ready.
    """

    kind: str
    booster: lgb.Booster
    schema: FeatureSchema
    meta: dict[str, Any] = field(default_factory=dict)

    def matrix(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """The booster's input from named columns (see ``FeatureSchema.matrix``)."""
        return self.schema.matrix(columns)

    def raw_scores(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """The booster's raw output (a margin) per row.

        One thread: requests are small, and idle OpenMP threads spinning beside
        the other replicas cost more CPU than they save.
        """
        x = self.matrix(columns)
        if not len(x):
            return np.zeros(0)
        return np.asarray(self.booster.predict(x, raw_score=True, num_threads=1), dtype=np.float64)

    def contributions(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """Per row and feature, its contribution to the raw score (LightGBM's SHAP values)."""
        x = self.matrix(columns)
        return np.asarray(self.booster.predict(x, pred_contrib=True, num_threads=1))[:, :-1]

    def save(self, folder: Path) -> None:
        """Write the booster and the metadata into ``folder`` (created)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(folder / MODEL_FILE))
        meta = {"kind": self.kind, "schema": self.schema.to_dict(), **self.meta}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))

    @classmethod
    def load(cls, folder: Path, kind: str, features_version: str) -> BoosterModel:
        """Read a saved model, refusing another kind or another feature definition."""
        try:
            meta = json.loads((folder / META_FILE).read_text())
            booster = lgb.Booster(model_file=str(folder / MODEL_FILE))
        except (OSError, ValueError, lgb.basic.LightGBMError) as exc:
            raise ArtifactError(f"cannot read the model in {folder}: {exc}") from None
        if meta.get("kind") != kind:
            raise ArtifactError(f"{folder} holds a {meta.get('kind')!r} model, not {kind!r}")
        schema = FeatureSchema.from_dict(meta.pop("schema"))
        schema.check_compatible(features_version)
        if booster.feature_name() and len(booster.feature_name()) != len(schema.names):
            raise ArtifactError(f"{folder}: the booster and its schema disagree on the features")
        meta.pop("kind")
        return cls(kind, booster, schema, meta)
