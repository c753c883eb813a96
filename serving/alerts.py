"""Alerts at the edge: run the detectors on each merge tick, keep, publish and deliver.

The API replica calls :meth:`AlertCenter.evaluate` after every merge with the
merged :class:`~actors.insights.Insights`; alerts it has not seen before are
kept in a bounded list (newest first, for ``GET /v1/insights/alerts``),
published on ``audience.alerts.<kind>`` (core NATS) and POSTed to every
configured webhook URL. Each delivery runs in its own background task with a
short timeout and exponential-backoff retries, so the merge loop never waits on
a slow receiver.

Webhook bodies are signed: ``X-Audience-Signature: sha256=<hex>`` is the
HMAC-SHA256, keyed by the shared secret, of ``"<X-Audience-Timestamp>.<body>"``.
The secret is never logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from actors.alerts import (
    DEFAULT_RULES,
    Alert,
    BandDetector,
    closed_before,
    conversion_series,
    events_series,
)
from actors.insights import Insights
from actors.partitioning import alerts_subject
from serving.signing import sign

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]


@dataclass(frozen=True)
class AlertsConfig:
    """Alert delivery, as plain values from the settings.

    Attributes:
        webhook_urls: where every new alert is POSTed.
        webhook_secret: HMAC key of the signature (kept out of ``repr``).
        attempts: deliveries tried per URL before counting a failure.
        timeout_s: per-attempt HTTP timeout.
        backoff_s: wait before the second attempt; doubled after each failure.
        keep: alerts kept in memory for the API.
    """

    webhook_urls: tuple[str, ...] = ()
    webhook_secret: str = field(default="", repr=False)
    attempts: int = 3
    timeout_s: float = 2.0
    backoff_s: float = 0.5
    keep: int = 200


class AlertCenter:
    """Detectors, the recent alerts and delivery counters of one API replica."""

    def __init__(self, config: AlertsConfig, rules: Sequence[BandDetector] = DEFAULT_RULES) -> None:
        self.config = config
        self.rules = tuple(rules)
        self.recent: deque[Alert] = deque(maxlen=config.keep)
        self._seen: set[str] = set()
        self.delivered = 0
        self.failed = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None

    def evaluate(self, insights: Insights, now_ms: int | None = None) -> list[Alert]:
        """New alerts of the merged snapshot (ones not raised before), kept in the list."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        found: list[Alert] = []
        for rule in self.rules:
            if rule.rate_metric:
                series = conversion_series(insights.conversion)
            else:
                series = events_series(insights.engagement)
            found.extend(rule.evaluate(series, closed_before(series), now_ms))
        new = [a for a in sorted(found, key=lambda a: a.bucket_start) if a.id not in self._seen]
        for alert in new:
            self._seen.add(alert.id)
            self.recent.appendleft(alert)
        if len(self._seen) > 50 * self.config.keep:  # ids of alerts long pruned
            self._seen = {a.id for a in self.recent}
        return new

    def dispatch(self, alerts: Sequence[Alert], publish: Publish | None) -> None:
        """Publish and deliver ``alerts`` in background tasks; returns at once."""
        for alert in alerts:
            body = orjson.dumps(alert.to_dict())
            if publish is not None:
                self._spawn(self._publish(publish, alerts_subject(alert.kind.value), body))
            for url in self.config.webhook_urls:
                self._spawn(self._deliver(url, body))

    def answer(self, limit: int) -> dict[str, Any]:
        """The ``GET /v1/insights/alerts`` answer."""
        return {
            "alerts": [a.to_dict() for a in list(self.recent)[:limit]],
            "rules": [r.describe() for r in self.rules],
            "webhooks": {
                "targets": len(self.config.webhook_urls),
                "delivered": self.delivered,
                "failed": self.failed,
            },
        }

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, publish: Publish, subject: str, body: bytes) -> None:
        try:
            await publish(subject, body)
        except Exception:  # NATS reconnecting: the alert is still listed and delivered
            log.warning("could not publish alert on %s", subject, exc_info=True)

    async def _deliver(self, url: str, body: bytes) -> None:
        """POST one alert to one URL, retrying with exponential backoff."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.config.timeout_s)
        wait = self.config.backoff_s
        for attempt in range(1, self.config.attempts + 1):
            timestamp = str(int(time.time()))
            headers = {
                "Content-Type": "application/json",
                "X-Audience-Timestamp": timestamp,
                "X-Audience-Signature": sign(self.config.webhook_secret, timestamp, body),
            }
            try:
                answer = await self._client.post(url, content=body, headers=headers)
                if answer.status_code < 300:
                    self.delivered += 1
                    return
                problem = f"status {answer.status_code}"
            except httpx.HTTPError as exc:
                problem = type(exc).__name__
            log.warning("webhook %s attempt %d failed: %s", url, attempt, problem)
            if attempt < self.config.attempts:
                await asyncio.sleep(wait)
                wait *= 2
        self.failed += 1
