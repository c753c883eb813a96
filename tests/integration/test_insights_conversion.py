"""The conversion funnel through the whole stack: POST a scripted funnel, read known answers.

The events use their own users (``conv-*``) and 2025-07-01, a day no other test
publishes to, and before the 2026-06 days of the retention and trends module,
which runs after this one and needs its days to be the latest seen.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.support.events import event
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

ENDPOINT = "/v1/insights/conversion"
DAY = "2025-07-01"
VIEW, CART, BUY = "page_view", "add_to_cart", "purchase"

# (user, type, minute of the day, purchase value), in arrival order.
SCRIPT: list[tuple[str, str, int, float | None]] = [
    ("1", VIEW, 600, None),
    ("1", CART, 605, None),
    ("1", BUY, 610, 20.5),
    ("2", VIEW, 620, None),
    ("2", CART, 655, None),  # 35 minutes after the view: outside the window
    ("3", VIEW, 630, None),
    ("3", CART, 640, None),
    ("3", BUY, 665, 9.5),  # hour 11
    ("3", BUY, 670, 5.0),  # revenue, no further step
    ("4", VIEW, 700, None),
    ("4", BUY, 701, 3.0),  # skips the cart: revenue only
    ("4", CART, 702, None),
    ("4", BUY, 703, 7.0),
]

HOURS = [
    {"counts": [3, 2, 1], "revenue": 20.5, "purchases": 1, "purchasing_users": 1, "active": 3},
    {"counts": [1, 1, 2], "revenue": 24.5, "purchases": 4, "purchasing_users": 2, "active": 2},
]


def _events() -> list[dict[str, Any]]:
    return [
        event(
            f"conv-{user}",
            kind,
            ts=f"{DAY}T{minute // 60:02d}:{minute % 60:02d}:00Z",
            **({} if value is None else {"value": value}),
        )
        for user, kind, minute, value in SCRIPT
    ]


def _shown(bucket: dict[str, Any]) -> dict[str, Any]:
    return {
        "counts": [s["count"] for s in bucket["steps"]],
        "revenue": bucket["revenue"],
        "purchases": bucket["purchases"],
        "purchasing_users": bucket["purchasing_users"],
        "active": bucket["active_users"],
    }


def _once_complete(api: httpx.Client) -> dict[str, Any] | None:
    answer = api.get(ENDPOINT, params={"start": f"{DAY}T00:00:00Z", "end": f"{DAY}T23:59:59Z"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return body if [_shown(b) for b in body["buckets"]] == HOURS else None


def test_a_scripted_funnel_gives_its_known_steps_rates_and_revenue(api: httpx.Client) -> None:
    items = _events()
    for start in range(0, len(items), 3):  # in order, cut into several requests
        answer = api.post("/v1/events", json=items[start : start + 3])
        assert answer.status_code == 202, answer.text
    body = wait_until(lambda: _once_complete(api))
    assert body["funnel"] == {"steps": [VIEW, CART, BUY], "window_s": 1800.0}
    assert body["granularity"] == "hour" and body["as_of"].endswith("Z")
    assert [b["start"] for b in body["buckets"]] == [f"{DAY}T10:00:00.000Z", f"{DAY}T11:00:00.000Z"]
    totals = body["totals"]
    assert [s["count"] for s in totals["steps"]] == [4, 3, 3]
    assert [s["rate_from_first"] for s in totals["steps"]] == [1.0, 0.75, 0.75]
    assert [s["rate_from_previous"] for s in totals["steps"]] == [1.0, 0.75, 1.0]
    assert totals["revenue"] == 45.0 and totals["purchasing_users"] == 3
    assert totals["revenue_per_purchasing_user"] == 15.0
    assert totals["active_users"] == 4 and totals["revenue_per_active_user"] == 11.25
    day = api.get(
        ENDPOINT,
        params={"granularity": "day", "start": f"{DAY}T00:00:00Z", "end": "2025-07-02T00:00:00Z"},
    ).json()
    (whole,) = day["buckets"]
    assert [s["count"] for s in whole["steps"]] == [4, 3, 3] and whole["revenue"] == 45.0
