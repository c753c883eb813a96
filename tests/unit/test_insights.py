"""The insights glue: shards feed retention and trends, the merge answers like one shard."""

import json
from datetime import date

import numpy as np
import pytest

from actors.codec import encode
from actors.delivery import Delivery
from actors.insights import (
    events_per_minute,
    merge_insights,
    retention_answer,
    retention_problem,
    trends_answer,
)
from actors.shard import Shard
from actors.windows import WindowConfig
from tests.unit.test_engagement import MIN, batch_of

DAY = 86_400_000
T = 1_780_272_000_000  # 2026-06-01T00:00:00Z
WINDOWS = WindowConfig(allowed_lateness_ms=10**12)


def _cohort_rows() -> list[tuple[str, str, int, dict]]:
    """40 users first seen on 2026-06-01; 10 of them come back the next day."""
    rows = [(f"c{i}", "page_view", T + i * MIN, {"item_id": "steady"}) for i in range(40)]
    rows += [(f"c{i}", "click", T + DAY + i * MIN, {"item_id": "steady"}) for i in range(10)]
    return rows


def _two_shards(rows: list[tuple[str, str, int, dict]]) -> list[Shard]:
    shards = [Shard(0, [0], windows=WINDOWS), Shard(1, [1], windows=WINDOWS)]
    for shard, part in zip(shards, (0, 1), strict=True):
        mine = [r for r in rows if int(r[0][1:] or 0) % 2 == part]
        shard.apply([Delivery(part, 1, 0, 0, encode(batch_of(*mine)))])
    return shards


def test_merged_shards_give_the_known_cohort_size_day_1_retention_and_dau() -> None:
    insights = merge_insights([s.insights_partials() for s in _two_shards(_cohort_rows())])
    answer = retention_answer(insights, date(2026, 6, 1), date(2026, 6, 1), rolling=1)
    (cohort,) = answer["cohorts"]
    assert (cohort["date"], cohort["size"]) == ("2026-06-01", 40)
    assert cohort["day_1"] == pytest.approx(0.25, abs=0.01)
    assert cohort["curve"][0] == 1.0 and cohort["day_7"] is None
    assert answer["active_users"]["dau"] == 10 and answer["active_users"]["mau"] == 40
    assert answer["rolling"]["share"] == pytest.approx(0.25, abs=0.01)
    json.dumps(answer, allow_nan=False)


def test_activity_before_a_deletion_counts_the_same_however_the_stream_is_cut() -> None:
    rows = [
        ("gone", "click", T, {}),
        ("gone", "user_deleted", T + MIN, {}),
        ("kept", "click", T, {}),
    ]
    whole = Shard(0, [0], windows=WINDOWS)
    whole.apply([Delivery(0, 1, 0, 0, encode(batch_of(*rows)))])
    apart = Shard(0, [0], windows=WINDOWS)
    for seq, row in enumerate(rows, start=1):
        apart.apply([Delivery(0, seq, 0, 0, encode(batch_of(row)))])
    answers = []
    for shard in (whole, apart):
        assert shard.table.first_seen_of(["gone", "kept"]).tolist() == [-1, T]
        answers.append(retention_answer(merge_insights([shard.insights_partials()])))
    assert answers[0] == answers[1]
    assert answers[0]["active_users"]["dau"] == 2  # the deleted user was active that day


def test_a_burst_tops_the_trends_and_is_emerging_and_the_forecast_covers_15_minutes() -> None:
    rows = _cohort_rows()
    rows += [(f"b{i}", "purchase", T + DAY + 60 * MIN + i, {"item_id": "burst"}) for i in range(30)]
    insights = merge_insights([s.insights_partials() for s in _two_shards(rows)])
    answer = trends_answer(insights, n=5)
    assert answer["trending_items"][0]["id"] == "burst"
    assert "burst" in [e["id"] for e in answer["emerging_items"]]
    assert "steady" not in [e["id"] for e in answer["emerging_items"]]
    forecast = answer["forecast"]
    assert len(forecast["values"]) == 15 and forecast["history_points"] == 180
    assert forecast["method"] in {"holt_winters", "holt", "naive"} and "mae" in forecast
    json.dumps(answer, allow_nan=False)


def test_empty_minutes_count_zero_in_the_forecast_history() -> None:
    (shard,) = _two_shards([("c0", "click", T, {}), ("c0", "click", T + 3 * MIN, {})])[:1]
    first, series = events_per_minute(shard.insights_partials()["engagement"])
    assert first == T and series.tolist() == [1, 0, 0, 1]
    assert np.sum(series) == 2


def test_nothing_applied_gives_empty_answers_not_errors() -> None:
    insights = merge_insights([Shard(0, [0]).insights_partials()])
    assert retention_answer(insights)["cohorts"] == []
    assert trends_answer(insights)["forecast"] is None


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ((date(2026, 6, 2), date(2026, 6, 1), None), "before start_day"),
        ((None, None, 0), "rolling"),
        ((None, None, 36), "rolling"),
    ],
)
def test_bad_retention_parameters_are_explained(args: tuple, reason: str) -> None:
    problem = retention_problem(*args)
    assert problem is not None and reason in problem
    assert retention_problem(None, None, 7) is None
