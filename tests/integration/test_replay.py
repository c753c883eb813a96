"""`audience replay` and replay_history: recorded ratings reach the shards, in order."""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from actors.codec import encode
from actors.nats_auth import connect
from actors.partitioning import events_subject, partition_of
from cluster.launcher import Platform
from cluster.replay import replay_history
from models.history import read_ratings
from tests.support.events import random_batch
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

AUDIENCE = str(Path(sys.executable).parent / "audience")
YEAR_2001 = 978_307_200  # epoch seconds
SUMMARY = re.compile(
    r"^replayed (\d+) events \((\d+) users, (\d+) items\) in [\d.]+ s "
    r"\([\d,]+ events/s\), (\d+) rejected$"
)


Row = tuple[int, int, float, int]  # userId, movieId, rating, timestamp


def write_ratings(path: Path, first_user: int, users: int, seed: int) -> list[Row]:
    """A MovieLens-shaped ratings.csv in 2001, with ties on timestamps; returns its rows."""
    rng = random.Random(seed)
    rows: list[Row] = []
    for user in range(first_user, first_user + users):
        movies = rng.sample(range(1, 400), rng.randint(6, 14))  # distinct per user
        for movie in movies:
            ts = YEAR_2001 + rng.randrange(0, 30 * 86_400, 3600)  # hourly: ties happen
            rows.append((user, movie, rng.choice([1.0, 2.5, 3.5, 4.0, 4.5, 5.0]), ts))
    rng.shuffle(rows)
    lines = ["userId,movieId,rating,timestamp"] + [",".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return rows


def run_cli(
    *args: str, partitions: int = 8, login: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCE_")}
    env["AUDIENCE_PARTITIONS"] = str(partitions)
    env.update(login or {})  # AUDIENCE_NATS_USER etc.: the NATS login
    return subprocess.run(
        [AUDIENCE, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_replayed_ratings_show_in_every_users_profile(
    platform: Platform, api: httpx.Client, tmp_path: Path
) -> None:
    rows = write_ratings(tmp_path / "ratings.csv", first_user=900_001, users=30, seed=11)
    frame = read_ratings(tmp_path / "ratings.csv")

    report = asyncio.run(
        replay_history(
            platform.nats_url,
            platform.settings.partitions,
            frame,
            credentials=platform.credentials("producer"),
        )
    )
    assert (report.events, report.rejected) == (len(rows), 0)
    assert report.users == 30
    assert report.items == len({r[1] for r in rows})

    counts: dict[str, dict[str, int]] = {}
    last: dict[str, str] = {}
    for user, movie, rating, _ in sorted(rows, key=lambda r: (r[3], r[1])):  # protocol order
        per_type = counts.setdefault(str(user), {"like": 0, "page_view": 0})
        per_type["like" if rating >= 4.0 else "page_view"] += 1
        last[str(user)] = str(movie)

    def all_applied() -> bool:
        for user, want in counts.items():
            answer = api.get(f"/v1/users/{user}")
            if answer.status_code != 200:
                return False
            profile = answer.json()
            got = profile["counts"]
            if (got["like"], got["page_view"]) != (want["like"], want["page_view"]):
                return False
            if profile["recent_items"][0] != last[user]:  # newest first
                return False
        return True

    wait_until(all_applied, timeout_s=120)


def test_the_cli_replays_a_ratings_file_and_ends_with_a_summary(
    platform: Platform, api: httpx.Client, tmp_path: Path, nats_producer_env: dict[str, str]
) -> None:
    rows = write_ratings(tmp_path / "ratings.csv", first_user=910_001, users=5, seed=12)
    done = run_cli(
        "replay",
        *("--ratings", str(tmp_path / "ratings.csv"), "--holdout-last"),
        *("--nats-url", platform.nats_url),
        login=nats_producer_env,
    )
    assert done.returncode == 0, done.stderr
    match = SUMMARY.match(done.stdout.strip().splitlines()[-1])
    assert match is not None, done.stdout
    events, users, _, rejected = map(int, match.groups())
    assert (events, users, rejected) == (len(rows) - 5, 5, 0)  # one test item per user held out
    assert "100.0%" in done.stderr  # not a terminal: a progress line every 10%

    def applied() -> bool:
        answer = api.get("/v1/users/910001")
        return (
            answer.status_code == 200
            and answer.json()["events"] == sum(1 for r in rows if r[0] == 910_001) - 1
        )

    wait_until(applied, timeout_s=60)


def test_the_cli_fails_with_one_error_line_for_a_missing_file(
    platform: Platform, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-ratings.csv"
    done = run_cli("replay", "--ratings", str(missing), "--nats-url", platform.nats_url)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {missing}: no such file"], done.stderr
    assert "Traceback" not in done.stderr


def test_speed_paces_event_time_against_wall_time(platform: Platform, tmp_path: Path) -> None:
    lines = ["userId,movieId,rating,timestamp"]
    lines += [f"920001,{m},4.0,{YEAR_2001 + 2 * m}" for m in range(11)]  # 20 s of history
    (tmp_path / "ratings.csv").write_text("\n".join(lines) + "\n")
    frame = read_ratings(tmp_path / "ratings.csv")
    seen: list[int] = []

    report = asyncio.run(
        replay_history(
            platform.nats_url,
            platform.settings.partitions,
            frame,
            speed=40.0,  # 20 s of history in 0.5 s
            progress=lambda done, total: seen.append(done),
            credentials=platform.credentials("producer"),
        )
    )
    assert report.events == 11
    assert report.seconds >= 0.45
    assert seen[-1] == 11 and len(seen) > 1  # published in steps, not in one go


def test_training_history_can_be_read_back_from_the_stream(
    platform: Platform, tmp_path: Path
) -> None:

    path = tmp_path / "ratings.csv"
    rows = write_ratings(path, first_user=930_001, users=5, seed=9)
    frame = read_ratings(path)
    producer = platform.credentials("producer")
    asyncio.run(
        replay_history(platform.nats_url, platform.settings.partitions, frame, credentials=producer)
    )
    found = wait_until(lambda: _with_users(platform, frame["user_id"].nunique()))
    history = found[0]
    mine = history[history["event_id"].str.startswith("ml-93000")]
    assert len(mine) == len(rows)
    assert set(mine["event_id"]) == set(frame["event_id"])


def _with_users(platform: Platform, users: int):
    from cluster.train import stream_history

    admin = platform.credentials("admin")  # reading the stream takes the admin login
    history = asyncio.run(
        stream_history(platform.nats_url, platform.settings.stream, credentials=admin)
    )
    ids = history["user_id"]
    found = ids[ids.str.startswith("93000")].nunique()
    return (history,) if found == users else None


def test_training_history_from_the_stream_skips_bad_rows_and_repeated_event_ids(
    platform: Platform,
) -> None:
    from cluster.train import stream_history

    batch = random_batch(6, 1, seed=77, prefix="hist-bad-")
    batch.ts[:] = 1_700_000_000_000  # long before the shared platform's "now"
    batch.type[0] = 250  # an unknown type code, past the producer's checks
    again = batch.take([1, 2])  # the same event ids in another message

    async def publish() -> None:
        nc = await connect(platform.nats_url, platform.credentials("producer"))
        js = nc.jetstream()
        for body in (encode(batch), encode(again)):
            await js.publish(events_subject(partition_of("hist-bad-0", 8)), body)
        await nc.close()

    asyncio.run(publish())
    admin = platform.credentials("admin")  # reading the stream takes the admin login
    history = asyncio.run(
        stream_history(platform.nats_url, platform.settings.stream, credentials=admin)
    )
    mine = history[history["event_id"].str.startswith("hist-bad-")]
    assert sorted(mine["event_id"]) == sorted(batch.event_id[1:])
