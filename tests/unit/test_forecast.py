"""Forecasts: exact on lines, better with the season, honest errors and intervals."""

import json
import math

import numpy as np
import pytest

from actors.forecast import ForecastError, forecast, forecast_metrics


def seasonal_series(n: int, season: int = 24, noise: float = 0.5, seed: int = 3) -> np.ndarray:
    t = np.arange(n)
    rng = np.random.default_rng(seed)
    return 50 + 0.1 * t + 10 * np.sin(2 * np.pi * t / season) + rng.normal(0, noise, n)


def test_a_noiseless_linear_series_is_forecast_exactly_with_zero_error() -> None:
    y = 3.0 + 2.0 * np.arange(60)
    f = forecast(y, 10)
    assert f.method == "holt"
    np.testing.assert_allclose(f.values, 3.0 + 2.0 * np.arange(60, 70), atol=1e-9)
    assert f.mae == pytest.approx(0.0, abs=1e-9)
    assert f.mape == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(f.upper - f.lower, 0.0, atol=1e-9)


def test_a_noiseless_linear_seasonal_series_is_exact_with_holt_winters() -> None:
    t = np.arange(24 * 6 + 12)
    y = 20 + 0.5 * t + 5 * np.sin(2 * np.pi * t / 24)
    f = forecast(y[:-12], 12, season=24)
    assert f.method == "holt_winters"
    np.testing.assert_allclose(f.values, y[-12:], atol=1e-6)


def test_giving_the_season_beats_the_non_seasonal_model_on_a_seasonal_series() -> None:
    y = seasonal_series(24 * 8 + 24)
    history, held_out = y[:-24], y[-24:]
    seasonal, plain = forecast(history, 24, season=24), forecast(history, 24)
    assert (seasonal.method, plain.method) == ("holt_winters", "holt")
    assert seasonal.mae < plain.mae / 2
    assert np.mean(np.abs(seasonal.values - held_out)) < np.mean(np.abs(plain.values - held_out))


def test_intervals_contain_most_held_out_points_of_a_noisy_series() -> None:
    rng = np.random.default_rng(11)
    y = 100 + 0.5 * np.arange(230) + rng.normal(0, 5, 230)
    f = forecast(y[:200], 30)
    inside = (y[200:] >= f.lower) & (y[200:] <= f.upper)
    assert inside.mean() >= 0.8
    assert 2 < f.mae < 8
    assert 0 < f.mape < 10
    assert f.backtest_points == 40


def test_error_fields_are_reported_and_json_ready() -> None:
    f = forecast(seasonal_series(120), 5, season=24)
    d = json.loads(json.dumps(f.to_dict()))
    assert set(d) >= {"values", "lower", "upper", "mae", "mape", "method", "params"}
    assert len(d["values"]) == 5
    assert d["mae"] > 0
    assert np.all(f.lower <= f.values) and np.all(f.values <= f.upper)


def test_forecasts_are_deterministic() -> None:
    y = seasonal_series(200)
    a, b = forecast(y, 10, season=24), forecast(y, 10, season=24)
    assert a.params == b.params and np.array_equal(a.values, b.values) and a.mae == b.mae


def test_counts_are_never_forecast_below_zero() -> None:
    y = np.maximum(40.0 - 2.0 * np.arange(20), 0)
    f = forecast(y, 30)
    assert np.all(f.lower >= 0) and np.all(f.values >= 0)


def test_mape_skips_zero_actuals_and_is_nan_when_all_are_zero() -> None:
    f = forecast(np.zeros(30), 3)
    assert f.mae == 0 and math.isnan(f.mape)
    assert f.to_dict()["mape"] is None


def test_too_short_a_history_falls_back_to_the_last_value() -> None:
    assert forecast(np.array([5.0]), 3).values.tolist() == [5.0, 5.0, 5.0]
    f = forecast(np.array([5.0, 7.0]), 2)
    assert f.method == "naive" and f.mae == 2.0


def test_a_season_longer_than_a_third_of_the_history_falls_back_to_holt() -> None:
    assert forecast(seasonal_series(50), 5, season=24).method == "holt"


def test_each_metric_gets_its_own_forecast() -> None:
    out = forecast_metrics({"events": seasonal_series(100), "purchases": np.ones(100)}, 4)
    assert set(out) == {"events", "purchases"}
    np.testing.assert_allclose(out["purchases"].values, 1.0)


@pytest.mark.parametrize(
    ("history", "horizon", "season", "reason"),
    [
        (np.array([]), 3, None, "bad_history"),
        (np.array([1.0, np.nan, 2.0]), 3, None, "bad_history"),
        (np.ones(10), 0, None, "bad_horizon"),
        (np.ones(10), 3, 1, "bad_season"),
    ],
)
def test_bad_input_is_refused_with_a_reason(
    history: np.ndarray, horizon: int, season: int | None, reason: str
) -> None:
    with pytest.raises(ForecastError) as err:
        forecast(history, horizon, season)
    assert err.value.reason == reason
