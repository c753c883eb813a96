"""User features: the one definition shared by training and serving.

Both sides hold a :class:`~actors.state.UserRows` (serving from the owning
shard, training from a replay of history stopped at each label's cutoff) and
call :func:`behaviour_matrix` and :class:`TraitEncoder` on it, so there is no
second, offline copy of the feature code to drift. Every feature is taken "as
of" a time ``now_ms`` per user: the request time when serving, the cutoff when
training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.errors import AudienceError
from actors.events import TYPE_CODE, EventType
from actors.state import DAY_MS, UserRows

FEATURES_VERSION = "user-features/1"
_NONE = np.iinfo(np.int64).min

# Event types counted one by one (the others only in ``events``).
_COUNTED = (
    EventType.PAGE_VIEW,
    EventType.CLICK,
    EventType.LIKE,
    EventType.SHARE,
    EventType.COMMENT,
    EventType.ADD_TO_CART,
    EventType.PURCHASE,
)

BEHAVIOUR_FEATURES: tuple[str, ...] = (
    "recency_days",
    "tenure_days",
    "events",
    *(f"count_{t.value}" for t in _COUNTED),
    "sessions",
    "events_per_session",
    "active_days_7",
    "active_days_28",
    "active_days_64",
    "activity_trend_14",
    "events_per_active_day",
    "dwell_seconds",
    "revenue",
    "engagement_now",
    "days_since_cart",
    "days_since_purchase",
    "abandoned_cart",
)


class FeatureMismatch(AudienceError, ValueError):
    """Features handed to a model do not match the schema it was trained with."""


@dataclass(frozen=True)
class FeatureSchema:
    """What a model was trained on: feature names in order, which are categorical, and why.

    Attributes:
        version: the feature code version (``FEATURES_VERSION`` at training time).
        names: the columns, in model order.
        categorical: names of categorical columns (integer codes, NaN unknown).
        vocab: for each categorical trait, its values in code order.
    """

    version: str
    names: tuple[str, ...]
    categorical: tuple[str, ...] = ()
    vocab: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored next to the model."""
        return {
            "version": self.version,
            "names": list(self.names),
            "categorical": list(self.categorical),
            "vocab": {k: list(v) for k, v in self.vocab.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSchema:
        """Inverse of :meth:`to_dict`."""
        return cls(
            version=str(data["version"]),
            names=tuple(data["names"]),
            categorical=tuple(data.get("categorical", ())),
            vocab={k: tuple(v) for k, v in data.get("vocab", {}).items()},
        )

    def check_compatible(self, version: str) -> None:
        """Refuse a model whose features this code no longer computes the same way."""
        if version != self.version:
            raise FeatureMismatch(
                f"feature schema mismatch: the model was trained on {self.version!r}, "
                f"this code computes {version!r}; retrain it"
            )

    def matrix(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """The model's input from named columns; a missing column is a clear error.

        A NaN value is fine (a missing value, which the model handles); a missing
        *column* means the caller computes different features than the model knows.
        """
        missing = [n for n in self.names if n not in columns]
        if missing:
            raise FeatureMismatch(f"missing features {missing}; the model expects {self.names}")
        return np.column_stack([np.asarray(columns[n], dtype=np.float64) for n in self.names])


def _days(ms: np.ndarray) -> np.ndarray:
    return ms / DAY_MS


def _active_in(days: np.ndarray, shift: np.ndarray, window: int) -> np.ndarray:
    """Active days among the ``window`` days up to now, from the bitmap as of last_seen.

    Bit k of ``days`` is day ``last_day - k``; now is ``shift`` days later, so
    the window keeps bits ``k < window - shift``.
    """
    keep = np.clip(window - shift, 0, 64).astype(np.uint64)
    mask = np.where(keep >= 64, np.uint64(2**64 - 1), (np.uint64(1) << keep) - np.uint64(1))
    return np.bitwise_count(days & mask).astype(np.float64)


def behaviour_columns(rows: UserRows, now_ms: np.ndarray | int) -> dict[str, np.ndarray]:
    """Behaviour features per user as of ``now_ms`` (NaN where a user has no such history).

    Users not held come out all-NaN but for zero counts: the model scores them
    like a user with no history, and callers decide whether that is an answer.
    """
    now = np.broadcast_to(np.asarray(now_ms, dtype=np.int64), rows.held.shape)
    held = rows.held
    last = np.where(held, rows.last, now)
    counts = rows.counts.astype(np.float64)
    events = counts.sum(axis=1)
    sessions = rows.sessions.astype(np.float64)
    shift = np.maximum(now // DAY_MS - last // DAY_MS, 0)
    active_64 = _active_in(rows.days, shift, 64)
    recent_14 = _active_in(rows.days, shift, 14)
    prior_14 = _active_in(rows.days, shift, 28) - recent_14
    decay = np.exp2(-np.maximum(now - last, 0) / rows.half_life_ms)
    cart, buy = rows.last_cart, rows.last_purchase
    out = {
        "recency_days": np.where(held, _days(now - last), np.nan),
        "tenure_days": np.where(held, _days(now - np.where(held, rows.first, now)), np.nan),
        "events": events,
        **{f"count_{t.value}": counts[:, TYPE_CODE[t]] for t in _COUNTED},
        "sessions": sessions,
        "events_per_session": np.where(sessions > 0, events / np.maximum(sessions, 1), np.nan),
        "active_days_7": _active_in(rows.days, shift, 7),
        "active_days_28": _active_in(rows.days, shift, 28),
        "active_days_64": active_64,
        "activity_trend_14": recent_14 - prior_14,
        "events_per_active_day": np.where(active_64 > 0, events / np.maximum(active_64, 1), np.nan),
        "dwell_seconds": rows.dwell.astype(np.float64),
        "revenue": rows.revenue.astype(np.float64),
        "engagement_now": rows.engagement * decay,
        "days_since_cart": np.where(cart != _NONE, _days(now - cart), np.nan),
        "days_since_purchase": np.where(buy != _NONE, _days(now - buy), np.nan),
        "abandoned_cart": ((cart != _NONE) & (cart > buy)).astype(np.float64),
    }
    return {name: np.asarray(out[name], dtype=np.float64) for name in BEHAVIOUR_FEATURES}


@dataclass(frozen=True)
class TraitEncoder:
    """Turns ``identify`` traits into columns: numbers as they are, strings as category codes.

    Which traits exist and their category values are learned from training data
    (:meth:`fit`) and stored in the model's schema, so serving encodes the same way;
    a value never seen in training becomes NaN (missing), not an error.
    """

    numeric: tuple[str, ...]
    vocab: dict[str, tuple[str, ...]]

    @classmethod
    def fit(cls, traits: Sequence[dict[str, Any]], max_values: int = 64) -> TraitEncoder:
        """Learn trait columns from training users' traits (strings with few values only)."""
        numeric: set[str] = set()
        values: dict[str, set[str]] = {}
        for t in traits:
            for key, value in t.items():
                if isinstance(value, bool | str):
                    values.setdefault(key, set()).add(str(value))
                elif isinstance(value, int | float):
                    numeric.add(key)
        vocab = {k: tuple(sorted(v)) for k, v in values.items() if len(v) <= max_values}
        return cls(tuple(sorted(numeric - set(vocab))), dict(sorted(vocab.items())))

    @classmethod
    def from_schema(cls, schema: FeatureSchema) -> TraitEncoder:
        """The encoder a trained model's schema describes."""
        traits = [n.removeprefix("trait_") for n in schema.names if n.startswith("trait_")]
        return cls(
            tuple(t for t in traits if t not in schema.vocab),
            {t: schema.vocab[t] for t in traits if t in schema.vocab},
        )

    @property
    def names(self) -> tuple[str, ...]:
        """Column names, ``trait_`` + key."""
        return tuple(f"trait_{k}" for k in (*self.numeric, *self.vocab))

    def columns(self, traits: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Trait columns for users (NaN where a user lacks a trait or has an unknown value)."""
        out: dict[str, np.ndarray] = {}
        for key in self.numeric:
            out[f"trait_{key}"] = np.array([_number(t.get(key)) for t in traits], dtype=np.float64)
        for key, values in self.vocab.items():
            code = {v: float(i) for i, v in enumerate(values)}
            out[f"trait_{key}"] = np.array(
                [code.get(str(t[key]), np.nan) if key in t else np.nan for t in traits],
                dtype=np.float64,
            )
        return out


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return float("nan")
    return float(value)


def user_columns(
    rows: UserRows, now_ms: np.ndarray | int, traits: TraitEncoder
) -> dict[str, np.ndarray]:
    """Behaviour and trait columns of ``rows`` as of ``now_ms``."""
    return {**behaviour_columns(rows, now_ms), **traits.columns(rows.traits)}


def user_schema(traits: TraitEncoder) -> FeatureSchema:
    """The schema of :func:`user_columns` with these traits."""
    return FeatureSchema(
        version=FEATURES_VERSION,
        names=(*BEHAVIOUR_FEATURES, *traits.names),
        categorical=tuple(f"trait_{k}" for k in traits.vocab),
        vocab=dict(traits.vocab),
    )
