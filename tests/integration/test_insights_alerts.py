"""Alerts through the whole stack: a scripted spike is listed, published and delivered.

The events use their own users (``alr-*``) and 2026-04-01, a day no other test
publishes to: later than the days of the files that run before this one (so
its minute buckets are not pruned as the oldest) and earlier than the 2026-06
days of the retention and trends tests (whose answers read the newest day).
Twenty steady minutes, a minute at ten times the rate, then one more minute so
that the spike's minute is closed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from datetime import datetime, timezone
from typing import Any

import httpx
import orjson
import pytest

from actors.nats_auth import NatsCredentials, connect
from cluster.launcher import Platform
from tests.support.events import event
from tests.support.waiting import async_wait_until
from tests.support.webhooks import WebhookReceiver

pytestmark = pytest.mark.integration

DAY = "2026-04-01"
STEADY = 20  # events per minute
SPIKE_MINUTE = 20
SPIKE_START = int(datetime(2026, 4, 1, 10, SPIKE_MINUTE, tzinfo=timezone.utc).timestamp() * 1000)
ALERT_ID = f"rate_spike-{SPIKE_START}"


def _script() -> list[dict[str, Any]]:
    per_minute = [STEADY] * SPIKE_MINUTE + [10 * STEADY, STEADY]
    return [
        event(f"alr-{i % 50}", "page_view", ts=f"{DAY}T10:{minute:02d}:{i % 60:02d}Z")
        for minute, n in enumerate(per_minute)
        for i in range(n)
    ]


def _signed_correctly(secret: str, headers: dict[str, str], body: bytes) -> bool:
    stamp = headers["X-Audience-Timestamp"]
    mac = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["X-Audience-Signature"], f"sha256={mac}")


def test_a_rate_spike_is_listed_published_and_delivered_signed(
    platform: Platform, webhook_receiver: WebhookReceiver, api_headers: dict[str, str]
) -> None:
    assert platform.info is not None
    admin = platform.credentials("admin")  # alerts subjects: published by the API, read by admin
    scenario = _scenario(
        platform.info.http_url, platform.nats_url, admin, webhook_receiver, api_headers
    )
    asyncio.run(scenario)


async def _scenario(
    http_url: str,
    nats_url: str,
    admin: NatsCredentials | None,
    receiver: WebhookReceiver,
    headers: dict[str, str],
) -> None:
    nc = await connect(nats_url, admin)
    published: list[dict[str, Any]] = []

    async def on_alert(msg: Any) -> None:
        published.append({"subject": msg.subject, **orjson.loads(msg.data)})

    await nc.subscribe("audience.alerts.>", cb=on_alert)
    try:
        async with httpx.AsyncClient(base_url=http_url, timeout=30, headers=headers) as api:
            answer = await api.post("/v1/events", json=_script())
            assert answer.status_code == 202, answer.text

            async def listed() -> dict[str, Any] | None:
                body = (await api.get("/v1/insights/alerts", params={"limit": 1000})).json()
                found = [a for a in body.get("alerts", []) if a["id"] == ALERT_ID]
                return {**body, "found": found[0]} if found else None

            # No insights request before the delivery: with webhooks configured, the API
            # evaluates alerts from its start, without waiting for a first reader.
            delivered = await async_wait_until(lambda: _delivered(receiver, ALERT_ID), timeout_s=60)
            on_nats = await async_wait_until(lambda: _published(published, ALERT_ID), timeout_s=30)
            body = await async_wait_until(listed, timeout_s=30)
    finally:
        await nc.close()
    alert = body["found"]
    assert alert["kind"] == "rate_spike" and alert["metric"] == "events_per_minute"
    assert alert["value"] == 10 * STEADY and alert["expected"] == STEADY
    assert alert["band_high"] < alert["value"]
    assert alert["bucket_start"] == f"{DAY}T10:{SPIKE_MINUTE}:00.000Z"
    assert {r["metric"] for r in body["rules"]} == {"events_per_minute", "conversion_rate"}
    assert body["webhooks"]["targets"] == 1 and body["webhooks"]["delivered"] >= 1
    assert _signed_correctly(receiver.secret, delivered.headers, delivered.body)
    assert orjson.loads(delivered.body)["id"] == ALERT_ID
    assert on_nats["subject"] == "audience.alerts.rate_spike"


async def _delivered(receiver: WebhookReceiver, alert_id: str) -> Any:
    for request in list(receiver.requests):
        if orjson.loads(request.body).get("id") == alert_id:
            return request
    return None


async def _published(published: list[dict[str, Any]], alert_id: str) -> Any:
    return next((p for p in published if p["id"] == alert_id), None)
