"""``audience evaluate``: the evaluation protocols offline, and through the live pipeline.

Offline, everything runs in this process (Ray Data for the replays). With
``--live`` the same split goes through a running platform: the ranker trained
on the history without the test items is stored and promoted in the platform's
registry, that history is replayed over NATS into the shard actors, and each
user's candidates are scored by ``POST /v1/personalize/{user}/rank``, so the
number measures what the API answers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

from actors.errors import AudienceError
from actors.nats_auth import NatsCredentials
from models.evaluation import (
    evaluate_churn_history,
    evaluate_ranking_offline,
    evaluate_telco,
    hit_and_ndcg,
    ranking_split,
)
from models.ranker import KIND as PERSONALIZATION
from models.ranker import Ranker
from models.registry import ModelRegistry

TARGETS = {
    "personalization.hr_at_10": 0.80,
    "personalization.ndcg_at_10": 0.60,
    "telco.roc_auc": 0.86,
}


def evaluate_offline(
    frame: pd.DataFrame | None, telco: Path | None, seed: int
) -> tuple[dict[str, Any], Ranker | None]:
    """Ranking and churn on the history, Telco churn by cross-validation; and the ranker."""
    results: dict[str, Any] = {}
    ranker = None
    if frame is not None:
        ranking, ranker = evaluate_ranking_offline(frame, seed=seed)
        results.update(ranking)
        results["churn"] = evaluate_churn_history(frame)
    if telco is not None:
        results["telco"] = evaluate_telco(telco, seed=seed)
    return results, ranker


def evaluate_live(
    frame: pd.DataFrame,
    ranker: Ranker,
    registry: ModelRegistry,
    api_url: str,
    replay: Callable[[pd.DataFrame], Any],
    *,
    seed: int,
    timeout_s: float = 600.0,
    api_key: str | None = None,
) -> dict[str, Any]:
    """Promote ``ranker``, replay the training split, then score candidates through the API.

    ``api_key`` needs the ``read`` scope.
    """
    split = ranking_split(frame, 100, seed)
    version = registry.save(ranker.model, promote=True)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=api_url, timeout=60, headers=headers) as api:
        _wait(lambda: _served(api) == version, timeout_s, f"the API to serve model {version}")
        before = _applied(api)
        report = replay(split["train"])
        _wait(lambda: _applied(api) >= before + report.events, timeout_s, "the shards to apply")
        applied_at = time.time()
        _wait(lambda: _index_built_after(api, applied_at), timeout_s, "a fresh item index")
        groups = []
        for user, candidates in split["candidates"].items():
            answer = api.post(f"/v1/personalize/{user}/rank", json={"items": candidates})
            answer.raise_for_status()
            body = answer.json()
            if body["model_version"] != version:
                raise AudienceError(f"the API answered with model {body['model_version']}")
            by_item = {r["item_id"]: r["score"] for r in body["items"]}
            groups.append(np.array([by_item[c] for c in candidates]))
    return {
        "personalization": hit_and_ndcg(groups),
        "model_version": version,
        "replayed_events": report.events,
    }


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AudienceError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


def _served(api: httpx.Client) -> str | None:
    served = api.get("/v1/models").json()[PERSONALIZATION]["served"]
    return served["version"] if served else None


def _index_built_after(api: httpx.Client, moment: float) -> bool:
    served = api.get("/v1/models").json()[PERSONALIZATION]["served"]
    age = served.get("index_age_s") if served else None
    return age is not None and time.time() - age > moment + 1.0


def _applied(api: httpx.Client) -> int:
    return sum(s["applied_events"] for s in api.get("/v1/status").json()["shards"])


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table, with the issue's targets where there is one."""
    rows = ["| metric | value | target |", "|---|---|---|"]
    for path, value in flatten(results):
        if isinstance(value, float):
            target = TARGETS.get(path)
            shown = f">= {target}" if target is not None else ""
            rows.append(f"| {path} | {value:.4f} | {shown} |")
    return "\n".join(rows)


def flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Leaves of nested metrics as ``(group.metric, value)`` (lists left out)."""
    out: list[tuple[str, Any]] = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out += flatten(value, path + ".")
        elif not isinstance(value, list):
            out.append((path, value))
    return out


def write_results(results: dict[str, Any], out: Path) -> None:
    """JSON next to the Markdown the command prints."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True))


def run_replay(
    nats_url: str, partitions: int, max_batch: int, credentials: NatsCredentials | None = None
) -> Callable[[pd.DataFrame], Any]:
    """A replay function for :func:`evaluate_live` over NATS (as fast as possible)."""
    from cluster.replay import replay_history

    def replay(frame: pd.DataFrame) -> Any:
        return asyncio.run(
            replay_history(
                nats_url, partitions, frame, max_batch=max_batch, credentials=credentials
            )
        )

    return replay
