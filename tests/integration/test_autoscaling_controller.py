"""The autoscaling policy samples the running shards and its decisions reach the status."""

from __future__ import annotations

import httpx
import pytest

from cluster.cli import format_status
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def test_status_shows_the_autoscaling_recommendation_for_the_running_shards(
    api: httpx.Client,
) -> None:
    def with_decisions() -> dict | None:
        scaling = api.get("/v1/status").json().get("autoscaling")
        return scaling if scaling and scaling["decisions"] else None

    scaling = wait_until(with_decisions, timeout_s=60)
    last = scaling["decisions"][-1]
    assert last["current"] == 2  # the platform fixture's shard count
    assert scaling["policy"]["min_shards"] <= last["desired"] <= scaling["policy"]["max_shards"]
    assert last["utilisation"] >= 0 and last["reason"]
    assert scaling["applied"] is False  # the fixture only records (test_rescale applies)
    text = format_status(api.get("/v1/status").json())
    assert "autoscaling: 2 shards -> " in text
