"""Band detectors on scripted minute series, and the edge's dedupe, signing and delivery."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

import httpx
import pytest

from actors.alerts import (
    DEFAULT_RULES,
    MINUTE_MS,
    AlertKind,
    BandDetector,
    closed_before,
    conversion_series,
    events_series,
)
from serving.alerts import AlertCenter, AlertsConfig, sign

T0 = 1_788_220_800_000  # 2026-09-01T00:00Z
RATE = DEFAULT_RULES[0]
CONVERSION = DEFAULT_RULES[1]


def counts(values: list[float]) -> list[tuple[int, float, float]]:
    return [(T0 + i * MINUTE_MS, float(v), float(v)) for i, v in enumerate(values)]


def judge(rule: BandDetector, series: list[tuple[int, float, float]]) -> list[tuple[str, int]]:
    alerts = rule.evaluate(series, closed_before(series), now_ms=0)
    return [(a.kind.value, (a.bucket_start - T0) // MINUTE_MS) for a in alerts]


def test_a_steady_series_raises_nothing() -> None:
    assert judge(RATE, counts([100, 104, 97, 101, 99] * 6 + [100])) == []


def test_a_drop_raises_one_rate_drop_on_its_minute() -> None:
    assert judge(RATE, counts([100] * 20 + [5] + [100] * 3)) == [("rate_drop", 20)]


def test_a_spike_raises_one_rate_spike_on_its_minute() -> None:
    assert judge(RATE, counts([20] * 20 + [200] + [20])) == [("rate_spike", 20)]


def test_a_second_excursion_within_the_cooldown_is_suppressed() -> None:
    series = counts([100] * 20 + [5, 100, 100, 5] + [100] * 10 + [5, 100])
    assert judge(RATE, series) == [("rate_drop", 20), ("rate_drop", 34)]


def test_the_open_newest_minute_is_not_judged() -> None:
    assert judge(RATE, counts([100] * 20 + [5])) == []


def test_too_little_history_or_volume_raises_nothing() -> None:
    assert judge(RATE, counts([100] * 5 + [1000, 100])) == []
    assert judge(RATE, counts([3] * 20 + [0, 3])) == []


def test_a_conversion_drop_is_raised_on_enough_page_views() -> None:
    series = [(T0 + i * MINUTE_MS, 0.3, 100.0) for i in range(20)]
    series += [(T0 + 20 * MINUTE_MS, 0.05, 100.0), (T0 + 21 * MINUTE_MS, 0.3, 100.0)]
    assert judge(CONVERSION, series) == [("conversion_drop", 20)]
    series[20] = (T0 + 20 * MINUTE_MS, 0.05, 5.0)
    assert judge(CONVERSION, series) == []


def test_series_are_read_from_merged_minute_buckets() -> None:
    engagement = {
        "buckets": {"minute": {T0: {"events": [1, 2]}, T0 + MINUTE_MS: {"events": [3, 0]}}},
        "corrections": {"minute": {T0: {"events": [1, 0]}}},
    }
    assert events_series(engagement) == [(T0, 4.0, 4.0), (T0 + MINUTE_MS, 3.0, 3.0)]
    conversion = {
        "buckets": {"minute": {T0: {"steps": [10, 4, 1]}, T0 + MINUTE_MS: {"steps": [0, 1, 0]}}},
        "corrections": {"minute": {}},
    }
    assert conversion_series(conversion) == [(T0, 0.4, 10.0)]


def test_alert_ids_are_stable_for_the_same_kind_and_minute() -> None:
    series = counts([20] * 20 + [200] + [20])
    first = RATE.evaluate(series, closed_before(series), now_ms=1)
    again = RATE.evaluate(series, closed_before(series), now_ms=2)
    assert [a.id for a in first] == [a.id for a in again] == [f"rate_spike-{T0 + 20 * MINUTE_MS}"]
    assert first[0].kind is AlertKind.RATE_SPIKE and first[0].band_high < 200


def test_a_detector_refuses_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        BandDetector("x", min_history=30, history=20)


def test_the_signature_is_an_hmac_of_timestamp_and_body() -> None:
    expected = hmac.new(b"s3cret", b"1700000000.{}", hashlib.sha256).hexdigest()
    assert sign("s3cret", "1700000000", b"{}") == f"sha256={expected}"


def test_the_secret_stays_out_of_the_config_repr() -> None:
    assert "s3cret" not in repr(AlertsConfig(webhook_secret="s3cret"))


class _Merged:
    def __init__(self, values: list[int]) -> None:
        minute = {T0 + i * MINUTE_MS: {"events": [v]} for i, v in enumerate(values)}
        self.engagement = {"buckets": {"minute": minute}, "corrections": {"minute": {}}}
        self.conversion = {"buckets": {"minute": {}}, "corrections": {"minute": {}}}


def test_the_center_keeps_new_alerts_once_and_delivers_them_with_retries() -> None:
    seen: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(503 if len(seen) == 1 else 204)

    published: list[tuple[str, bytes]] = []

    async def publish(subject: str, body: bytes) -> None:
        published.append((subject, body))

    async def scenario() -> AlertCenter:
        config = AlertsConfig(webhook_urls=("http://hook/a",), webhook_secret="k", backoff_s=0.01)
        center = AlertCenter(config)
        center._client = httpx.AsyncClient(transport=httpx.MockTransport(receiver))
        merged = _Merged([20] * 20 + [200, 20])
        new = center.evaluate(merged)  # type: ignore[arg-type]
        assert len(new) == 1 and center.evaluate(merged) == []  # type: ignore[arg-type]
        center.dispatch(new, publish)
        while center._tasks:
            await asyncio.sleep(0.01)
        return center

    center = asyncio.run(scenario())
    assert [s for s, _ in published] == ["audience.alerts.rate_spike"]
    assert len(seen) == 2  # one retry after the 503
    request = seen[-1]
    stamp = request.headers["X-Audience-Timestamp"]
    assert request.headers["X-Audience-Signature"] == sign("k", stamp, request.content)
    answer = center.answer(10)
    assert answer["webhooks"] == {"targets": 1, "delivered": 1, "failed": 0}
    assert [a["kind"] for a in answer["alerts"]] == ["rate_spike"]


def test_webhook_settings_split_urls_refuse_other_schemes_and_redact_the_secret() -> None:
    from cluster.launcher import alerts_of
    from cluster.settings import Settings

    settings = Settings(
        webhook_urls="http://a/x, https://b/y,",
        webhook_secret="s3cret",
        _env_file=None,  # type: ignore[call-arg]
    )
    assert settings.webhook_targets == ("http://a/x", "https://b/y")
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())
    assert alerts_of(settings).webhook_secret == "s3cret"
    with pytest.raises(ValueError, match="webhook URL"):
        Settings(webhook_urls="ftp://a", _env_file=None)  # type: ignore[call-arg]
