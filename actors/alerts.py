"""Alerts when a per-minute metric leaves its expected band (no Ray, NATS or HTTP here).

A :class:`BandDetector` reads a series of closed minute buckets (events per
minute, or a conversion rate per minute) and compares each bucket with a
robust band computed from the ``history`` buckets before it: the median, plus
or minus ``k`` times the scaled median absolute deviation (with floors, so a
perfectly steady history does not give a zero-width band). It raises only with
at least ``min_history`` earlier buckets and enough volume, at most once per
``cooldown_minutes`` of event time per kind, and never on an open bucket: the
caller passes ``closed_before_ms`` and buckets ending after it are skipped, so a
half-filled current minute never looks like a drop.

Evaluation is a pure function of the series, so re-running it every merge tick
gives the same alerts with the same ids (kind + bucket start); the edge
(:mod:`serving.alerts`) keeps the ids it has seen and acts on new ones only.
Only minute buckets that exist are read: a gap in event time is skipped, not
read as zeros.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

from actors.state import iso_ms
from actors.windows import Granularity

MINUTE_MS = Granularity.MINUTE.width_ms
_MAD_SCALE = 1.4826  # makes the MAD estimate a standard deviation for normal data


class AlertKind(str, Enum):
    """What kind of excursion an alert reports; also the last token of its NATS subject."""

    RATE_DROP = "rate_drop"
    RATE_SPIKE = "rate_spike"
    CONVERSION_DROP = "conversion_drop"


@dataclass(frozen=True)
class Alert:
    """One metric excursion on one closed minute bucket.

    ``id`` depends only on the kind and the bucket, so re-evaluating the same
    data gives the same id.
    """

    id: str
    kind: AlertKind
    metric: str
    bucket_start: int
    value: float
    expected: float
    band_low: float
    band_high: float
    message: str
    at: int

    def to_dict(self) -> dict[str, Any]:
        """As JSON-ready data (times in RFC 3339)."""
        out = asdict(self)
        out["kind"] = self.kind.value
        out["bucket_start"] = iso_ms(self.bucket_start)
        out["at"] = iso_ms(self.at)
        return out


@dataclass(frozen=True)
class BandDetector:
    """A rule: which kinds to raise for a metric, and how wide its band is.

    Attributes:
        metric: name of the series (``events_per_minute``, ``conversion_rate``...).
        low_kind: kind raised below the band, or None to ignore drops.
        high_kind: kind raised above the band, or None to ignore spikes.
        history: earlier buckets the band is computed from.
        min_history: fewest earlier buckets before any alert.
        k: band half-width in (robust) standard deviations.
        min_rel_width: the band is at least this fraction of the median wide.
        min_abs_width: the band is at least this wide in the metric's units.
        min_volume: buckets whose volume (and whose median) is below this are
            not judged, and do not count as history.
        cooldown_minutes: after an alert of a kind, further ones of that kind
            within this many minutes of event time are suppressed.
        rate_metric: the value is a ratio and volume its denominator (drops are
            then judged on the bucket's own volume, not on the expected value).
    """

    metric: str
    low_kind: AlertKind | None = None
    high_kind: AlertKind | None = None
    history: int = 20
    min_history: int = 10
    k: float = 4.0
    min_rel_width: float = 0.3
    min_abs_width: float = 1.0
    min_volume: float = 10.0
    cooldown_minutes: int = 10
    rate_metric: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.min_history <= self.history:
            raise ValueError("need 1 <= min_history <= history")
        if self.k <= 0 or self.cooldown_minutes < 0:
            raise ValueError("k must be > 0 and cooldown_minutes >= 0")

    def describe(self) -> dict[str, Any]:
        """The rule as JSON-ready data, for the API's ``rules`` list."""
        out = asdict(self)
        for key in ("low_kind", "high_kind"):
            out[key] = None if out[key] is None else out[key].value
        return out

    def band(self, history: Sequence[float]) -> tuple[float, float, float]:
        """Expected value and band (low, high) from earlier values."""
        median = statistics.median(history)
        mad = statistics.median(abs(x - median) for x in history) * _MAD_SCALE
        width = max(self.k * mad, self.min_rel_width * abs(median), self.min_abs_width)
        return median, median - width, median + width

    def evaluate(
        self, series: Sequence[tuple[int, float, float]], closed_before_ms: int, now_ms: int
    ) -> list[Alert]:
        """Alerts over ``series`` of (bucket start, value, volume), sorted by start.

        Buckets ending after ``closed_before_ms`` are open and not judged.
        """
        alerts: list[Alert] = []
        history: list[float] = []
        last_alert: dict[AlertKind, int] = {}
        for start, value, volume in series:
            if start + MINUTE_MS > closed_before_ms:
                break
            if len(history) >= self.min_history:
                alert = self._judge(start, value, volume, history, now_ms)
                if alert is not None:
                    previous = last_alert.get(alert.kind)
                    if previous is None or start - previous >= self.cooldown_minutes * MINUTE_MS:
                        alerts.append(alert)
                        last_alert[alert.kind] = start
            if volume >= self.min_volume:
                history.append(value)
                del history[: -self.history]
        return alerts

    def _judge(
        self, start: int, value: float, volume: float, history: list[float], now_ms: int
    ) -> Alert | None:
        expected, low, high = self.band(history)
        # A drop in a count has a small volume by definition: judge it by what was expected.
        drop_volume = volume if self.rate_metric else expected
        if self.low_kind is not None and value < low and drop_volume >= self.min_volume:
            kind, word = self.low_kind, "below"
        elif self.high_kind is not None and value > high and volume >= self.min_volume:
            kind, word = self.high_kind, "above"
        else:
            return None
        message = (
            f"{self.metric} was {value:.4g} in the minute from {iso_ms(start)}, {word} "
            f"the expected band [{low:.4g}, {high:.4g}] (median {expected:.4g})"
        )
        return Alert(
            id=f"{kind.value}-{start}",
            kind=kind,
            metric=self.metric,
            bucket_start=start,
            value=value,
            expected=expected,
            band_low=low,
            band_high=high,
            message=message,
            at=now_ms,
        )


DEFAULT_RULES: tuple[BandDetector, ...] = (
    BandDetector("events_per_minute", low_kind=AlertKind.RATE_DROP, high_kind=AlertKind.RATE_SPIKE),
    BandDetector(
        "conversion_rate",
        low_kind=AlertKind.CONVERSION_DROP,
        min_rel_width=0.3,
        min_abs_width=0.05,
        min_volume=20,
        rate_metric=True,
    ),
)


def events_series(engagement: Mapping[str, Any]) -> list[tuple[int, float, float]]:
    """(start, events, events) per existing minute bucket of merged engagement, late ones too."""
    counts: dict[int, int] = {}
    for kind in ("buckets", "corrections"):
        for start, bucket in engagement[kind][Granularity.MINUTE.value].items():
            counts[int(start)] = counts.get(int(start), 0) + sum(bucket["events"])
    return [(s, float(n), float(n)) for s, n in sorted(counts.items())]


def conversion_series(
    conversion: Mapping[str, Any], step: int = 1
) -> list[tuple[int, float, float]]:
    """(start, step ``step`` / step ``step - 1``, step ``step - 1`` count) per minute bucket.

    Minutes where the earlier step has no events are left out (no rate).
    """
    counts: dict[int, list[int]] = {}
    for kind in ("buckets", "corrections"):
        for start, bucket in conversion[kind][Granularity.MINUTE.value].items():
            into = counts.setdefault(int(start), [0] * len(bucket["steps"]))
            counts[int(start)] = [a + b for a, b in zip(into, bucket["steps"], strict=True)]
    out = []
    for start, steps in sorted(counts.items()):
        if step < len(steps) and steps[step - 1]:
            out.append((start, steps[step] / steps[step - 1], float(steps[step - 1])))
    return out


def closed_before(series: Sequence[tuple[int, float, float]]) -> int:
    """The close horizon of a series: every minute before its newest one is closed.

    The newest minute with events may still be filling (and the merged view
    trails the stream), so it is never judged; a minute is judged once a later
    minute has events.
    """
    return series[-1][0] if series else 0
