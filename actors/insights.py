"""The insights snapshot the API serves: every shard's partials merged into one view.

Shards ship :meth:`~actors.shard.Shard.insights_partials` (plain data: engagement
and conversion dicts, retention snapshot bytes, trend dicts); the API's timer calls
:func:`merge_insights` once a second and answers every request from the result,
with :func:`retention_answer`, :func:`trends_answer` and
:func:`~actors.funnel_report.conversion_answer` (its own module). No Ray here, so the
glue is tested without a cluster.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import numpy as np

from actors import conversion
from actors.engagement import merge_partials
from actors.forecast import forecast
from actors.retention import RetentionAggregate, iso_day
from actors.segments import merge_segments, segments_answer
from actors.state import iso_ms
from actors.trends import TrendAggregate
from actors.windows import Granularity

FORECAST_HORIZON = 15
FORECAST_HISTORY = 180  # minutes of history fed to the forecast (the minute retention)
FORECAST_SEASON = 60  # hourly pattern in per-minute counts, used once 3 hours are seen
_EPOCH = date(1970, 1, 1)


@dataclass(frozen=True)
class Insights:
    """The merge of every shard's partials; treat as read-only."""

    engagement: dict[str, Any]
    conversion: dict[str, Any]
    retention: RetentionAggregate
    trends: TrendAggregate
    segments: dict[str, Any] = field(default_factory=lambda: merge_segments([]))


def merge_insights(shards: Sequence[Mapping[str, Any]]) -> Insights:
    """Merge shard partials (see ``Shard.insights_partials``); order does not matter.

    Raises:
        SketchError: if a snapshot is corrupt or shards run different settings.
        ValueError: if shards run different conversion funnels.
    """
    retention = RetentionAggregate()
    trends = TrendAggregate()
    for shard in shards:
        retention.merge(RetentionAggregate.restore(shard["retention"]))
        trends.merge(TrendAggregate.from_dict(shard["trends"]))
    return Insights(
        merge_partials([s["engagement"] for s in shards]),
        conversion.merge_partials([s["conversion"] for s in shards]),
        retention,
        trends,
        merge_segments([s.get("segments") for s in shards]),
    )


def segments_report(insights: Insights) -> dict[str, Any]:
    """Every segment's rule in words, size, entries and exits, summed over shards.

    ``event_time`` is the newest shard's event-time "now" (None before any event).
    """
    now = insights.segments["now_ms"]
    return {
        "event_time": None if now is None else iso_ms(now),
        "segments": segments_answer(insights.segments),
    }


def day_number(day: date) -> int:
    """Days since 1970-01-01, the day numbers of :mod:`actors.retention`."""
    return (day - _EPOCH).days


def retention_problem(
    start_day: date | None, end_day: date | None, rolling: int | None
) -> str | None:
    """Why retention parameters cannot be answered, or None when they can."""
    limit = RetentionAggregate().max_offset
    if start_day is not None and end_day is not None and end_day < start_day:
        return "end_day must not be before start_day"
    if rolling is not None and not 1 <= rolling <= limit:
        return f"rolling must be a day offset in [1, {limit}], got {rolling}"
    return None


def retention_answer(
    insights: Insights,
    start_day: date | None = None,
    end_day: date | None = None,
    rolling: int | None = None,
) -> dict[str, Any]:
    """Cohorts first seen in ``[start_day, end_day]``, DAU/WAU/MAU and optional rolling retention.

    Counts are HyperLogLog estimates; ``relative_error`` is their standard error.
    Call :func:`retention_problem` first: bad parameters raise ``SketchError``.
    """
    agg = insights.retention
    lo = None if start_day is None else day_number(start_day)
    hi = None if end_day is None else day_number(end_day)
    answer: dict[str, Any] = {
        "start_day": None if start_day is None else start_day.isoformat(),
        "end_day": None if end_day is None else end_day.isoformat(),
        "latest_day": None if agg.latest_day is None else iso_day(agg.latest_day),
        "relative_error": agg.relative_error,
        "cohorts": [],
        "active_users": None,
        "rolling": None,
    }
    if agg.latest_day is None:
        return answer
    keep = ("date", "size", "day_1", "day_7", "day_30", "curve")
    answer["cohorts"] = [{k: row[k] for k in keep} for row in agg.cohort_table(lo, hi)]
    active = agg.active_users()
    answer["active_users"] = {
        k: active[k] for k in ("date", "dau", "wau", "mau", "stickiness", "complete")
    }
    if rolling is not None:
        answer["rolling"] = agg.rolling_retention(rolling, lo, hi)
    return answer


def events_per_minute(
    engagement: Mapping[str, Any], history: int = FORECAST_HISTORY
) -> tuple[int, np.ndarray] | None:
    """The last ``history`` minutes of event counts up to the newest minute bucket.

    Empty minutes count 0, late corrections are included. Returns the start
    (epoch ms) of the first minute and the counts, or None without any bucket.
    """
    width = Granularity.MINUTE.width_ms
    counts: dict[int, int] = {}
    for kind in ("buckets", "corrections"):
        for start, bucket in engagement[kind][Granularity.MINUTE.value].items():
            counts[int(start)] = counts.get(int(start), 0) + sum(bucket["events"])
    if not counts:
        return None
    newest = max(counts)
    first = max(min(counts), newest - (history - 1) * width)
    series = np.array([counts.get(t, 0) for t in range(first, newest + width, width)], dtype=float)
    return first, series


def trends_answer(
    insights: Insights, n: int = 10, horizon: int = FORECAST_HORIZON
) -> dict[str, Any]:
    """Trending and emerging ids, and a forecast of events per minute for ``horizon`` minutes.

    The forecast runs on the merged minute buckets, so it reads event time: it
    continues from the newest minute with any event, not from the wall clock.
    """
    trends = insights.trends
    answer: dict[str, Any] = {
        "reference_time": None if trends.ref_ms is None else iso_ms(trends.ref_ms),
        "trending_items": trends.trending_items(n),
        "trending_categories": trends.trending_categories(n),
        "emerging_items": [_finite(row) for row in trends.emerging_items(n)],
        "forecast": None,
    }
    series = events_per_minute(insights.engagement)
    if series is not None:
        first, history = series
        width = Granularity.MINUTE.width_ms
        result = forecast(history, horizon, FORECAST_SEASON)
        answer["forecast"] = {
            "metric": "events_per_minute",
            "start": iso_ms(first + len(history) * width),
            "history_start": iso_ms(first),
            "history_points": len(history),
            **result.to_dict(),
        }
    return answer


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """Infinite scores (no baseline at all) as None: JSON has no infinity."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
