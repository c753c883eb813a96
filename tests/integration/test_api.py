"""The HTTP API through Ray Serve: ingest with per-event reasons, live profiles, probes."""

from __future__ import annotations

from collections import Counter

import httpx
import orjson
import pytest

from actors.state import iso_ms
from cluster.cli import format_status
from tests.support.events import event, random_batch
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def test_posted_events_show_up_in_the_users_profile(api: httpx.Client) -> None:
    kinds = ["page_view", "page_view", "click", "add_to_cart", "purchase"]
    items = [event("api-alice", k, ts=f"2024-05-01T12:00:0{i}Z") for i, k in enumerate(kinds)]
    items.append(event("api-bob", "like"))
    answer = api.post("/v1/events", json=items)
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"accepted": 6, "rejected": []}

    profile = wait_until(lambda: _profile_with(api, "api-alice", events=5))
    assert {k: v for k, v in profile["counts"].items() if v} == dict(Counter(kinds))
    assert profile["first_seen"] == "2024-05-01T12:00:00.000Z"
    assert profile["last_seen"] == "2024-05-01T12:00:04.000Z"


def _profile_with(api: httpx.Client, user: str, events: int) -> dict | None:
    answer = api.get(f"/v1/users/{user}")
    if answer.status_code == 200 and answer.json()["events"] == events:
        return answer.json()
    return None


def test_counts_grow_as_more_events_arrive(api: httpx.Client) -> None:
    for n in (1, 2, 3):
        assert api.post("/v1/events", json=[event("api-grower", "click")]).status_code == 202
        wait_until(lambda n=n: _profile_with(api, "api-grower", events=n))


def test_an_object_with_an_events_array_is_accepted_too(api: httpx.Client) -> None:
    answer = api.post("/v1/events", json={"events": [event("api-wrapped")]})
    assert answer.status_code == 202 and answer.json()["accepted"] == 1


def test_bad_events_get_a_422_with_a_reason_each_and_good_ones_are_kept(api: httpx.Client) -> None:
    items = [
        event("api-mixed"),
        event("api-mixed", type="warp"),
        event("api-mixed", ts="2024-05-01"),
        event("api-mixed", type="like"),
    ]
    answer = api.post("/v1/events", json=items)
    assert answer.status_code == 422
    body = answer.json()
    assert body["accepted"] == 2
    assert [(r["index"], r["reason"]) for r in body["rejected"]] == [
        (1, "unknown_type"),
        (2, "bad_timestamp"),
    ]
    assert all(r["detail"] for r in body["rejected"])
    wait_until(lambda: _profile_with(api, "api-mixed", events=2))


@pytest.mark.parametrize(
    ("body", "reason"),
    [(b"this is not json", "invalid_json"), (b'{"user_id": "x"}', "schema"), (b"", "invalid_json")],
)
def test_a_body_that_is_no_event_array_gets_a_422_naming_why(
    api: httpx.Client, body: bytes, reason: str
) -> None:
    answer = api.post("/v1/events", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 422
    assert answer.json()["rejected"][0]["reason"] == reason


def test_too_many_events_in_one_request_get_a_413(api: httpx.Client) -> None:
    answer = api.post("/v1/events", content=orjson.dumps([event("api-big")] * 10_001))
    assert answer.status_code == 413
    assert "limit" in answer.json()["detail"]


def test_an_unknown_user_is_a_404_with_a_reason(api: httpx.Client) -> None:
    answer = api.get("/v1/users/nobody-ever")
    assert answer.status_code == 404
    assert "nobody-ever" in answer.json()["detail"]


def test_probes_and_docs_are_served(api: httpx.Client) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    schema = api.get("/openapi.json").json()
    assert {"/v1/events", "/v1/users/{user_id}", "/healthz"} <= set(schema["paths"])
    assert api.get("/docs").status_code == 200


def test_status_reports_shards_lag_and_dead_letters(api: httpx.Client) -> None:
    api.post("/v1/events", json=[event("api-status", type="nope")])
    status = wait_until(lambda: api.get("/v1/status").json())
    assert [s["shard"] for s in status["shards"]] == [0, 1]
    assert sorted(int(p) for p in status["lag"]) == list(range(8))
    assert status["dead_letters"].get("unknown_type", 0) >= 1
    assert all(s["consuming"] for s in status["shards"])
    assert status["api_latency_ms"]["p99"] > 0  # this replica served requests before
    assert any(s["apply_ms"]["p99"] for s in status["shards"])


def test_status_says_how_far_the_aggregates_are_behind_the_profiles(api: httpx.Client) -> None:
    api.post("/v1/events", json=[event("api-lag", "click")])

    def folded() -> dict | None:  # the event's step was folded into the aggregates
        status = api.get("/v1/status").json()
        return status if status["insights_lag_ms"]["p99"] is not None else None

    status = wait_until(folded)
    worst = max(s["insights_lag_ms"]["p99"] or 0 for s in status["shards"])
    assert status["insights_lag_ms"]["p99"] == worst > 0
    assert "insights lag ms" in format_status(status)
    assert all(s["pending_fold_events"] >= 0 for s in status["shards"])


def test_counts_after_many_posts_equal_the_ground_truth_of_the_events(api: httpx.Client) -> None:
    batch = random_batch(3000, 60, seed=21, prefix="api-many-")
    items = [batch.event_dict(i) for i in range(len(batch))]
    for item in items:  # the API takes RFC 3339 times, the columns hold epoch ms
        item["ts"] = iso_ms(item["ts"])
    for start in range(0, len(items), 500):
        answer = api.post("/v1/events", json=items[start : start + 500])
        assert answer.status_code == 202, answer.text
    truth: dict[str, Counter[str]] = {}
    for item in items:
        truth.setdefault(item["user_id"], Counter())[item["type"]] += 1
    for user, counts in truth.items():
        profile = wait_until(lambda u=user, c=counts: _profile_with(api, u, sum(c.values())))
        assert {k: v for k, v in profile["counts"].items() if v} == dict(counts)


def test_a_sample_of_user_ids_can_be_listed_and_bad_limits_get_422(api: httpx.Client) -> None:
    api.post("/v1/events", json=[event("api-listed")])
    wait_until(lambda: _profile_with(api, "api-listed", events=1))
    users = wait_until(lambda: api.get("/v1/users", params={"limit": 1000}).json()["users"])
    assert "api-listed" in users and len(users) == len(set(users))
    assert len(api.get("/v1/users", params={"limit": 2}).json()["users"]) == 2
    answer = api.get("/v1/users", params={"limit": 0})
    assert answer.status_code == 422 and "limit" in answer.text


def test_delete_forgets_a_user_and_confirms_when_its_shard_applied_it(api: httpx.Client) -> None:
    assert api.post("/v1/events", json=[event("api-forget-me", "like")]).status_code == 202
    wait_until(lambda: _profile_with(api, "api-forget-me", events=1))
    answer = api.delete("/v1/users/api-forget-me")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"user_id": "api-forget-me", "deleted": True, "was_known": True}
    assert api.get("/v1/users/api-forget-me").status_code == 404
    again = api.delete("/v1/users/api-forget-me")
    assert again.status_code == 200 and again.json()["was_known"] is False
    assert api.delete("/v1/users/" + "x" * 200).status_code == 422
    assert api.delete("/v1/users/someone", params={"wait_s": -1}).status_code == 422


def test_the_same_event_ids_sent_again_later_are_applied_once(api: httpx.Client) -> None:
    items = [event("api-twice", "click", event_id=f"api-twice-{i}") for i in range(3)]
    assert api.post("/v1/events", json=items).status_code == 202
    wait_until(lambda: _profile_with(api, "api-twice", events=3))
    assert api.post("/v1/events", json=items[1:]).status_code == 202  # a retried request
    assert api.post("/v1/events", json=[event("api-twice", "like")]).status_code == 202
    profile = wait_until(lambda: _profile_with(api, "api-twice", events=4))
    assert profile["counts"]["click"] == 3
    shards = api.get("/v1/status").json()["shards"]
    assert sum(s["duplicates"] for s in shards) >= 2
