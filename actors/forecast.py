"""Short-horizon forecasts of bucket counts (events per minute, conversions per minute).

Exponential smoothing in error-correction form: Holt's linear trend, or additive
Holt-Winters when a season length is given and the history holds enough seasons.
Smoothing parameters come from a small grid (all candidates run at once as numpy
vectors) minimising the one-step-ahead squared error on the *training* part of
the history; the last part (a fifth, at least one season) is then a one-step
backtest whose errors are reported (``mae``, ``mape``) and whose spread sets
the prediction intervals. Everything is deterministic: same input, same output.

Intervals use the ETS(A,A,N) / ETS(A,A,A) variance
``sigma**2 * (1 + sum_{j<h} c_j**2)`` with ``c_j = alpha * (1 + j * beta) +
gamma * [j % season == 0]`` (Hyndman et al., *Forecasting with Exponential
Smoothing*, ch. 6), assuming roughly normal one-step errors.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from actors.errors import AudienceError

_ALPHAS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
_BETAS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.4)  # share of alpha that goes to the trend
_GAMMAS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
_MIN_POINTS = 4  # below this, forecast the last value ("naive")


class ForecastError(AudienceError, ValueError):
    """The input cannot be forecast: empty or non-finite history, bad horizon or season.

    Attributes:
        reason: short machine-readable reason, e.g. ``"bad_horizon"``.
        detail: what exactly was wrong, for people.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Forecast:
    """Point forecasts with intervals and the backtest error of the model that made them.

    Attributes:
        values: forecast for the next ``horizon`` buckets.
        lower: lower interval bound per bucket.
        upper: upper interval bound per bucket.
        mae: mean absolute one-step error on the backtest (NaN without one).
        mape: mean absolute percentage error (in %) over backtest points whose
            actual is non-zero (NaN when there are none; counts are often 0).
        method: ``"holt_winters"``, ``"holt"`` or ``"naive"``.
        params: the chosen smoothing parameters.
        backtest_points: how many one-step errors ``mae`` averages.
    """

    values: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    mae: float
    mape: float
    method: str
    params: dict[str, float] = field(default_factory=dict)
    backtest_points: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN becomes ``None``)."""

        def num(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        return {
            "method": self.method,
            "values": self.values.tolist(),
            "lower": self.lower.tolist(),
            "upper": self.upper.tolist(),
            "mae": num(self.mae),
            "mape": num(self.mape),
            "params": self.params,
            "backtest_points": self.backtest_points,
        }


def forecast(
    history: np.ndarray,
    horizon: int,
    season: int | None = None,
    *,
    level: float = 0.95,
    nonnegative: bool = True,
) -> Forecast:
    """Forecast the next ``horizon`` buckets of a regular series.

    Args:
        history: bucket values, oldest first, evenly spaced, no gaps (fill
            empty buckets with 0 before calling).
        horizon: number of buckets to forecast.
        season: season length in buckets (e.g. 60 for hourly seasonality of
            per-minute counts); Holt-Winters needs three seasons of history,
            otherwise Holt is used and ``method`` says so.
        level: coverage of the intervals.
        nonnegative: clip values and bounds at 0 (right for counts).

    Raises:
        ForecastError: on an empty or non-finite history, ``horizon < 1``,
            ``season < 2`` or ``level`` outside ``(0, 1)``.
    """
    y = np.asarray(history, dtype=np.float64).reshape(-1)
    if y.size == 0 or not np.all(np.isfinite(y)):
        raise ForecastError("bad_history", "history must be non-empty and finite")
    if not (isinstance(horizon, int) and horizon >= 1):
        raise ForecastError("bad_horizon", f"horizon must be a positive int, got {horizon!r}")
    if season is not None and not (isinstance(season, int) and season >= 2):
        raise ForecastError("bad_season", f"season must be an int >= 2, got {season!r}")
    if not 0 < level < 1:
        raise ForecastError("bad_level", f"level must be in (0, 1), got {level!r}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    n = y.size
    m = season if season is not None and n >= 3 * season else 1
    if n < _MIN_POINTS:
        return _naive(y, horizon, z, nonnegative)
    holdout = max(n // 5, m if m > 1 else 1)
    alpha, beta, gamma = _grid_search(y[: n - holdout], m)
    preds, state = _run(y, m, np.array([alpha]), np.array([beta]), np.array([gamma]))
    errors = y[n - holdout :] - preds[0, n - holdout :]
    sigma = float(np.sqrt(np.mean(errors**2)))
    lvl, trend, seasonal = state[0][0], state[1][0], state[2][0]
    steps = np.arange(1, horizon + 1)
    values = lvl + steps * trend + seasonal[(n + steps - 1) % m]
    j = np.arange(horizon)
    c = alpha * (1 + j * beta) + gamma * ((j % m == 0) & (j > 0) & (m > 1))
    c[0] = 0.0  # the one-step variance is sigma**2 itself
    half = z * sigma * np.sqrt(1 + np.cumsum(c**2))
    return _finish(
        values,
        half,
        errors,
        y[n - holdout :],
        "holt_winters" if m > 1 else "holt",
        {"alpha": alpha, "beta": beta, "gamma": gamma},
        nonnegative,
    )


def forecast_metrics(
    series: Mapping[str, np.ndarray], horizon: int, season: int | None = None
) -> dict[str, Forecast]:
    """:func:`forecast` for each named metric (e.g. ``events``, ``purchases``)."""
    return {name: forecast(values, horizon, season) for name, values in series.items()}


def _grid_search(y: np.ndarray, m: int) -> tuple[float, float, float]:
    """The grid point with the least one-step squared error after the warm-up."""
    gammas = _GAMMAS if m > 1 else (0.0,)
    grid = [(a, b, g) for a, b, g in itertools.product(_ALPHAS, _BETAS, gammas) if a + g <= 1]
    a, b, g = (np.array(col) for col in zip(*grid, strict=True))
    preds, _ = _run(y, m, a, b, g)
    warm = 2 * m if m > 1 else _holt_init_points(y.size)
    if y.size <= warm:
        return grid[len(grid) // 2]
    sse = np.sum((y[None, warm:] - preds[:, warm:]) ** 2, axis=1)
    best = int(np.argmin(np.round(sse, 9)))  # ties go to the first (smoothest) candidate
    return grid[best]


def _run(
    y: np.ndarray, m: int, alpha: np.ndarray, beta: np.ndarray, gamma: np.ndarray
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One-step predictions per candidate, shape ``(len(alpha), len(y))``, and the final state.

    The state is initialised from a line fitted to the first few points (Holt)
    or from the first two seasons (Holt-Winters), so that a noiseless linear
    (plus seasonal) series is predicted exactly; a fitted line rather than the
    first difference keeps one noisy step from setting the trend. Holt-Winters
    predictions for the first season are copies of the data.
    """
    g = alpha.size
    preds = np.tile(y, (g, 1))
    if m > 1:
        first, second = y[:m].mean(), y[m : 2 * m].mean()
        b0 = (second - first) / m
        season0 = y[:m] - (first + b0 * (np.arange(m) - (m - 1) / 2))
        l0, start = first + b0 * (m - 1) / 2, m
    else:
        k = _holt_init_points(y.size)
        b0, intercept = np.polyfit(np.arange(k), y[:k], 1) if k > 1 else (0.0, y[0])
        season0, l0, start = np.zeros(1), intercept - b0, 0
    lvl = np.full(g, l0)
    trend = np.full(g, b0)
    seasonal = np.tile(season0, (g, 1))
    ab = alpha * beta
    for t in range(start, y.size):
        k = t % m
        yhat = lvl + trend + seasonal[:, k]
        preds[:, t] = yhat
        e = y[t] - yhat
        lvl = lvl + trend + alpha * e
        trend = trend + ab * e
        seasonal[:, k] += gamma * e
    return preds, (lvl, trend, seasonal)


def _holt_init_points(n: int) -> int:
    """Points the initial Holt line is fitted to: enough to average noise, few enough to adapt."""
    return min(10, max(2, n // 2))


def _naive(y: np.ndarray, horizon: int, z: float, nonnegative: bool) -> Forecast:
    """Too little history to fit anything: repeat the last value, error from its changes."""
    errors = np.diff(y)
    sigma = float(np.sqrt(np.mean(errors**2))) if errors.size else math.nan
    half = z * sigma * np.sqrt(np.arange(1, horizon + 1))
    return _finish(np.full(horizon, y[-1]), half, errors, y[1:], "naive", {}, nonnegative)


def _finish(
    values: np.ndarray,
    half: np.ndarray,
    errors: np.ndarray,
    actual: np.ndarray,
    method: str,
    params: dict[str, float],
    nonnegative: bool,
) -> Forecast:
    lower, upper = values - half, values + half
    if nonnegative:
        values, lower, upper = (np.maximum(v, 0.0) for v in (values, lower, upper))
    nz = actual != 0
    mae = float(np.mean(np.abs(errors))) if errors.size else math.nan
    mape = float(np.mean(np.abs(errors[nz] / actual[nz])) * 100) if nz.any() else math.nan
    return Forecast(values, lower, upper, mae, mape, method, params, int(errors.size))
