"""Retention and trends through the whole stack: POST scripted events, read the merged answers.

The events use their own users and items and days in 2026-06, after every other
event time the suite publishes before this module runs (alphabetical order), so
the latest day (DAU) and the trends' reference time are this module's.
Distinct counts are HyperLogLog estimates: exact answers become "within the
sketch error", which for a few dozen users is under one user.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.support.events import event
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def _post(api: httpx.Client, events: list[dict[str, Any]]) -> None:
    answer = api.post("/v1/events", json=events)
    assert answer.status_code == 202, answer.text


def _retention_once_complete(api: httpx.Client) -> dict[str, Any] | None:
    answer = api.get(
        "/v1/insights/retention",
        params={"start_day": "2026-06-01", "end_day": "2026-06-01", "rolling": 1},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    active = body["active_users"]
    done = active and active["date"] == "2026-06-02" and active["dau"] >= 10
    return body if done and body["cohorts"] and body["cohorts"][0]["size"] >= 38 else None


def test_a_cohort_gives_its_known_size_day_1_retention_and_dau(api: httpx.Client) -> None:
    day0 = [event(f"ret-{i}", "page_view", ts=f"2026-06-01T10:{i:02d}:00Z") for i in range(40)]
    day1 = [event(f"ret-{i}", "click", ts=f"2026-06-02T09:{i:02d}:00Z") for i in range(10)]
    _post(api, day0 + day1)
    body = wait_until(lambda: _retention_once_complete(api))
    err = body["relative_error"]
    (cohort,) = body["cohorts"]
    assert cohort["date"] == "2026-06-01" and abs(cohort["size"] - 40) <= max(1, 3 * err * 40)
    assert cohort["day_1"] == pytest.approx(0.25, abs=0.05)
    assert cohort["curve"][:2] == [1.0, cohort["day_1"]] and cohort["day_30"] is None
    assert abs(body["active_users"]["dau"] - 10) <= 1
    assert body["rolling"]["share"] == pytest.approx(0.25, abs=0.05)


def _trends_with(api: httpx.Client, item: str) -> dict[str, Any] | None:
    answer = api.get("/v1/insights/trends", params={"n": 5})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    top = body["trending_items"]
    return body if top and top[0]["id"] == item else None


def test_a_bursting_item_tops_trending_and_shows_as_emerging(api: httpx.Client) -> None:
    steady = [
        event(f"trd-s{h}", "page_view", ts=f"2026-06-09T{h:02d}:30:00Z", item_id="trd-steady")
        for h in range(24)
    ]
    burst = [
        event(f"trd-b{i}", "purchase", ts=f"2026-06-10T12:{i:02d}:00Z", item_id="trd-burst")
        for i in range(30)
    ]
    _post(api, steady + burst)
    body = wait_until(lambda: _trends_with(api, "trd-burst"))
    assert body["trending_items"][0]["score"] > 0
    assert "trd-burst" in [e["id"] for e in body["emerging_items"]]
    assert "trd-steady" not in [e["id"] for e in body["emerging_items"]]
    forecast = body["forecast"]
    assert forecast["metric"] == "events_per_minute" and len(forecast["values"]) == 15
    assert forecast["method"] in {"holt_winters", "holt", "naive"} and "mape" in forecast
    assert body["as_of"].endswith("Z")


@pytest.mark.parametrize(
    ("path", "params", "reason"),
    [
        ("/v1/insights/retention", {"start_day": "June first"}, "start_day"),
        ("/v1/insights/retention", {"start_day": "2026-06-02", "end_day": "2026-06-01"}, "before"),
        ("/v1/insights/retention", {"rolling": 0}, "rolling"),
        ("/v1/insights/retention", {"rolling": 99}, "rolling"),
        ("/v1/insights/trends", {"n": 0}, "n"),
        ("/v1/insights/trends", {"n": 1000}, "n"),
    ],
)
def test_bad_parameters_get_a_422_with_the_reason(
    api: httpx.Client, path: str, params: dict[str, Any], reason: str
) -> None:
    answer = api.get(path, params=params)
    assert answer.status_code == 422
    assert reason in answer.text
