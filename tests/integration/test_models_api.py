"""The model endpoints end to end: trained with Ray Data, served by Ray Serve on live features."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pandas as pd
import pytest

from cluster.launcher import Platform
from cluster.replay import replay_history
from cluster.train import TrainReport, simulated_history, train_and_register
from models.registry import ModelRegistry
from models.training import ChurnPlan
from serving.models import CHUNK_USERS
from tests.support.events import event
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


# The platform is shared by the session and some tests read "now" from the newest
# event time (segments): this history ends before anything they publish.
HISTORY_END_MS = 1_738_368_000_000  # 2025-02-01


@pytest.fixture(scope="module")
def history() -> pd.DataFrame:
    """Simulated history of a few hundred users, renamed apart from other tests' users."""
    frame = simulated_history(300, days=20, seed=5, end_ms=HISTORY_END_MS)
    return frame.assign(user_id="mdl-" + frame["user_id"])


@pytest.fixture(scope="module")
def trained(platform: Platform, api: httpx.Client, history: pd.DataFrame) -> Iterator[TrainReport]:
    """Models trained on the history and served; the history replayed into the shards."""
    registry = ModelRegistry(platform.settings.registry_path)
    report = train_and_register(history, registry, plan=ChurnPlan(horizon_days=3), ranker_labels=2)
    before = _applied(api)
    producer = platform.credentials("producer")
    replayed = asyncio.run(
        replay_history(
            platform.nats_url, platform.settings.partitions, history, credentials=producer
        )
    )
    wait_until(lambda: _applied(api) >= before + replayed.events)
    wait_until(lambda: _served(api) == report.versions)
    wait_until(lambda: _indexed(api) >= history["item_id"].nunique())
    yield report


def _applied(api: httpx.Client) -> int:
    return sum(s["applied_events"] for s in api.get("/v1/status").json()["shards"])


def _served(api: httpx.Client) -> dict[str, str]:
    models = api.get("/v1/models").json()
    return {kind: models[kind]["served"]["version"] for kind in ("churn", "personalization")}


def _indexed(api: httpx.Client) -> int:
    return int(api.get("/v1/models").json()["personalization"]["served"]["items_indexed"])


def _a_user(history: pd.DataFrame, min_items: int = 5) -> str:
    counts = history[history["item_id"].notna()].groupby("user_id").size()
    return str(counts[counts >= min_items].index[0])


def test_churn_is_scored_on_live_features_with_reasons_and_the_version(
    api: httpx.Client, trained: TrainReport, history: pd.DataFrame
) -> None:
    user = _a_user(history)
    answer = api.get(f"/v1/churn/{user}")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert 0.0 < body["churn_probability"] < 1.0
    assert body["model_version"] == trained.versions["churn"]
    assert body["reasons"] and all(r["contribution"] > 0 for r in body["reasons"])


def test_a_fresh_event_moves_the_churn_score_within_moments(
    api: httpx.Client, trained: TrainReport, history: pd.DataFrame
) -> None:
    user = _a_user(history)
    before = api.get(f"/v1/churn/{user}").json()
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(HISTORY_END_MS / 1000 + 86_400))
    assert api.post("/v1/events", json=[event(user, "page_view", ts=later)]).status_code == 202
    after = wait_until(lambda: _changed(api, user, before))
    assert after["features"]["events"] == before["features"]["events"] + 1
    assert after["as_of"] >= later.replace("Z", "")  # features are taken after the new event
    assert after["model_version"] == before["model_version"]


def _changed(api: httpx.Client, user: str, before: dict[str, Any]) -> dict[str, Any] | None:
    body: dict[str, Any] = api.get(f"/v1/churn/{user}").json()
    return body if body["features"]["events"] != before["features"]["events"] else None


def test_unknown_users_and_bad_ids_get_clear_answers(
    api: httpx.Client, trained: TrainReport
) -> None:
    missing = api.get("/v1/churn/nobody-at-all")
    assert missing.status_code == 404 and "unknown user" in missing.json()["detail"]
    assert api.get("/v1/churn/" + "x" * 200).status_code == 422
    batch = api.post("/v1/churn", json={"user_ids": ["nobody-at-all"]})
    assert batch.status_code == 200 and batch.json()["results"][0]["error"] == "unknown_user"
    assert api.post("/v1/churn", json={"user_ids": []}).status_code == 422
    assert api.post("/v1/churn", json={"users": ["a"]}).status_code == 422


def test_batch_churn_answers_each_user_in_order(
    api: httpx.Client, trained: TrainReport, history: pd.DataFrame
) -> None:
    users = sorted(set(history["user_id"]))[:20]
    results = api.post("/v1/churn", json={"user_ids": [*users, "nobody"]}).json()["results"]
    assert [r.get("user_id") for r in results[:-1]] == users
    assert results[-1]["error"] == "unknown_user"


def test_a_batch_over_several_chunks_answers_as_single_requests_do(
    api: httpx.Client, trained: TrainReport, history: pd.DataFrame
) -> None:
    users = sorted(set(history["user_id"]))
    users = [*users, *users][: CHUNK_USERS * 2 + 7]  # three chunks, users repeated
    with ThreadPoolExecutor(2) as pool:
        batches = [
            pool.submit(api.post, "/v1/personalize", json={"user_ids": users, "k": 3}),
            pool.submit(api.post, "/v1/churn", json={"user_ids": users}),
        ]
        # Single requests are answered while the batches run (not queued behind them).
        singles = [api.get(f"/v1/churn/{u}").status_code for u in users[:20]]
        top, churn = (b.result().json()["results"] for b in batches)
    assert singles == [200] * 20
    assert [r["user_id"] for r in top] == users == [r["user_id"] for r in churn]
    for i in (0, CHUNK_USERS, len(users) - 1):  # one user of each chunk
        one = api.get(f"/v1/personalize/{users[i]}", params={"k": 3}).json()
        assert [x["item_id"] for x in top[i]["items"]] == [x["item_id"] for x in one["items"]]
        assert (
            churn[i]["churn_probability"]
            == api.get(f"/v1/churn/{users[i]}").json()["churn_probability"]
        )


def test_recommendations_skip_seen_items_and_say_why(
    api: httpx.Client, trained: TrainReport, history: pd.DataFrame
) -> None:
    user = _a_user(history, min_items=8)
    answer = api.get(f"/v1/personalize/{user}", params={"k": 5})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_version"] == trained.versions["personalization"]
    assert not body["cold_start"] and len(body["items"]) == 5
    seen = set(history.loc[history["user_id"] == user, "item_id"].dropna())
    assert not {i["item_id"] for i in body["items"]} & seen
    assert all(i["reason"] for i in body["items"])
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_an_unknown_user_gets_a_cold_start_answer(api: httpx.Client, trained: TrainReport) -> None:
    body = api.get("/v1/personalize/brand-new-visitor", params={"k": 3}).json()
    assert body["cold_start"] and len(body["items"]) == 3
    assert {i["reason"] for i in body["items"]} <= {"popular", "trending"}
    many = api.post("/v1/personalize", json={"user_ids": ["brand-new-visitor"], "k": 2}).json()
    assert len(many["results"][0]["items"]) == 2


def test_bad_parameters_get_a_422_with_the_reason(api: httpx.Client, trained: TrainReport) -> None:
    for k in (0, 101, "ten"):
        answer = api.get("/v1/personalize/u", params={"k": k})
        assert answer.status_code == 422 and "k" in answer.text
    assert api.post("/v1/personalize/u/rank", json={"items": []}).status_code == 422
    assert api.post("/v1/personalize/u/rank", json={"items": ["a" * 200]}).status_code == 422
    assert api.post("/v1/models/churn/promote", json={"version": "latest"}).status_code == 422
    assert api.post("/v1/models/cats/promote", json={"version": "v0001"}).status_code == 404
    assert api.post("/v1/models/churn/promote", json={"version": "v9999"}).status_code == 404


def test_reranking_returns_the_given_items_best_first_with_scores(
    api: httpx.Client, trained: TrainReport, history: pd.DataFrame
) -> None:
    user = _a_user(history)
    items = [*history["item_id"].dropna().unique()[:10].tolist(), "item-unheard-of"]
    answer = api.post(f"/v1/personalize/{user}/rank", json={"items": items})
    assert answer.status_code == 200, answer.text
    ranked = answer.json()["items"]
    assert sorted(r["item_id"] for r in ranked) == sorted(items)
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    assert [r["known_item"] for r in ranked if r["item_id"] == "item-unheard-of"] == [False]


def test_a_promoted_version_is_rolled_out_without_dropping_a_request(
    platform: Platform, api: httpx.Client, trained: TrainReport, history: pd.DataFrame
) -> None:
    registry = ModelRegistry(platform.settings.registry_path)
    old = trained.versions["churn"]
    model = registry.load("churn", old, "user-features/1")
    new = registry.save(model, promote=False)
    user = _a_user(history)
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=str(api.base_url), timeout=30, headers=api.headers) as client:
            while not stop.is_set():
                answer = client.get(f"/v1/churn/{user}")
                seen.append((answer.status_code, answer.json().get("model_version", "")))

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        wait_until(lambda: len(seen) > 20)
        assert api.post("/v1/models/churn/promote", json={"version": new}).status_code == 200
        wait_until(lambda: any(v == new for _, v in seen[-5:]), timeout_s=30)
        wait_until(lambda: len(seen) > 20 + 40)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert {status for status, _ in seen} == {200}
    versions = [v for _, v in seen]
    switched = versions.index(new)
    assert set(versions[:switched]) == {old} and set(versions[switched:]) == {new}
    listed = api.get("/v1/models").json()["churn"]
    assert listed["current"] == new and new in listed["versions"]


def test_status_says_which_models_are_served(api: httpx.Client, trained: TrainReport) -> None:
    from cluster.cli import format_status

    status = api.get("/v1/status").json()
    assert status["models"]["personalization"]["version"] == trained.versions["personalization"]
    for kind in ("churn", "personalization"):  # every read so far went over NATS
        reads = status["models"][kind]["shard_reads"]
        assert reads["over_nats"] > 0 and reads["fell_back"] == 0, (kind, reads)
    assert status["models"]["personalization"]["items_indexed"] > 0
    assert f"personalization {trained.versions['personalization']}" in format_status(status)
