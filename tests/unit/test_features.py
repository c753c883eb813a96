"""User features: one definition for training and serving, taken as of a time."""

from __future__ import annotations

import numpy as np
import pytest

from actors.batch import EventBatch
from actors.events import TYPE_CODE, EventType
from actors.state import DAY_MS, UserStateTable
from models.features import (
    BEHAVIOUR_FEATURES,
    FEATURES_VERSION,
    FeatureMismatch,
    FeatureSchema,
    TraitEncoder,
    behaviour_columns,
    user_columns,
    user_schema,
)

T0 = 1_700_006_400_000  # a midnight UTC


def events(rows: list[tuple[str, EventType, int, str | None, dict | None]]) -> EventBatch:
    return EventBatch(
        event_id=[f"e{i}" for i in range(len(rows))],
        user_id=[r[0] for r in rows],
        type=np.array([TYPE_CODE[r[1]] for r in rows], dtype=np.uint8),
        ts=np.array([r[2] for r in rows], dtype=np.int64),
        item_id=[r[3] for r in rows],
        category=[None] * len(rows),
        value=np.full(len(rows), 10.0),
        source=np.zeros(len(rows), dtype=np.uint8),
        traits=[r[4] for r in rows],
    )


@pytest.fixture
def table() -> UserStateTable:
    t = UserStateTable()
    t.apply(
        events(
            [
                ("a", EventType.IDENTIFY, T0, None, {"plan": "pro", "age": 31}),
                ("a", EventType.PAGE_VIEW, T0 + 1000, "i1", None),
                ("a", EventType.ADD_TO_CART, T0 + 2000, "i1", None),
                ("a", EventType.PAGE_VIEW, T0 + 20 * DAY_MS, "i2", None),
                ("a", EventType.PURCHASE, T0 + 20 * DAY_MS + 5, "i2", None),
                ("b", EventType.PAGE_VIEW, T0 + 3 * DAY_MS, "i1", None),
                ("b", EventType.ADD_TO_CART, T0 + 3 * DAY_MS + 1, "i3", None),
            ]
        )
    )
    return t


def test_behaviour_features_are_taken_as_of_the_given_time(table: UserStateTable) -> None:
    rows = table.user_rows(["a", "b"])
    now = T0 + 30 * DAY_MS
    cols = behaviour_columns(rows, now)
    assert list(cols) == list(BEHAVIOUR_FEATURES)
    assert cols["recency_days"] == pytest.approx([10.0 - 5 / DAY_MS, 27.0 - 1 / DAY_MS])
    assert cols["tenure_days"][0] == pytest.approx(30.0)
    assert cols["events"].tolist() == [5, 2]
    assert cols["count_purchase"].tolist() == [1, 0]
    # a: active on day 0 and day 20; b: day 3. Windows count back from day 30.
    assert cols["active_days_7"].tolist() == [0, 0]
    assert cols["active_days_28"].tolist() == [1, 1]
    assert cols["active_days_64"].tolist() == [2, 1]
    assert cols["abandoned_cart"].tolist() == [0, 1]
    assert np.isnan(cols["days_since_purchase"][1])
    later = behaviour_columns(rows, now + 10 * DAY_MS)
    assert later["engagement_now"][0] < cols["engagement_now"][0]  # decays with time


def test_an_unknown_user_has_no_history_not_an_error(table: UserStateTable) -> None:
    cols = behaviour_columns(table.user_rows(["ghost"]), T0)
    assert cols["events"].tolist() == [0] and np.isnan(cols["recency_days"][0])


def test_traits_become_numbers_and_category_codes_learned_in_training(
    table: UserStateTable,
) -> None:
    rows = table.user_rows(["a", "b"])
    encoder = TraitEncoder.fit(rows.traits)
    assert encoder.numeric == ("age",) and encoder.vocab == {"plan": ("pro",)}
    cols = encoder.columns([{"plan": "pro", "age": 40}, {"plan": "enterprise"}, {}])
    assert cols["trait_age"][0] == 40 and np.isnan(cols["trait_age"][1])
    assert cols["trait_plan"][0] == 0 and np.isnan(cols["trait_plan"][1])  # unseen: missing
    schema = user_schema(encoder)
    assert TraitEncoder.from_schema(schema) == encoder
    assert FeatureSchema.from_dict(schema.to_dict()) == schema
    assert "trait_plan" in schema.categorical


def test_a_missing_column_is_refused_by_name_and_nan_values_are_kept(
    table: UserStateTable,
) -> None:
    schema = user_schema(TraitEncoder((), {}))
    cols = user_columns(table.user_rows(["a"]), T0, TraitEncoder((), {}))
    assert schema.matrix(cols).shape == (1, len(BEHAVIOUR_FEATURES))
    del cols["sessions"]
    with pytest.raises(FeatureMismatch, match="sessions"):
        schema.matrix(cols)


def test_a_model_of_another_feature_version_is_refused() -> None:
    schema = FeatureSchema(version="user-features/0", names=("x",))
    with pytest.raises(FeatureMismatch, match="retrain"):
        schema.check_compatible(FEATURES_VERSION)
