"""`audience simulate` and `audience status` against a running platform."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from actors.events import EVENT_TYPES
from actors.simulator import Simulator
from cluster.launcher import Platform
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

AUDIENCE = str(Path(sys.executable).parent / "audience")
START_MS = 1_767_225_600_000  # 2026-01-01, fixed so the run is reproducible


def run_cli(
    *args: str,
    partitions: int = 8,
    api_key: str | None = None,
    login: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCE_")}
    env["AUDIENCE_PARTITIONS"] = str(partitions)
    env.update(login or {})  # AUDIENCE_NATS_USER etc.: the NATS login
    if api_key is not None:
        env["AUDIENCE_API_KEY"] = api_key
    return subprocess.run(
        [AUDIENCE, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_simulate_publishes_exactly_what_the_seeded_simulator_generates(
    platform: Platform, nats_producer_env: dict[str, str]
) -> None:
    users, rate, duration, seed = 300, 2000, 1.5, 7
    done = run_cli(
        "simulate",
        *("--users", str(users), "--rate", str(rate), "--duration", str(duration)),
        *("--seed", str(seed), "--start-ms", str(START_MS), "--nats-url", platform.nats_url),
        login=nats_producer_env,
    )
    assert done.returncode == 0, done.stderr
    assert f"published {int(rate * duration)} events" in done.stdout

    truth: dict[str, Counter[str]] = {}
    for _, batch in Simulator(users, seed, START_MS).batches(rate, duration):
        for user, code in zip(batch.user_id, batch.type.tolist(), strict=True):
            truth.setdefault(user, Counter())[EVENT_TYPES[code].value] += 1
    names = sorted(truth)
    assert platform.pool is not None
    pool = platform.pool

    def profiles() -> list[dict] | None:
        found = asyncio.run(pool.profiles(names))
        done = all(p and p["events"] == sum(truth[p["user_id"]].values()) for p in found)
        return found if done else None  # type: ignore[return-value]

    for profile in wait_until(profiles, timeout_s=120):
        expected = truth[profile["user_id"]]
        assert profile["counts"] == {t.value: expected[t.value] for t in EVENT_TYPES}


def test_status_prints_shards_lag_and_dead_letters(platform: Platform, api_key: str) -> None:
    assert platform.info is not None
    done = run_cli("status", "--url", platform.info.http_url, api_key=api_key)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["shard", "users", "applied"]
    assert [line.split()[0] for line in lines[1:3]] == ["0", "1"]
    assert any(line.startswith("lag per partition:") for line in lines)
    assert any(line.startswith("dead letters:") for line in lines)


def test_a_wrong_nats_password_ends_in_one_clear_error_line(
    platform: Platform, nats_producer_env: dict[str, str]
) -> None:
    wrong = {**nats_producer_env, "AUDIENCE_NATS_PASSWORD": "not-the-password"}
    done = run_cli(
        "simulate",
        *("--users", "10", "--rate", "10", "--duration", "0.5", "--nats-url", platform.nats_url),
        login=wrong,
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert "refused the credentials (user 'producer'): authorization violation" in errors[0]
    assert "Traceback" not in done.stderr and "not-the-password" not in done.stderr
