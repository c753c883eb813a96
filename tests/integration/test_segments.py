"""Segments through the whole stack: users enter and leave as their events arrive.

Segment "now" is each shard's newest event time, and the platform is shared by
the whole session, so the script uses its own users (``seg-*``) and event times
in 2026-10, later than anything other tests publish (2023 to mid 2026). Anchor
users with an event at the script's end land on both shards (asserted below),
so both shards' "now" is the script's end whatever order events arrive in, and
every assertion on a ``seg-*`` user's segments is exact. Sizes are global
counters: with "now" in 2026-10 no other test's user qualifies for any rule,
but to stay robust against tests added later, sizes are checked as lower bounds
and the exit of the cart abandoner as a difference of the ``left`` counter.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from actors.partitioning import assign_partitions, partition_of
from cluster.launcher import Platform
from tests.support.events import event
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

END = "2026-10-10T12:00:00Z"
ANCHORS = [f"seg-anchor-{i}" for i in range(8)]

SCRIPT: list[tuple[str, str, str]] = [
    ("seg-engaged", "purchase", "2026-10-10T11:00:00Z"),
    ("seg-engaged", "purchase", "2026-10-10T11:05:00Z"),
    ("seg-cart", "add_to_cart", "2026-10-10T09:00:00Z"),
    ("seg-cart", "page_view", "2026-10-10T10:00:00Z"),
    ("seg-buyer", "add_to_cart", "2026-10-10T09:00:00Z"),
    ("seg-buyer", "purchase", "2026-10-10T10:00:00Z"),
    ("seg-fading", "page_view", "2026-09-20T12:00:00Z"),
    ("seg-fading", "like", "2026-09-25T12:00:00Z"),
    ("seg-fading", "page_view", "2026-09-30T12:00:00Z"),
    *((anchor, "page_view", END) for anchor in ANCHORS),
]

EXPECTED = {
    "seg-engaged": ["engaged_24h", "new_users"],
    "seg-cart": ["cart_abandoners", "new_users"],
    "seg-buyer": ["engaged_24h", "new_users"],
    "seg-fading": ["fading"],
    ANCHORS[0]: ["new_users"],
}


def _segments_of(api: httpx.Client, user: str) -> list[str] | None:
    answer = api.get(f"/v1/users/{user}")
    return answer.json()["segments"] if answer.status_code == 200 else None


def _all_as_expected(api: httpx.Client, expected: dict[str, list[str]]) -> bool:
    return all(_segments_of(api, user) == names for user, names in expected.items())


def _sizes(api: httpx.Client) -> dict[str, dict[str, Any]]:
    answer = api.get("/v1/insights/segments")
    assert answer.status_code == 200, answer.text
    return {s["name"]: s for s in answer.json()["segments"]}


def test_the_anchor_users_reach_every_shard_of_the_platform(platform: Platform) -> None:
    partitions = platform.settings.partitions
    shards = assign_partitions(partitions, platform.settings.shards)
    reached = {
        i for i, owned in enumerate(shards) for a in ANCHORS if partition_of(a, partitions) in owned
    }
    assert reached == set(range(len(shards)))


def test_scripted_users_enter_and_leave_segments_and_sizes_follow(api: httpx.Client) -> None:
    posted = api.post("/v1/events", json=[event(u, kind, ts=ts) for u, kind, ts in SCRIPT])
    assert posted.status_code == 202, posted.text
    wait_until(lambda: _all_as_expected(api, EXPECTED))

    def merged_after_script() -> dict[str, dict[str, Any]] | None:
        sizes = _sizes(api)
        return sizes if sizes["cart_abandoners"]["size"] >= 1 else None

    before = wait_until(merged_after_script)
    assert before["engaged_24h"]["size"] >= 2 and before["fading"]["size"] >= 1
    assert before["new_users"]["size"] >= 3 + len(ANCHORS)
    assert all(s["description"] for s in before.values())

    posted = api.post("/v1/events", json=[event("seg-cart", "purchase", ts=END)])
    assert posted.status_code == 202, posted.text
    wait_until(lambda: _segments_of(api, "seg-cart") == ["engaged_24h", "new_users"])

    def cart_left() -> dict[str, dict[str, Any]] | None:
        sizes = _sizes(api)
        left = sizes["cart_abandoners"]["left"] - before["cart_abandoners"]["left"]
        return sizes if left >= 1 else None

    after = wait_until(cart_left)
    assert after["engaged_24h"]["entered"] > before["engaged_24h"]["entered"]
    body = api.get("/v1/insights/segments").json()
    assert body["as_of"].endswith("Z") and body["event_time"] >= "2026-10-10T12:00:00"
