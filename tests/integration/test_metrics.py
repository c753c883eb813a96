"""Shards report Prometheus metrics through Ray: applied events, latency, freshness, lag."""

from __future__ import annotations

import re

import httpx
import pytest

from cluster.launcher import Platform
from tests.support.events import event
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def scrape(port: int) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.TransportError:
        return ""


def total(text: str, name: str) -> float:
    """Sum of a metric's samples over all label sets."""
    return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.MULTILINE))


def test_applied_events_latency_freshness_and_lag_are_exported(
    platform: Platform, ray_local: int, api_headers: dict[str, str]
) -> None:
    assert platform.info is not None
    with httpx.Client(base_url=platform.info.http_url, timeout=30, headers=api_headers) as api:
        answer = api.post("/v1/events", json=[event(f"metrics-{i}") for i in range(20)])
        assert answer.status_code == 202

    def exported() -> str | None:
        text = scrape(ray_local)
        ready = total(text, "ray_audience_events_applied_total") >= 20
        return text if ready and "ray_audience_partition_lag{" in text else None

    text = wait_until(exported, timeout_s=120, every_s=1.0)
    assert total(text, "ray_audience_apply_latency_ms_count") > 0
    assert total(text, "ray_audience_freshness_ms_count") > 0
    assert re.search(r'ray_audience_events_applied_total\{[^}]*shard="[01]"', text)
