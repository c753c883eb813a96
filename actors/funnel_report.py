"""The conversion answer: merged funnel buckets as counts, conversion rates and revenue.

Kept apart from :mod:`actors.conversion` (the shard side) because it reads two
merged views: the funnel's buckets and engagement's active-user sketches, which
give revenue per active user. Distinct counts over several buckets (totals) are
unions of the buckets' sketches, never sums.
"""

from __future__ import annotations

from typing import Any

from actors.conversion import empty_bucket, merge_buckets
from actors.insights import Insights
from actors.sketches import HyperLogLog
from actors.state import iso_ms
from actors.windows import Granularity


def conversion_answer(
    insights: Insights,
    granularity: Granularity,
    start_ms: int | None = None,
    end_ms: int | None = None,
    include_late: bool = False,
) -> dict[str, Any]:
    """Buckets of ``granularity`` starting in ``[start_ms, end_ms)`` and their totals.

    Per bucket, step counts are transitions made by events of that bucket, so
    an attempt that crosses a bucket edge counts its steps in different buckets
    (a bucket's rate may then exceed 1); the totals over a range do not have
    that edge effect except at the range's ends.
    """
    merged = insights.conversion
    engagement = insights.engagement
    steps = merged["funnel"]["steps"]
    kinds = ("buckets", "corrections") if include_late else ("buckets",)
    starts = sorted(
        {
            s
            for kind in ("buckets", "corrections")
            for s in merged[kind][granularity.value]
            if (start_ms is None or s >= start_ms) and (end_ms is None or s < end_ms)
        }
    )
    rows = []
    total = empty_bucket(len(steps))
    all_active = None
    for start in starts:
        bucket = empty_bucket(len(steps))
        active = None
        for kind in kinds:
            found = merged[kind][granularity.value].get(start)
            if found is not None:
                bucket = merge_buckets(bucket, found)
            users = engagement[kind][granularity.value].get(start)
            if users is not None:
                active = _union(active, users["users"])
        late = merged["corrections"][granularity.value].get(start)
        total = merge_buckets(total, bucket)
        all_active = _union(all_active, active.to_bytes()) if active is not None else all_active
        row = {
            "start": iso_ms(start),
            "end": iso_ms(start + granularity.width_ms),
            **_describe(steps, bucket, active),
            "late_steps": 0 if late is None else sum(late["steps"]),
        }
        rows.append(row)
    return {"buckets": rows, "totals": _describe(steps, total, all_active)}


def _union(into: HyperLogLog | None, data: bytes) -> HyperLogLog:
    sketch = HyperLogLog.from_bytes(data)
    if into is not None:
        sketch.merge(into)
    return sketch


def _describe(
    steps: list[str], bucket: dict[str, Any], active: HyperLogLog | None
) -> dict[str, Any]:
    """Counts, rates (None where the denominator is 0) and revenue figures of a bucket."""
    counts = bucket["steps"]
    first = counts[0]
    revenue = bucket["revenue_milli"] / 1000
    purchasers = round(HyperLogLog.from_bytes(bucket["purchasers"]).count())
    active_users = 0 if active is None else round(active.count())
    return {
        "steps": [
            {
                "type": kind,
                "count": count,
                "rate_from_first": count / first if first else None,
                "rate_from_previous": (count / counts[k - 1] if counts[k - 1] else None)
                if k
                else (1.0 if count else None),
            }
            for k, (kind, count) in enumerate(zip(steps, counts, strict=True))
        ],
        "revenue": revenue,
        "purchases": bucket["purchases"],
        "purchasing_users": purchasers,
        "active_users": active_users,
        "revenue_per_purchasing_user": revenue / purchasers if purchasers else None,
        "revenue_per_active_user": revenue / active_users if active_users else None,
    }
