"""`audience train`, `audience models` and `audience evaluate` from a terminal, on small files."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

AUDIENCE = str(Path(sys.executable).parent / "audience")
DAY_S = 86_400
START_S = 1_500_000_000


def run_cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCE_")}
    env.update(AUDIENCE_DATA_DIR=str(data_dir), AUDIENCE_NUM_CPUS="2")
    return subprocess.run(
        [AUDIENCE, *args], env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def ratings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 days of ratings by 80 users; a third stop halfway (churners)."""
    rng = random.Random(3)
    path = tmp_path_factory.mktemp("history") / "ratings.csv"
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["userId", "movieId", "rating", "timestamp"])
        for user in range(1, 81):
            last_day = 150 if user % 3 == 0 else 300
            for movie in rng.sample(range(1, 300), rng.randint(20, 40)):
                day = rng.uniform(0, last_day)
                out.writerow(
                    [user, movie, rng.choice([2.0, 3.5, 4.0, 5.0]), int(START_S + day * DAY_S)]
                )
    return path


@pytest.fixture(scope="module")
def telco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Telco-shaped table where month-to-month contracts churn more."""
    rng = random.Random(4)
    path = tmp_path_factory.mktemp("telco") / "telco.csv"
    columns = ["customerID", "gender", "SeniorCitizen", "tenure", "Contract", "MonthlyCharges"]
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow([*columns, "TotalCharges", "Churn"])
        for i in range(1500):
            contract = rng.choice(["Month-to-month", "One year", "Two year"])
            tenure = rng.randint(0, 72)
            charges = round(rng.uniform(20, 110), 2)
            p = 0.7 if contract == "Month-to-month" and tenure < 24 else 0.05
            total = "" if tenure == 0 else f"{tenure * charges:.2f}"
            churn = "Yes" if rng.random() < p else "No"
            out.writerow([f"c{i}", rng.choice(["Male", "Female"]), rng.randint(0, 1), tenure,
                          contract, charges, total, churn])  # fmt: skip
    return path


def test_train_stores_both_models_and_models_lists_them(ratings: Path, tmp_path: Path) -> None:
    done = run_cli("train", "--ratings", str(ratings), data_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "churn            v0001" in done.stdout and "personalization  v0001" in done.stdout
    listed = run_cli("models", "list", data_dir=tmp_path)
    assert listed.returncode == 0
    assert "churn            v0001*" in listed.stdout
    again = run_cli("train", "--ratings", str(ratings), "--kind", "churn", "--no-promote",
                    data_dir=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr
    promoted = run_cli("models", "promote", "churn", "v0002", data_dir=tmp_path)
    assert promoted.returncode == 0 and "v0002 is current" in promoted.stdout
    missing = run_cli("models", "promote", "churn", "v0042", data_dir=tmp_path)
    assert missing.returncode == 2 and "error: no churn model 'v0042'" in missing.stderr


def test_evaluate_prints_a_table_and_writes_the_json(
    ratings: Path, telco: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results.json"
    done = run_cli("evaluate", "--ratings", str(ratings), "--telco", str(telco), "--out", str(out),
                   data_dir=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "| personalization.hr_at_10 |" in done.stdout
    results = json.loads(out.read_text())
    for group in ("personalization", "popularity", "covisitation"):
        assert 0.0 <= results[group]["hr_at_10"] <= 1.0
        assert 0.0 <= results[group]["ndcg_at_10"] <= results[group]["hr_at_10"]
    assert results["churn"]["roc_auc"] > 0.5 and results["telco"]["roc_auc"] > 0.6


def test_bad_input_ends_in_one_error_line(tmp_path: Path) -> None:
    missing = run_cli("train", "--ratings", str(tmp_path / "nope.csv"), data_dir=tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error:")
    assert "Traceback" not in missing.stderr
    nothing = run_cli("evaluate", data_dir=tmp_path)
    assert nothing.returncode == 2 and "--ratings" in nothing.stderr
    live = run_cli("evaluate", "--telco", str(tmp_path / "t.csv"), "--live", data_dir=tmp_path)
    assert live.returncode == 2 and "--live needs --ratings" in live.stderr
