"""Engagement insights through the whole stack: POST events, read merged event-time buckets.

The scripted events use their own users (``ins-*``) and fixed past days that no
other test publishes to, and the queries ask for those days only, so the answers
are exact whatever else the session has sent. The platform fixture's lateness is
large (see conftest), so a shuffled replay is within the lateness by design.
"""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest

from tests.support.events import event
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

ENDPOINT = "/v1/insights/engagement"

# (user, type, minute of the day, extras): two hours with hand-counted answers.
SCRIPT: list[tuple[str, str, int, dict[str, Any]]] = [
    ("1", "session_start", 600, {}),
    ("1", "page_view", 601, {"item_id": "p1", "category": "books"}),
    ("1", "like", 602, {"item_id": "p1", "category": "books"}),
    ("1", "dwell", 603, {"item_id": "p1", "value": 30.0}),
    ("2", "session_start", 610, {}),
    ("2", "like", 611, {"item_id": "p2", "category": "games"}),
    ("2", "comment", 612, {"item_id": "p2", "category": "games"}),
    ("2", "share", 613, {"item_id": "p1", "category": "books"}),
    ("3", "page_view", 620, {"item_id": "p1", "category": "books"}),
    ("3", "dwell", 621, {"item_id": "p1", "value": 15.5}),
    ("1", "like", 660, {"item_id": "p3", "category": "music"}),
    ("1", "comment", 661, {"item_id": "p3", "category": "music"}),
    ("4", "session_start", 700, {}),
    ("4", "share", 701, {"item_id": "p3", "category": "music"}),
    ("4", "dwell", 702, {"item_id": "p3", "value": 4.5}),
]

EXPECTED = [
    {
        "events": 10,
        "active_users": 3,
        "likes": 2,
        "shares": 1,
        "comments": 1,
        "likes_per_active_user": 2 / 3,
        "shares_per_active_user": 1 / 3,
        "comments_per_active_user": 1 / 3,
        "dwell_seconds": 45.5,
        "dwell_seconds_per_active_user": 45.5 / 3,
        "sessions": 2,
        "top_items": [{"id": "p1", "events": 6}, {"id": "p2", "events": 2}],
        "top_categories": [{"id": "books", "events": 4}, {"id": "games", "events": 2}],
        "late_events": 0,
    },
    {
        "events": 5,
        "active_users": 2,
        "likes": 1,
        "shares": 1,
        "comments": 1,
        "likes_per_active_user": 0.5,
        "shares_per_active_user": 0.5,
        "comments_per_active_user": 0.5,
        "dwell_seconds": 4.5,
        "dwell_seconds_per_active_user": 2.25,
        "sessions": 1,
        "top_items": [{"id": "p3", "events": 4}],
        "top_categories": [{"id": "music", "events": 3}],
        "late_events": 0,
    },
]


def _events(day: str, prefix: str) -> list[dict[str, Any]]:
    return [
        event(
            f"{prefix}{user}", kind, ts=f"{day}T{minute // 60:02d}:{minute % 60:02d}:00Z", **extra
        )
        for user, kind, minute, extra in SCRIPT
    ]


def _hours_of(api: httpx.Client, day: str) -> list[dict[str, Any]] | None:
    """The day's hour buckets once they match the expected answers, else None."""
    answer = api.get(
        ENDPOINT,
        params={"granularity": "hour", "start": f"{day}T00:00:00Z", "end": f"{day}T23:59:59Z"},
    )
    assert answer.status_code == 200, answer.text
    buckets = answer.json()["buckets"]
    shown = [{k: b[k] for k in EXPECTED[0]} for b in buckets]
    return buckets if shown == EXPECTED else None


def test_a_scripted_event_set_gives_exactly_the_known_answers_per_hour(api: httpx.Client) -> None:
    answer = api.post("/v1/events", json=_events("2024-03-01", "ins-a-"))
    assert answer.status_code == 202, answer.text
    buckets = wait_until(lambda: _hours_of(api, "2024-03-01"))
    # Session time follows arrival order, so only this in-order post checks it:
    # hour 10 has 1's, 2's and 3's three, three and one 1-minute gaps; in hour 11,
    # 1 is back after 57 minutes (a new session) for one gap, and 4 has two.
    sessions = [(b["session_seconds"], b["avg_session_seconds"]) for b in buckets]
    assert sessions == [(420.0, 210.0), (180.0, 180.0)]
    assert [(b["start"], b["end"]) for b in buckets] == [
        ("2024-03-01T10:00:00.000Z", "2024-03-01T11:00:00.000Z"),
        ("2024-03-01T11:00:00.000Z", "2024-03-01T12:00:00.000Z"),
    ]
    body = api.get(
        ENDPOINT, params={"start": "2024-03-01T10:00:00Z", "end": "2024-03-01T12:00:00Z"}
    ).json()
    assert body["granularity"] == "hour" and body["as_of"].endswith("Z")
    assert body["totals"]["events"] == 15 and body["totals"]["dwell_seconds"] == 50.0
    assert body["lateness"]["policy"] == "correct"


def test_the_same_events_arriving_shuffled_within_the_lateness_give_the_same_answers(
    api: httpx.Client,
) -> None:
    items = _events("2024-03-02", "ins-b-")
    random.Random(5).shuffle(items)
    for start in range(0, len(items), 4):
        answer = api.post("/v1/events", json=items[start : start + 4])
        assert answer.status_code == 202, answer.text
    wait_until(lambda: _hours_of(api, "2024-03-02"))


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"granularity": "week"}, "granularity"),
        ({"start": "yesterday"}, "start"),
        ({"start": "2024-03-02T00:00:00Z", "end": "2024-03-01T00:00:00Z"}, "after start"),
        ({"start": "2024-03-01T00:00:00", "end": "2024-03-02T00:00:00Z"}, "timezone"),
        (
            {
                "granularity": "minute",
                "start": "2024-03-01T00:00:00Z",
                "end": "2024-03-02T00:00:00Z",
            },
            "coarser",
        ),
    ],
)
@pytest.mark.parametrize("endpoint", [ENDPOINT, "/v1/insights/conversion"])
def test_bad_parameters_get_a_422_with_the_reason(
    api: httpx.Client, endpoint: str, params: dict[str, str], reason: str
) -> None:
    answer = api.get(endpoint, params=params)
    assert answer.status_code == 422
    assert reason in answer.text
