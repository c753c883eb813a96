"""``make bench``: model-serving latency and throughput, against a bare FastAPI app.

One run: start the platform (embedded NATS, Ray, two shards, the Serve app with
the model deployments), train both models on simulated history and replay the
same history into the shards, so the benchmark users are live; then snapshot
those users' features and the merged item index from the shards and start the
reference, a bare FastAPI app under uvicorn (``tests/bench/bare_scoring_app.py``)
scoring the same model versions on that snapshot: model scoring plus HTTP, no
Ray Serve and no shard round trips. Both answer a sample of users the same
before anything is timed.

For each endpoint (``/v1/churn``, ``/v1/personalize``) and each server, after a
short warm-up: an open loop at ``--rate`` requests/s (latency from each
request's scheduled send time, so queueing counts), then a closed loop with
``--concurrency`` requests in flight (the most answers per second). The load
generator is a minimal keep-alive HTTP/1.1 client on uvloop, the same for both
servers.

In the same run, against the same platform:

- the floor of Ray Serve on this machine: a trivial deployment
  (``tests/bench/trivial_serve_app.py``, no key, no model) deployed into the
  platform's Serve and measured like the model endpoints; ``/v1/personalize``
  is judged against its p50;
- batch requests: one ``POST /v1/churn`` and one ``POST /v1/personalize`` for
  ``--batch-users`` users (1,000 by default), timed, while single GETs of the same
  endpoint go one after another (their p99: what a batch costs everyone else);
- the ``/v1/personalize`` open loop again while ``audience simulate``'s publisher
  (:func:`cluster.simulate.publish_simulation`, in a process of its own, signed in as
  the producer) writes ``--under-ingest-rate`` events/s of the same users into the
  stream, once the shards apply them steadily; with the freshness (JetStream store to
  applied by the shard, per message) of the messages applied during that run;
- HTTP ingest: ``POST /v1/events`` with ``--ingest-batch`` events per request and
  ``--ingest-concurrency`` requests in flight for ``--ingest-seconds``; the events
  accepted (202 answers only) per second. Last, since it changes the live users.

The platform's CPU per request (Ray and NATS, ``own_other``) is also given net of
an idle window: before each open and closed loop on the platform (model endpoints
and trivial app), the same processes' CPU over as long a time with no request.

Writes ``serving.json`` (with a flat ``summary`` of every target figure) and
``serving.md`` to ``--out``.

    .venv/bin/python -m tests.bench.serving --out bench-results

Each open and closed loop runs 30 s by default (p99 is then the 10th-worst of
3,000 requests at 100 rps); ``--quick`` runs them 10 s and 8 s, for a look.

``--smoke`` runs every step at a tiny size (a few seconds per server and endpoint,
see ``SMOKE``), so that ``make test`` can tell whether the bench still runs; its
figures mean nothing, but it exits 1 when a step did not run properly (see
``broken_steps``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import multiprocessing
import os
import pickle
import platform as host_platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from time import perf_counter
from typing import Any, TypeVar

import httpx
import numpy as np

from cluster.launcher import Platform, policy_of
from cluster.nats_server import free_port
from cluster.replay import replay_history
from cluster.settings import Settings
from cluster.simulate import publish_simulation
from cluster.train import simulated_history, train_and_register
from models.candidates import ItemIndex
from models.churn import KIND as CHURN
from models.examples import ITEM_TOP_N
from models.ranker import KIND as PERSONALIZATION
from models.registry import ModelRegistry
from models.scoring import CandidateLimits, propose
from models.training import ChurnPlan
from tests.bench.bare_scoring_app import SNAPSHOT_ENV, Snapshot
from tests.bench.machine import CpuMeter, wait_for_quiet
from tests.bench.phases import _percentiles, _Ring
from tests.bench.pipeline import versions as pipeline_versions
from tests.bench.report import _num, _verdict
from tests.bench.trivial_serve_app import ROUTE_PREFIX as TRIVIAL_PREFIX
from tests.bench.trivial_serve_app import deploy as deploy_trivial

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
KINDS = (CHURN, PERSONALIZATION)
TARGETS = {"p99_ms_at_rate": 25.0, "rate": 100.0, "max_rps": 500.0, "p50_vs_bare": 2.0}
ENDPOINTS = {  # name -> (platform path, bare path); {u} is the user id
    "churn": ("/v1/churn/{u}", "/churn/{u}"),
    "personalize": ("/v1/personalize/{u}?k=10", "/personalize/{u}?k=10"),
}
TRIVIAL_PATH = TRIVIAL_PREFIX + "/{u}"
BATCHES = {  # name -> (POST path, body besides the user ids)
    "churn": ("/v1/churn", {}),
    "personalize": ("/v1/personalize", {"k": 10}),
}
INGEST_TYPES = ("page_view", "click", "like", "add_to_cart")
# The targets, by key of the JSON's flat ``summary``: (comparison, bound). The
# figures at --rate and the batch ones keep their names whatever --rate and --batch-users.
GOALS: dict[str, tuple[str, float]] = {
    "churn_p99_ms_100rps": ("<=", 25.0),
    "personalize_p99_ms_100rps": ("<=", 25.0),
    "churn_max_rps": (">=", 500.0),
    "personalize_max_rps": (">=", 500.0),
    "personalize_p50_vs_trivial_serve": ("<=", 2.0),
    "personalize_batch_1000_s": ("<=", 1.5),
    "personalize_single_p99_ms_during_batch": ("<=", 50.0),
    "churn_batch_1000_s": ("<=", 1.5),
    "churn_single_p99_ms_during_batch": ("<=", 50.0),
    "http_ingest_events_per_s": (">=", 100_000.0),
    "personalize_p99_ms_100rps_under_ingest": ("<=", 50.0),
}
SERVERS = ("platform", "bare")
GRACE_S = 5.0  # open loop: how long unanswered requests may still come in after the last send
KEEP_ALIVE_S = 90  # idle keep-alive of the bare app: Ray Serve's proxy default
# Under ingest: the run starts once the shards apply STEADY_SHARE of the publish rate
# over a STEADY_EVERY_S interval, or after STEADY_WAIT_S (the publisher's process starts
# in a few seconds; a platform that never keeps up is measured anyway, and says so).
STEADY_SHARE, STEADY_EVERY_S, STEADY_WAIT_S = 0.9, 1.0, 30.0
FRESHNESS_EVERY_S = 0.5  # how often the shards' freshness rings are read (4,096 messages each)
# --smoke: the defaults it changes (options given explicitly still win). Enough
# simulated history for churn training to see churned and retained users; about a
# second per loop; Ray Data's groupby shuffles into few partitions (its default of
# 200 costs ~10 s per per-user pass on two cores, a fixed cost at any size).
SMOKE: dict[str, Any] = {
    "users": 150,
    "days": 8.0,
    "rate": 20.0,
    "open_seconds": 1.5,
    "concurrency": 4,
    "closed_seconds": 1.0,
    "warmup_seconds": 0.3,
    "check_users": 5,
    "quiet_wait": 0.0,
    "shuffle_partitions": 2,
    "batch_users": 50,
    "ingest_seconds": 1.0,
    "under_ingest_rate": 2000.0,
}
# --quick: shorter loops than the default 30 s, for a developer's look (p99 from fewer requests).
QUICK: dict[str, Any] = {"open_seconds": 10.0, "closed_seconds": 8.0, "ingest_seconds": 5.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny run of every step, seconds per measurement (make test runs it)",
    )
    p.add_argument(
        "--quick", action="store_true", help="shorter loops (10 s open, 8 s closed, 5 s ingest)"
    )
    p.add_argument("--out", "--out-dir", dest="out", type=Path, default=Path("bench-results"))
    p.add_argument("--users", type=int, default=1500, help="simulated users (train and replay)")
    p.add_argument("--days", type=float, default=30.0, help="days of simulated history")
    p.add_argument("--rate", type=float, default=TARGETS["rate"], help="open loop requests/s")
    p.add_argument("--open-seconds", type=float, default=30.0)
    p.add_argument("--concurrency", type=int, default=32, help="closed loop requests in flight")
    p.add_argument("--closed-seconds", type=float, default=30.0)
    p.add_argument(
        "--warmup-seconds",
        type=float,
        default=2.0,
        help="one request at a time before the runs (its latency is reported as unloaded)",
    )
    p.add_argument("--check-users", type=int, default=20, help="users whose answers are compared")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=5.0,
        help="most seconds to wait, before each server's runs, for other processes to calm down",
    )
    p.add_argument(
        "--shuffle-partitions",
        type=int,
        default=0,
        help="Ray Data hash-shuffle partitions for training (0: Ray Data's default)",
    )
    p.add_argument(
        "--batch-users",
        type=int,
        default=1000,
        help="user ids in the one timed POST /v1/churn and /v1/personalize (live users, repeated "
        "if fewer)",
    )
    p.add_argument("--ingest-seconds", type=float, default=10.0, help="HTTP ingest run")
    p.add_argument("--ingest-batch", type=int, default=500, help="events per POST /v1/events")
    p.add_argument("--ingest-concurrency", type=int, default=8, help="ingest requests in flight")
    p.add_argument(
        "--under-ingest-rate",
        type=float,
        default=20_000.0,
        help="events/s `audience simulate` publishes during the repeated personalize open loop",
    )
    first = p.parse_args(argv)
    if first.quick:
        p.set_defaults(**QUICK)
    if first.smoke:  # after --quick: smoke sizes win
        p.set_defaults(**SMOKE)
    return p.parse_args(argv)


# -- readiness -------------------------------------------------------------------------


def poll(check: Callable[[], T | None], what: str, timeout_s: float, every_s: float = 0.25) -> T:
    """Call ``check`` until it returns something; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            found = check()
            if found:
                return found
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g} s (last error: {last_error!r})")
        time.sleep(every_s)


def applied_events(client: httpx.Client) -> int:
    status = client.get("/v1/status", timeout=10).raise_for_status().json()
    return sum(int(s["applied_events"]) for s in status["shards"])


def models_ready(client: httpx.Client, want: dict[str, str], applied_at: float) -> dict | None:
    """``/v1/models`` once both kinds serve the trained versions and the item index was
    merged after the last replayed event was applied (so it is the snapshot's index)."""
    models = client.get("/v1/models", timeout=10).raise_for_status().json()
    served = {kind: models[kind]["served"] or {} for kind in KINDS}
    if any(served[kind].get("version") != want[kind] for kind in KINDS):
        return None
    person = served[PERSONALIZATION]
    age = person.get("index_age_s")
    if not person.get("items_indexed") or age is None or age > time.time() - applied_at - 0.2:
        return None
    return models


# -- features snapshot for the bare app ------------------------------------------------


async def take_snapshot(
    platform: Platform, users: list[str], registry: Path, want: dict[str, str]
) -> Snapshot:
    """Rows of ``users``, the merged item index and each user's seen candidates, as the
    Serve deployments would fetch them (the same pool calls)."""
    pool = platform.pool
    assert pool is not None
    rows = await pool.user_rows(users)
    # As the Personalizer merges them: one partial per partition, in the pool's order.
    partials = await pool.item_partials(ITEM_TOP_N)
    index = ItemIndex.merge([p for p in partials.values() if p is not None])
    limits = CandidateLimits()
    held = [i for i in range(len(users)) if rows.held[i]]
    proposed = {i: list(propose(index, rows, i, limits)) for i in held}
    flags = await pool.seen([(users[i], proposed[i]) for i in held])
    seen = {
        users[i]: {c for c, s in zip(proposed[i], f, strict=True) if s}
        for i, f in zip(held, flags, strict=True)
    }
    rows = rows.take(held)
    return Snapshot(str(registry), dict(want), rows, index, seen, limits)


def start_bare(snapshot_path: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.bench.bare_scoring_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--log-level",
        "warning",
        "--no-access-log",
        "--timeout-keep-alive",
        str(KEEP_ALIVE_S),
    ]
    env = os.environ | {SNAPSHOT_ENV: str(snapshot_path)}
    # As Ray does for the Serve replicas (num_cpus 0.25 -> OMP_NUM_THREADS=1 unless set):
    # LightGBM then predicts on one thread, with no OpenMP threads spinning between requests.
    env.setdefault("OMP_NUM_THREADS", "1")
    with log_path.open("wb") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def compare_answers(
    platform_url: str,
    bare_url: str,
    users: Sequence[str],
    headers: dict[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Both servers' whole answers for ``users`` (scores, reasons, features): equal or not."""
    out: dict[str, dict[str, Any]] = {}
    platform_client = httpx.Client(base_url=platform_url, headers=headers)
    with platform_client as p, httpx.Client(base_url=bare_url) as b:
        for name, (ours_path, ref_path) in ENDPOINTS.items():
            same, differ = 0, []
            for u in users:
                ours = p.get(ours_path.format(u=u), timeout=30)
                ref = b.get(ref_path.format(u=u), timeout=30)
                if ours.status_code == ref.status_code == 200 and ours.json() == ref.json():
                    same += 1
                else:
                    differ.append(u)
            out[name] = {"users": len(users), "same_answer": same, "differ": differ[:5]}
    return out


# -- load generation -------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection for prepared requests; minimal parsing (cheap per
    request)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.closed = False

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def get(self, request: bytes) -> int:
        """Send a prepared request; read the whole answer; return its status."""
        status, _ = await self.fetch(request)
        return status

    async def fetch(self, request: bytes) -> tuple[int, bytes]:
        """Send a prepared request (a GET, or a POST with its body); its status and body."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at >= 0:
            end = lower.index(b"\r\n", at + 2)
            body = await self.reader.readexactly(int(lower[at + 17 : end]))
        elif b"\r\ntransfer-encoding: chunked" in lower:
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunks.append((await self.reader.readexactly(size + 2))[:-2])
                if size == 0:
                    break
            body = b"".join(chunks)
        else:
            body = await self.reader.read()
            self.close()
        if b"\r\nconnection: close" in lower:
            self.close()
        return status, body

    def close(self) -> None:
        self.closed = True
        self.writer.close()


def requests_for(path: str, users: Sequence[str], api_key: str = "") -> list[bytes]:
    """Prepared GETs; with the platform's API key (sent to both servers, so they cost the same)."""
    key = f"X-API-Key: {api_key}\r\n" if api_key else ""
    return [
        f"GET {path.format(u=u)} HTTP/1.1\r\nHost: 127.0.0.1\r\n{key}\r\n".encode() for u in users
    ]


def summary(latencies_s: list[float], errors: Counter[str], seconds: float) -> dict[str, Any]:
    ms = np.asarray(latencies_s) * 1000
    p50, p90, p99 = np.percentile(ms, [50, 90, 99]).tolist() if ms.size else (None,) * 3
    failed = sum(errors.values())
    return {
        "requests": len(latencies_s),
        "ok": len(latencies_s) - failed,
        "errors": failed,
        "error_kinds": dict(errors),
        "seconds": round(seconds, 3),
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "max_ms": float(ms.max()) if ms.size else None,
        "mean_ms": float(ms.mean()) if ms.size else None,
    }


async def open_loop(
    port: int, requests: Sequence[bytes], rate: float, seconds: float, seed: int
) -> dict[str, Any]:
    """``rate`` requests/s on schedule whatever the answers do; latency from the schedule.

    A request still unanswered ``GRACE_S`` after the last send counts as an error, with
    the time it had waited (a lower bound), so an overloaded server cannot stall the run.
    """
    rng = random.Random(seed)
    picks = [rng.choice(requests) for _ in range(round(rate * seconds))]
    idle = [await Connection.open(port) for _ in range(8)]
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    stale = 0

    async def send(request: bytes) -> int:
        nonlocal stale
        conn = idle.pop() if idle else None
        if conn is not None:
            try:
                status = await conn.get(request)
            except (ConnectionError, asyncio.IncompleteReadError):
                conn.close()  # closed by the server while idle: send again on a new one
                stale += 1
            else:
                if not conn.closed:
                    idle.append(conn)
                return status
        conn = await Connection.open(port)
        try:
            status = await conn.get(request)
        except BaseException:
            conn.close()
            raise
        if not conn.closed:
            idle.append(conn)
        return status

    async def one(due: float, request: bytes) -> None:
        try:
            status: int | str = await send(request)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            status = type(exc).__name__
        latencies.append(perf_counter() - due)
        if status != 200:
            errors[str(status)] += 1

    start = perf_counter() + 0.05
    tasks: dict[asyncio.Task[None], float] = {}
    for i, request in enumerate(picks):
        due = start + i / rate
        delay = due - perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks[asyncio.create_task(one(due, request))] = due
    sent = perf_counter() - start
    _, pending = await asyncio.wait(tasks, timeout=GRACE_S)
    for task in pending:
        task.cancel()
        errors[f"unanswered_after_{GRACE_S:g}s"] += 1
        latencies.append(perf_counter() - tasks[task])
    for conn in idle:
        conn.close()
    out = summary(latencies, errors, perf_counter() - start)
    out["target_rate"] = rate
    out["send_rate"] = round(len(picks) / sent, 1) if sent > 0 else None
    out["stale_connection_retries"] = stale
    return out


async def closed_loop(
    port: int, requests: Sequence[bytes], concurrency: int, seconds: float, seed: int
) -> dict[str, Any]:
    """``concurrency`` clients, each sending its next request when the last one is answered."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    conns = [await Connection.open(port) for _ in range(concurrency)]
    start = perf_counter()
    stop_at = start + seconds

    async def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        conn = conns[k]
        while perf_counter() < stop_at:
            request = rng.choice(requests)
            sent = perf_counter()
            try:
                status = await conn.get(request)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                errors[type(exc).__name__] += 1
                latencies.append(perf_counter() - sent)
                conn.close()
                conn = await Connection.open(port)
                continue
            latencies.append(perf_counter() - sent)
            if status != 200:
                errors[str(status)] += 1
            if conn.closed:
                conn = await Connection.open(port)
        conn.close()

    await asyncio.wait_for(asyncio.gather(*(client(k) for k in range(concurrency))), seconds + 60)
    out = summary(latencies, errors, perf_counter() - start)
    out["concurrency"] = concurrency
    out["rps"] = out["ok"] / out["seconds"] if out["seconds"] else 0.0
    return out


async def batch_during_singles(
    port: int,
    path: str,
    body: dict[str, Any],
    singles: Sequence[bytes],
    api_key: str,
    seed: int,
) -> dict[str, Any]:
    """One timed ``POST path`` of ``body`` while single GETs go one after another.

    The singles' latency is what the batch costs everyone else (the deployments answer
    a batch in chunks, so single requests keep being answered meanwhile). A small batch
    first, untimed, opens the connection and warms the route. The answer must hold one
    result per user id and no ``error`` result.
    """
    headers = {"Content-Type": "application/json"} | ({"X-API-Key": api_key} if api_key else {})
    users = list(body["user_ids"])
    warm = json.dumps(body | {"user_ids": users[:10]}).encode()
    payload = json.dumps(body).encode()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    done = asyncio.Event()

    async def one_after_another() -> float:
        """Singles until the batch is answered (at least one); returns how long they ran."""
        rng = random.Random(seed)
        conn = await Connection.open(port)
        start = perf_counter()
        while True:
            sent = perf_counter()
            try:
                status = await conn.get(rng.choice(singles))
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                errors[type(exc).__name__] += 1
                conn.close()
                status = 0
            latencies.append(perf_counter() - sent)
            if status and status != 200:
                errors[str(status)] += 1
            if done.is_set():
                break
            if conn.closed:
                conn = await Connection.open(port)
        conn.close()
        return perf_counter() - start

    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
        (await client.post(path, content=warm)).raise_for_status()
        singles_task = asyncio.create_task(one_after_another())
        started = perf_counter()
        answer = await client.post(path, content=payload)
        took = perf_counter() - started
        done.set()
        singles_ran = await singles_task
    results = answer.json().get("results", []) if answer.status_code == 200 else []
    failed = Counter(str(r["error"]) for r in results if "error" in r)
    return {
        "users": len(users),
        "distinct_users": len(set(users)),
        "status": answer.status_code,
        "seconds": took,
        "results": len(results),
        "result_errors": dict(failed),
        "complete": answer.status_code == 200 and len(results) == len(users) and not failed,
        "detail": None if answer.status_code == 200 else answer.text[:300],
        "singles": summary(latencies, errors, singles_ran),
    }


def batch_users(users: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` live users at random, each once while there are enough, then repeated."""
    rng = random.Random(seed)
    picked = rng.sample(list(users), min(n, len(users)))
    while len(picked) < n:
        picked += rng.sample(list(users), min(n - len(picked), len(users)))
    return picked


MARK = b"@REQ@"  # where each ingest request writes its number: event ids unique over the run


def ingest_template(users: Sequence[str], events: int, seed: int) -> bytes:
    """One ``POST /v1/events`` body: ``events`` valid events of the live users (as the
    contract has it: unique ``event_id``, ``user_id``, ``type``, RFC 3339 ``ts`` with a
    timezone), over the last minute; ``MARK`` in each event id."""
    rng = random.Random(seed)
    now_ms = time.time_ns() // 1_000_000
    out = []
    for i in range(events):
        at = datetime.fromtimestamp((now_ms - 60_000 + i * 60_000 // events) / 1000, timezone.utc)
        out.append(
            {
                "event_id": f"bench-ingest-{MARK.decode()}-{i}",
                "user_id": rng.choice(users),
                "type": rng.choice(INGEST_TYPES),
                "ts": at.isoformat(timespec="milliseconds"),
                "item_id": f"item-{rng.randrange(500)}",
                "category": f"cat-{rng.randrange(12)}",
            }
        )
    return json.dumps(out).encode()


async def http_ingest(
    port: int, template: bytes, api_key: str, concurrency: int, seconds: float
) -> dict[str, Any]:
    """``concurrency`` clients posting ``template`` (numbered) back to back for ``seconds``.

    Only 202 answers count, with the events their answer says were accepted (durably in
    the stream). A 429 or 503 (the producer full, NATS away) makes that client pause
    50 ms, as a well-behaved producer would, rather than spin.
    """
    key = f"X-API-Key: {api_key}\r\n" if api_key else ""
    length = len(template.replace(MARK, b"%08d" % 0))  # the same for every request number
    head = (
        f"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n{key}"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()
    numbers = itertools.count()
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    accepted = 0
    conns = [await Connection.open(port) for _ in range(concurrency)]
    start = perf_counter()
    stop_at = start + seconds

    async def client(k: int) -> None:
        nonlocal accepted
        conn = conns[k]
        while perf_counter() < stop_at:
            request = head + template.replace(MARK, b"%08d" % next(numbers))
            sent = perf_counter()
            try:
                status, answer = await conn.fetch(request)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                statuses[type(exc).__name__] += 1
                conn.close()
                conn = await Connection.open(port)
                continue
            latencies.append(perf_counter() - sent)
            statuses[str(status)] += 1
            if status == 202:
                accepted += int(json.loads(answer)["accepted"])
            elif status in (429, 503):
                await asyncio.sleep(0.05)
            if conn.closed:
                conn = await Connection.open(port)
        conn.close()

    await asyncio.wait_for(asyncio.gather(*(client(k) for k in range(concurrency))), seconds + 120)
    took = perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {
        "requests": sum(statuses.values()),
        "events_per_request": template.count(MARK),
        "concurrency": concurrency,
        "seconds": round(took, 3),
        "statuses": dict(statuses),
        "accepted_events": accepted,
        "events_per_s": accepted / took if took > 0 else 0.0,
        "request_p50_ms": float(np.percentile(ms, 50)) if ms.size else None,
        "request_p99_ms": float(np.percentile(ms, 99)) if ms.size else None,
    }


def run_async(coro: Awaitable[T]) -> T:
    """Run the load generator on uvloop when it is installed (less client CPU per request)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


async def idle_window(meter: CpuMeter, seconds: float) -> dict[str, float]:
    """The CPU of the metered processes over ``seconds`` with no request: what a run's
    CPU is taken net of (Ray's and NATS's own timers, health checks, metrics)."""
    meter.start()
    await asyncio.sleep(seconds)
    return meter.stop()


def measure(
    port: int,
    requests: Sequence[bytes],
    args: argparse.Namespace,
    pids: dict[str, int],
    idle: bool = False,
) -> dict[str, Any]:
    """Warm-up (one request at a time, kept as the unloaded latency), open loop, closed loop;
    with ``idle``, each loop just after an idle window of its length (``idle_cpu_s``)."""

    async def go() -> dict[str, Any]:
        sequential = await closed_loop(port, requests, 1, args.warmup_seconds, args.seed + 99)
        meter = CpuMeter(pids)
        idle_open = await idle_window(meter, args.open_seconds) if idle else None
        meter.start()
        opened = await open_loop(port, requests, args.rate, args.open_seconds, args.seed)
        opened["cpu_s"], opened["idle_cpu_s"] = meter.stop(), idle_open
        idle_closed = await idle_window(meter, args.closed_seconds) if idle else None
        meter.start()
        closed = await closed_loop(port, requests, args.concurrency, args.closed_seconds, args.seed)
        closed["cpu_s"], closed["idle_cpu_s"] = meter.stop(), idle_closed
        return {"sequential": sequential, "open_loop": opened, "closed_loop": closed}

    return run_async(go())


def net_cpu_ms_per_request(run: dict[str, Any], who: str) -> float | None:
    """``who``'s CPU ms per request of a run, less what it used in the idle window before.

    The window is as long as the run's schedule, but the run lasts a little longer (its
    last answers): the idle CPU is scaled to the run's wall time. None without a window.
    """
    idle = run.get("idle_cpu_s")
    if not idle or not idle["wall_s"] or not run["requests"]:
        return None
    net = run["cpu_s"][who] - idle[who] * run["cpu_s"]["wall_s"] / idle["wall_s"]
    return net * 1000 / run["requests"]


# -- report ----------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return _num(value, 1)


def _errors(phase: dict[str, Any]) -> str:
    if not phase["errors"]:
        return "0 errors"
    return f"**{phase['errors']} errors** {phase['error_kinds']}"


def _overloaded(phase: dict[str, Any]) -> str:
    return f", the platform not keeping up ({phase['errors']} errors)" if phase["errors"] else ""


def _ratio(ours: float | None, ref: float | None) -> str:
    return f" ({ours / ref:.2f}x)" if ours and ref else ""


def _foreign(phase: dict[str, Any]) -> str:
    """CPU that processes outside the benchmark used meanwhile (a busy neighbour)."""
    cpu = phase["cpu_s"]
    return f"other processes {cpu['foreign']:.1f} CPU s in {cpu['wall_s']:.0f} s"


def _cpu(phase: dict[str, Any]) -> str:
    """CPU ms per request, and net of the idle window before the run when there was one."""
    net = phase.get("server_cpu_ms_per_request_net_of_idle")
    idle = "" if net is None else f" ({_ms(net)} net of an idle window as long)"
    return f"{_ms(phase['server_cpu_ms_per_request'])} ms per request{idle}"


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(metric, value, target, pass/fail, notes) for the Markdown table."""
    out = []
    rate, conc = r["args"]["rate"], r["args"]["concurrency"]
    for name, (path, bare_path) in ENDPOINTS.items():
        e = r["endpoints"][name]
        po, pc = e["platform"]["open_loop"], e["platform"]["closed_loop"]
        bo, bc = e["bare"]["open_loop"], e["bare"]["closed_loop"]
        ps, bs = e["platform"]["sequential"], e["bare"]["sequential"]
        route = path.split("{")[0] + "{user}"
        p99_ok = po["p99_ms"] is not None and po["p99_ms"] <= TARGETS["p99_ms_at_rate"]
        out.append(
            (
                f"{route} p50 / p99 ms at {rate:g} rps",
                f"{_ms(po['p50_ms'])} / {_ms(po['p99_ms'])}",
                f"p99 <= {TARGETS['p99_ms_at_rate']:g}",
                _verdict(p99_ok and not po["errors"]),
                f"open loop, {po['requests']:,} requests in {po['seconds']:.1f} s "
                f"(latency from the scheduled send); max {_ms(po['max_ms'])} ms; {_errors(po)}; "
                f"platform CPU {_cpu(po)}; {_foreign(po)}",
            )
        )
        out.append(
            (
                f"{route} max rps",
                _num(pc["rps"]),
                f">= {TARGETS['max_rps']:g}",
                _verdict(pc["rps"] >= TARGETS["max_rps"] and not pc["errors"]),
                f"closed loop, {conc} in flight, {pc['seconds']:.1f} s; p50 / p99 "
                f"{_ms(pc['p50_ms'])} / {_ms(pc['p99_ms'])} ms; {_errors(pc)}; platform "
                f"CPU {_cpu(pc)} (bare app {_ms(bc['server_cpu_ms_per_request'])}); "
                f"{_foreign(pc)}",
            )
        )
        ratio = e["p50_ratio"]
        out.append(
            (
                f"{route} p50 / bare app p50",
                "n/a" if ratio is None else f"{ratio:.2f}x",
                f"<= {TARGETS['p50_vs_bare']:g}x",
                _verdict(None if ratio is None else ratio <= TARGETS["p50_vs_bare"]),
                f"at {rate:g} rps: {_ms(po['p50_ms'])} ms vs {_ms(bo['p50_ms'])} ms "
                f"(bare GET {bare_path.split('{')[0]}{{user}}){_overloaded(po)}; unloaded "
                f"(1 in flight, warm-up): {_ms(ps['p50_ms'])} vs {_ms(bs['p50_ms'])} ms"
                f"{_ratio(ps['p50_ms'], bs['p50_ms'])}",
            )
        )
        out.append(
            (
                f"bare {bare_path.split('{')[0]}{{user}} (reference)",
                f"{_ms(bo['p50_ms'])} / {_ms(bo['p99_ms'])} ms; {_num(bc['rps'])} rps",
                "",
                "",
                f"p50 / p99 at {rate:g} rps ({_errors(bo)}, max {_ms(bo['max_ms'])} ms, "
                f"{_foreign(bo)}); "
                f"max rps closed loop {conc} in flight (p50 / p99 {_ms(bc['p50_ms'])} / "
                f"{_ms(bc['p99_ms'])} ms, {_errors(bc)})",
            )
        )
    return (
        out
        + trivial_rows(r)
        + batch_rows(r)
        + under_ingest_rows(r)
        + ingest_rows(r)
        + answers_rows(r)
    )


def goal(key: str) -> str:
    op, bound = GOALS[key]
    return f"{op} {bound:,g}"


def meets(key: str, value: float | None) -> bool | None:
    """Whether ``value`` meets the target of summary key ``key`` (None: not measured)."""
    if value is None:
        return None
    op, bound = GOALS[key]
    return value <= bound if op == "<=" else value >= bound


def trivial_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """``/v1/personalize`` against Serve's floor, and the floor itself."""
    rate, conc, s = r["args"]["rate"], r["args"]["concurrency"], r["summary"]
    t = r["endpoints"]["trivial"]["serve"]
    to, tc, po = t["open_loop"], t["closed_loop"], r["endpoints"]["personalize"]["platform"]
    key, ratio = "personalize_p50_vs_trivial_serve", s["personalize_p50_vs_trivial_serve"]
    route = TRIVIAL_PREFIX + "/{user}"
    return [
        (
            "/v1/personalize/{user} p50 / trivial Serve p50",
            "n/a" if ratio is None else f"{ratio:.2f}x",
            goal(key) + "x",
            _verdict(meets(key, ratio)),
            f"at {rate:g} rps: {_ms(s['personalize_p50_ms_100rps'])} ms vs "
            f"{_ms(s['trivial_serve_p50_ms_100rps'])} ms (GET {route}, a Serve deployment "
            f"doing nothing: Serve's floor here){_overloaded(po['open_loop'])}",
        ),
        (
            f"trivial Serve GET {route} (floor)",
            f"{_ms(to['p50_ms'])} / {_ms(to['p99_ms'])} ms; {_num(tc['rps'])} rps",
            "",
            "",
            f"p50 / p99 at {rate:g} rps ({_errors(to)}, max {_ms(to['max_ms'])} ms, "
            f"{_foreign(to)}); max rps closed loop {conc} in flight (p50 / p99 "
            f"{_ms(tc['p50_ms'])} / {_ms(tc['p99_ms'])} ms, {_errors(tc)}); Ray CPU "
            f"{_cpu(tc)} closed loop, {_cpu(to)} at {rate:g} rps",
        ),
    ]


def batch_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Per model endpoint: the batch's wall time, and the singles' p99 meanwhile."""
    out = []
    for name, (path, _) in BATCHES.items():
        b, s = r["batches"][name], r["batches"][name]["singles"]
        time_key, p99_key = f"{name}_batch_1000_s", f"{name}_single_p99_ms_during_batch"
        seconds, p99 = r["summary"][time_key], r["summary"][p99_key]
        problem = "" if b["complete"] else f"**incomplete answer** (status {b['status']}"
        problem += f", {b['detail']})" if b["detail"] else (")" if problem else "")
        out.append(
            (
                f"POST {path} {b['users']:,} users, s",
                _num(seconds, 2),
                goal(time_key),
                _verdict(meets(time_key, seconds) if b["complete"] else False),
                f"{problem}{b['results']:,}/{b['users']:,} results ({b['distinct_users']:,} "
                f"distinct users), error results {b['result_errors'] or 0}; one request, "
                f"wall time at the client ({b['seconds']:.3f} s)",
            )
        )
        out.append(
            (
                f"{ENDPOINTS[name][0].split('{')[0]}{{user}} p99 ms during the batch",
                _ms(p99),
                goal(p99_key),
                _verdict(meets(p99_key, p99) and not s["errors"]),
                f"{s['requests']} single requests one after another while the batch ran; "
                f"p50 {_ms(s['p50_ms'])} ms, max {_ms(s['max_ms'])} ms; {_errors(s)}",
            )
        )
    return out


def under_ingest_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """``/v1/personalize`` at ``--rate`` while ``audience simulate`` publishes, and the
    freshness of the same window."""
    u, key, s = r["under_ingest"], "personalize_p99_ms_100rps_under_ingest", r["summary"]
    rate, pub, ramp = r["args"]["rate"], u["publisher"], u["ramp"]
    fresh, f = u["freshness"], u["freshness"]["store_to_applied_ms"]
    target = f"{u['target_events_per_s']:,.0f} events/s"
    published = (
        f"**publisher failed**: {str(pub['error'])[-300:]}"
        if pub.get("error")
        else f"{pub['events']:,} events in {pub['seconds']:.1f} s ({pub['rejected']} rejected)"
    )
    steady = "" if ramp["steady"] else "**not steady**: "
    return [
        (
            f"/v1/personalize/{{user}} p50 / p99 ms at {rate:g} rps, {target} ingest",
            f"{_ms(u['p50_ms'])} / {_ms(u['p99_ms'])}",
            goal(key),
            _verdict(meets(key, s[key]) and not u["errors"]),
            f"open loop, {u['requests']:,} requests in {u['seconds']:.1f} s; max "
            f"{_ms(u['max_ms'])} ms; {_errors(u)}; while `audience simulate` published "
            f"{_num(s['under_ingest_published_events_per_s'])} events/s of {target} "
            f"({published}; own process, the benchmark's users); {steady}started once the "
            f"shards applied {ramp['applied_per_s_last']:,.0f} events/s (after "
            f"{ramp['waited_s']:g} s), {_num(u['applied_events_per_s'])} events/s applied in "
            f"the run; Ray/NATS CPU {u['cpu_s']['own_other']:.1f} s, publisher "
            f"{u['cpu_s']['publisher']:.1f} s; {_foreign(u)}",
        ),
        (
            f"freshness p99 ms during that run ({target})",
            _ms(f["p99"]),
            "",
            "",
            f"JetStream store -> applied by the shard, per message, the {fresh['messages']:,} "
            f"messages applied during the run ({fresh['samples_lost']} not sampled); p50 "
            f"{_ms(f['p50'])} ms, max {_ms(f['max'])} ms; the producer's send -> store "
            "leg is not in it",
        ),
    ]


def ingest_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    ing, key = r["ingest"], "http_ingest_events_per_s"
    return [
        (
            "POST /v1/events events/s",
            _num(ing["events_per_s"]),
            goal(key),
            _verdict(meets(key, ing["events_per_s"])),
            f"{ing['events_per_request']} events per request, {ing['concurrency']} in flight, "
            f"{ing['seconds']:.1f} s; {ing['accepted_events']:,} events accepted (202 answers "
            f"only, durably in the stream); statuses {ing['statuses']}; request p50 / p99 "
            f"{_ms(ing['request_p50_ms'])} / {_ms(ing['request_p99_ms'])} ms; Ray/NATS CPU "
            f"{ing['cpu_s']['own_other']:.1f} s, load client {ing['cpu_s']['bench_client']:.1f} s,"
            f" {_foreign(ing)}",
        )
    ]


def answers_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    check = r["answers_match"]
    return [
        (
            "answers equal to the bare app's",
            ", ".join(f"{n} {c['same_answer']}/{c['users']}" for n, c in check.items()),
            "all",
            _verdict(r["summary"]["answers_match_bare"]),
            "whole JSON (scores, reasons, features) of the compared users, both endpoints"
            + "".join(f"; {n} differ: {c['differ']}" for n, c in check.items() if c["differ"]),
        )
    ]


def markdown(r: dict[str, Any]) -> str:
    """The results table, then a line on the setup and one on the machine."""
    lines = ["| metric | value | target | pass/fail | notes |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows(r)]
    s, m, check = r["setup"], r["machine"], r["answers_match"]
    lines.append("")
    lines.append(
        f"Setup: {s['users']:,} simulated users x {s['days']:g} days ({s['events']:,} events) "
        f"trained {CHURN} {s['versions'][CHURN]} and {PERSONALIZATION} "
        f"{s['versions'][PERSONALIZATION]} and replayed into {s['shards']} shards "
        f"(P={s['partitions']}); {s['benchmark_users']:,} live users requested at random; "
        f"{s['items_indexed']:,} items indexed. Identical answers from both servers "
        f"(whole JSON: scores, reasons, features): churn {check['churn']['same_answer']}/"
        f"{check['churn']['users']}, personalize {check['personalize']['same_answer']}/"
        f"{check['personalize']['users']} users. "
        "The bare app is one uvicorn worker scoring one user per request from a snapshot "
        "of the same features (no Ray Serve, no shard calls)."
    )
    lines.append("")
    lines.append(
        f"Machine: {m['cpus']} CPUs, {m['platform']}; Python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
        + f"; other processes' CPU share before the runs {m['background_busy']}. "
        f"Total run {r['total_s']:.0f} s."
    )
    if r.get("smoke"):
        lines.append("")
        lines.append("Smoke run (--smoke): every step at a tiny size; the figures mean nothing.")
    return "\n".join(lines) + "\n"


def write(r: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``serving.json`` and ``serving.md``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "serving.json", out_dir / "serving.md"
    json_path.write_text(json.dumps(r, indent=2, default=str) + "\n")
    md_path.write_text(markdown(r))
    return json_path, md_path


def versions() -> dict[str, str]:
    out = pipeline_versions()
    for name in ("fastapi", "uvicorn", "lightgbm"):
        with contextlib.suppress(Exception):
            out[name] = version(name)
    return out


# -- the run ---------------------------------------------------------------------------


@dataclass
class Prepared:
    """What the measurements need from the setup."""

    platform_port: int
    bare_port: int
    bare_pid: int
    users: list[str]
    setup: dict[str, Any]
    answers_match: dict[str, Any]
    api_key: str = ""


def prepare(
    args: argparse.Namespace, platform: Platform, tmp: Path, bare: list[subprocess.Popen[bytes]]
) -> Prepared:
    """Platform up, models trained and live users replayed, snapshot taken, bare app up."""
    settings = platform.settings
    t0 = time.perf_counter()
    info = platform.start()
    timings = {"platform_start_s": time.perf_counter() - t0}
    print(f"  platform up at {info.http_url} in {timings['platform_start_s']:.1f} s", flush=True)
    key_file = platform.admin_key_file
    api_key = key_file.read_text().strip() if key_file else ""
    headers = {"X-API-Key": api_key} if api_key else {}

    if args.shuffle_partitions:
        import ray.data  # the driver's DataContext goes with the training's Ray Data jobs

        ray.data.DataContext.get_current().default_hash_shuffle_parallelism = (
            args.shuffle_partitions
        )
    t = time.perf_counter()
    end_ms = time.time_ns() // 1_000_000
    frame = simulated_history(args.users, args.days, args.seed, end_ms)
    registry = ModelRegistry(settings.registry_path)
    trained = train_and_register(
        frame, registry, plan=ChurnPlan(horizon_days=3), ranker_labels=2, seed=args.seed
    )
    timings["train_s"] = time.perf_counter() - t
    print(
        f"  trained {trained.versions} on {len(frame):,} events in {timings['train_s']:.1f} s",
        flush=True,
    )

    t = time.perf_counter()
    replay = asyncio.run(
        replay_history(
            info.nats_url,
            settings.partitions,
            frame,
            policy=policy_of(settings),
            credentials=platform.credentials("producer"),  # NATS logins are on, as `audience up`
        )
    )
    client = httpx.Client(base_url=info.http_url, headers=headers)
    with client:
        poll(
            lambda: applied_events(client) >= replay.events,
            f"shards applying {replay.events} replayed events",
            120,
        )
        applied_at = time.time()
        timings["replay_and_apply_s"] = time.perf_counter() - t
        print(f"  {replay.summary()}; applied in {timings['replay_and_apply_s']:.1f} s")
        t = time.perf_counter()
        models = poll(
            lambda: models_ready(client, trained.versions, applied_at),
            "models served and item index merged",
            120,
        )
        timings["models_ready_s"] = time.perf_counter() - t

    users = sorted(frame["user_id"].unique().tolist())
    snapshot = asyncio.run(take_snapshot(platform, users, settings.registry_path, trained.versions))
    live = snapshot.rows.user_ids
    snap_path = tmp / "bare-snapshot.pickle"
    snap_path.write_bytes(pickle.dumps(snapshot, protocol=pickle.HIGHEST_PROTOCOL))
    port = free_port()
    t = time.perf_counter()
    bare.append(start_bare(snap_path, port, tmp / "bare-app.log"))
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:

        def bare_up() -> bool:
            if bare[0].poll() is not None:
                log = (tmp / "bare-app.log").read_text()[-2000:]
                raise RuntimeError(f"the bare app exited ({bare[0].returncode}): {log}")
            return c.get("/healthz", timeout=2).status_code == 200

        poll(bare_up, "bare app answering /healthz", 60)
    timings["bare_start_s"] = time.perf_counter() - t
    print(f"  bare app (pid {bare[0].pid}) up in {timings['bare_start_s']:.1f} s", flush=True)

    # The floor of Serve: into the platform's running Ray and Serve (same proxy and port).
    t = time.perf_counter()
    deploy_trivial()
    with httpx.Client(base_url=info.http_url) as c:
        trivial = TRIVIAL_PATH.format(u="anyone")
        poll(lambda: c.get(trivial, timeout=2).status_code == 200, "trivial Serve app", 60)
    timings["trivial_start_s"] = time.perf_counter() - t
    print(f"  trivial Serve app up in {timings['trivial_start_s']:.1f} s", flush=True)

    check_users = random.Random(args.seed).sample(live, min(args.check_users, len(live)))
    answers = compare_answers(info.http_url, f"http://127.0.0.1:{port}", check_users, headers)
    print(f"  answers compared: {answers}", flush=True)
    setup = {
        "users": args.users,
        "days": args.days,
        "events": len(frame),
        "replayed_events": replay.events,
        "rejected_events": replay.rejected,
        "benchmark_users": len(live),
        "items_indexed": models[PERSONALIZATION]["served"]["items_indexed"],
        "versions": trained.versions,
        "train_metrics": trained.metrics,
        "partitions": settings.partitions,
        "shards": settings.shards,
        "num_cpus": settings.num_cpus,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    return Prepared(settings.http_port, port, bare[0].pid, live, setup, answers, api_key)


def measure_server(
    args: argparse.Namespace, ready: Prepared, name: str, server: str, path: str
) -> dict[str, Any]:
    """One server's warm-up, open and closed loops on one endpoint, with the CPU it used."""
    pids = {"bare_app": ready.bare_pid, "bench_client": os.getpid()}
    port = ready.bare_port if server == "bare" else ready.platform_port
    quiet = wait_for_quiet(max_wait_s=args.quiet_wait)
    requests = requests_for(path, ready.users, ready.api_key)
    # Idle windows for Ray Serve only: the bare app's idle CPU is nil (one asleep process).
    measured = measure(port, requests, args, pids, idle=server != "bare")
    measured["background_busy_before"] = quiet
    cpu_of = "bare_app" if server == "bare" else "own_other"  # own_other: Ray, NATS
    for phase in ("open_loop", "closed_loop"):
        m = measured[phase]
        m["server_cpu_ms_per_request"] = (
            m["cpu_s"][cpu_of] * 1000 / m["requests"] if m["requests"] else None
        )
        m["server_cpu_ms_per_request_net_of_idle"] = net_cpu_ms_per_request(m, cpu_of)
    o, c = measured["open_loop"], measured["closed_loop"]
    print(
        f"  {server:<8} {name:<11} at {args.rate:g} rps p50/p99 "
        f"{_ms(o['p50_ms'])}/{_ms(o['p99_ms'])} ms ({o['errors']} errors); "
        f"closed loop {c['rps']:,.0f} rps ({c['errors']} errors)",
        flush=True,
    )
    return measured


def measure_all(args: argparse.Namespace, ready: Prepared) -> dict[str, dict[str, Any]]:
    """Per endpoint, both servers one after the other, and the p50 ratio; then the trivial
    Serve app (``endpoints["trivial"]["serve"]``, the same key sent, though it checks none)."""
    endpoints: dict[str, dict[str, Any]] = {}
    for name, paths in ENDPOINTS.items():
        endpoints[name] = {
            server: measure_server(args, ready, name, server, path)
            for server, path in zip(SERVERS, paths, strict=True)
        }
        ours = endpoints[name]["platform"]["open_loop"]["p50_ms"]
        ref = endpoints[name]["bare"]["open_loop"]["p50_ms"]
        endpoints[name]["p50_ratio"] = ours / ref if ours and ref else None
    endpoints["trivial"] = {"serve": measure_server(args, ready, "trivial", "serve", TRIVIAL_PATH)}
    return endpoints


def measure_batches(args: argparse.Namespace, ready: Prepared) -> dict[str, dict[str, Any]]:
    """Per model endpoint, one POST for ``--batch-users`` users, singles meanwhile."""
    out: dict[str, dict[str, Any]] = {}
    users = batch_users(ready.users, args.batch_users, args.seed)
    for name, (path, extra) in BATCHES.items():
        quiet = wait_for_quiet(max_wait_s=args.quiet_wait)
        singles = requests_for(ENDPOINTS[name][0], ready.users, ready.api_key)
        body = {"user_ids": users, **extra}
        b = run_async(
            batch_during_singles(ready.platform_port, path, body, singles, ready.api_key, args.seed)
        )
        b["background_busy_before"] = quiet
        out[name] = b
        s = b["singles"]
        print(
            f"  POST {path} {b['users']:,} users: {b['seconds']:.3f} s, {b['results']:,} "
            f"results, complete {b['complete']}; singles meanwhile {s['requests']} p99 "
            f"{_ms(s['p99_ms'])} ms ({s['errors']} errors)",
            flush=True,
        )
    return out


def simulate_in_child(conn: Pipe, options: dict[str, Any]) -> None:
    """Publisher process: ``audience simulate`` (:func:`publish_simulation` with
    ``options``) until the parent sends anything or closes the pipe; then sends back
    ``("done", report)``, or ``("error", traceback)``."""

    async def go() -> dict[str, Any]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def until_told() -> None:
            with contextlib.suppress(EOFError, OSError):
                conn.recv()
            with contextlib.suppress(RuntimeError):  # the loop ended on its own
                loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=until_told, daemon=True).start()
        report = await publish_simulation(stop=stop, **options)
        return asdict(report) | {"events_per_s": report.events_per_s}

    try:
        conn.send(("done", asyncio.run(go())))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


class SimulationProcess:
    """The parent's end of :func:`simulate_in_child`, in a spawned process (its CPU apart
    from the load generator's, competing with the shards as a co-located producer would)."""

    def __init__(self, options: dict[str, Any]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=simulate_in_child, args=(child, options), name="bench-simulate"
        )
        self.process.start()
        child.close()

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def stop(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Tell it to stop; its report (``error`` holds a traceback if it failed)."""
        with contextlib.suppress(OSError):  # it may have ended already
            self._conn.send("stop")
        try:
            if not self._conn.poll(timeout_s):
                return {"error": f"no report within {timeout_s:g} s"}
            kind, payload = self._conn.recv()
        except (EOFError, OSError) as exc:
            return {"error": f"no report: {exc!r} (exit code {self.process.exitcode})"}
        finally:
            self.process.join(10)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(10)
            self._conn.close()
        return dict(payload) if kind == "done" else {"error": payload}


async def shard_calls(handles: Sequence[Any], method: str) -> list[Any]:
    """A shard actor method on every shard, in shard order."""
    return list(await asyncio.gather(*(getattr(h, method).remote() for h in handles)))


async def applied_by_shards(handles: Sequence[Any]) -> int:
    """Events applied so far, from the shards' cheap counters (no JetStream round trip)."""
    return sum(int(c["applied_events"]) for c in await shard_calls(handles, "counters"))


async def until_steady(
    handles: Sequence[Any], rate: float, alive: Callable[[], bool]
) -> dict[str, Any]:
    """Wait until the shards apply ``STEADY_SHARE`` of ``rate`` over ``STEADY_EVERY_S``
    (the publisher runs steadily and the platform keeps up), at most ``STEADY_WAIT_S``."""
    started = perf_counter()
    last, at, seen = await applied_by_shards(handles), perf_counter(), 0.0
    while perf_counter() - started < STEADY_WAIT_S and alive():
        await asyncio.sleep(STEADY_EVERY_S)
        applied, now = await applied_by_shards(handles), perf_counter()
        seen, last, at = (applied - last) / (now - at), applied, now
        if seen >= STEADY_SHARE * rate:
            break
    return {
        "steady": seen >= STEADY_SHARE * rate,
        "waited_s": round(perf_counter() - started, 2),
        "applied_per_s_last": round(seen, 1),
    }


async def freshness_window(handles: Sequence[Any], stop: asyncio.Event) -> dict[str, Any]:
    """The store-to-applied delays of the messages the shards apply from now until ``stop``.

    The shards' freshness rings are cumulative (the latest 4,096 messages each): the first
    read is the baseline, later ones keep only what is new; a read every
    ``FRESHNESS_EVERY_S`` loses none unless a shard applies more messages meanwhile
    (``samples_lost``). The last read is just after ``stop``.
    """
    rings = [_Ring() for _ in handles]
    baseline = await shard_calls(handles, "freshness_ring")
    for ring, (count, samples) in zip(rings, baseline, strict=True):
        ring.new(count, samples)
    for ring in rings:
        ring.lost = 0
    kept: list[np.ndarray] = []
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), FRESHNESS_EVERY_S)
        reads = await shard_calls(handles, "freshness_ring")
        kept += [ring.new(c, r) for ring, (c, r) in zip(rings, reads, strict=True)]
        if stop.is_set():
            break
    delays = np.concatenate(kept) if kept else np.zeros(0)
    return {
        "messages": len(delays),
        "samples_lost": sum(r.lost for r in rings),
        "store_to_applied_ms": _percentiles(delays),
    }


async def open_loop_under_ingest(
    port: int,
    requests: Sequence[bytes],
    args: argparse.Namespace,
    handles: Sequence[Any],
    publisher: SimulationProcess,
    pids: dict[str, int],
) -> dict[str, Any]:
    """Once the ingest is steady: the open loop, with the events applied and the
    freshness over the same window."""
    ramp = await until_steady(handles, args.under_ingest_rate, publisher.alive)
    stop = asyncio.Event()
    applied = await applied_by_shards(handles)
    watch = asyncio.create_task(freshness_window(handles, stop))
    meter = CpuMeter(pids)
    meter.start()
    out = await open_loop(port, requests, args.rate, args.open_seconds, args.seed + 1)
    out["cpu_s"] = meter.stop()
    applied = await applied_by_shards(handles) - applied
    stop.set()
    out["freshness"] = await watch
    out["ramp"] = ramp
    out["applied_events"] = applied
    out["applied_events_per_s"] = applied / out["cpu_s"]["wall_s"] if applied else 0.0
    return out


def measure_under_ingest(
    args: argparse.Namespace, ready: Prepared, platform: Platform
) -> dict[str, Any]:
    """``/v1/personalize``'s open loop at ``--rate`` while ``audience simulate`` publishes
    ``--under-ingest-rate`` events/s of the benchmark's simulated users (the requested live
    users among them: their state changes while they are read); then the publisher stops."""
    settings, pool = platform.settings, platform.pool
    assert pool is not None
    options = {  # as `audience simulate` calls it, signed in as the producer
        "nats_url": platform.nats_url,
        "partitions": settings.partitions,
        "users": args.users,
        "rate": args.under_ingest_rate,
        "duration_s": STEADY_WAIT_S + args.open_seconds + GRACE_S + 60,  # stopped before
        "seed": args.seed + 1,  # event ids (sim<seed>-n) apart from the replayed history's
        "max_batch": settings.batch_max_events,
        "linger_ms": settings.linger_ms,
        "policy": policy_of(settings),
        "credentials": platform.credentials("producer"),
    }
    quiet = wait_for_quiet(max_wait_s=args.quiet_wait)
    requests = requests_for(ENDPOINTS["personalize"][0], ready.users, ready.api_key)
    publisher = SimulationProcess(options)
    pids = {"publisher": publisher.pid, "bare_app": ready.bare_pid, "bench_client": os.getpid()}
    try:
        out = run_async(
            open_loop_under_ingest(
                ready.platform_port, requests, args, pool.handles, publisher, pids
            )
        )
    finally:
        out_publisher = publisher.stop()
    out["publisher"] = out_publisher
    out["target_events_per_s"] = args.under_ingest_rate
    out["background_busy_before"] = quiet
    fresh = out["freshness"]["store_to_applied_ms"]
    print(
        f"  personalize at {args.rate:g} rps under {args.under_ingest_rate:,.0f} events/s: "
        f"p50/p99 {_ms(out['p50_ms'])}/{_ms(out['p99_ms'])} ms ({out['errors']} errors); "
        f"published {out_publisher.get('events_per_s', 0.0):,.0f} events/s, applied "
        f"{out['applied_events_per_s']:,.0f}/s in the run; freshness p99 {_ms(fresh['p99'])} ms",
        flush=True,
    )
    return out


def measure_ingest(args: argparse.Namespace, ready: Prepared) -> dict[str, Any]:
    """HTTP ingest at ``--ingest-concurrency`` requests in flight, with the CPU it used."""
    quiet = wait_for_quiet(max_wait_s=args.quiet_wait)
    template = ingest_template(ready.users, args.ingest_batch, args.seed)
    meter = CpuMeter({"bare_app": ready.bare_pid, "bench_client": os.getpid()})
    meter.start()
    out = run_async(
        http_ingest(
            ready.platform_port,
            template,
            ready.api_key,
            args.ingest_concurrency,
            args.ingest_seconds,
        )
    )
    out["cpu_s"] = meter.stop()
    out["background_busy_before"] = quiet
    print(
        f"  POST /v1/events: {out['events_per_s']:,.0f} events/s accepted "
        f"({out['accepted_events']:,} in {out['seconds']:.1f} s; statuses {out['statuses']})",
        flush=True,
    )
    return out


def summary_of(
    endpoints: dict[str, Any],
    batches: dict[str, Any],
    ingest: dict[str, Any] | None,
    answers: dict[str, Any],
    under_ingest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The flat ``summary``: every target figure (see ``GOALS``; None when not measured).

    The ``_100rps`` figures are at ``--rate`` and the ``_1000_`` ones for ``--batch-users``
    users, whatever those were; a batch whose answer was incomplete has no time. Beside
    the p99 under ingest, the rate the publisher achieved and the freshness p99 of the
    same window (no target of their own here: the pipeline bench has those).
    """

    def at(name: str, server: str, phase: str, key: str) -> Any:
        return endpoints.get(name, {}).get(server, {}).get(phase, {}).get(key)

    person_p50 = at("personalize", "platform", "open_loop", "p50_ms")
    trivial_p50 = at("trivial", "serve", "open_loop", "p50_ms")
    out: dict[str, Any] = {}
    for name in ENDPOINTS:
        out[f"{name}_p99_ms_100rps"] = at(name, "platform", "open_loop", "p99_ms")
        out[f"{name}_max_rps"] = at(name, "platform", "closed_loop", "rps")
    out["personalize_p50_ms_100rps"] = person_p50
    out["trivial_serve_p50_ms_100rps"] = trivial_p50
    out["personalize_p50_vs_trivial_serve"] = (
        person_p50 / trivial_p50 if person_p50 and trivial_p50 else None
    )
    for name in BATCHES:
        b = batches.get(name)
        out[f"{name}_batch_1000_s"] = b["seconds"] if b and b["complete"] else None
        out[f"{name}_single_p99_ms_during_batch"] = b["singles"]["p99_ms"] if b else None
    out["http_ingest_events_per_s"] = ingest["events_per_s"] if ingest else None
    u = under_ingest or {}
    out["personalize_p99_ms_100rps_under_ingest"] = u.get("p99_ms")
    out["under_ingest_published_events_per_s"] = u.get("publisher", {}).get("events_per_s")
    out["under_ingest_freshness_p99_ms"] = (
        u.get("freshness", {}).get("store_to_applied_ms", {}).get("p99")
    )
    out["answers_match_bare"] = bool(answers) and all(
        c["users"] > 0 and c["same_answer"] == c["users"] for c in answers.values()
    )
    for name in ENDPOINTS:
        out[f"{name}_p50_vs_bare"] = endpoints.get(name, {}).get("p50_ratio")
    return out


def broken_steps(r: dict[str, Any]) -> list[str]:
    """Steps that did not run properly (whatever their speed): a smoke run fails on them."""
    out = []
    trivial = r["endpoints"]["trivial"]["serve"]
    for phase in ("sequential", "open_loop", "closed_loop"):
        if not trivial[phase]["ok"]:
            out.append(f"trivial Serve app: no answer in the {phase}")
    for name, b in r["batches"].items():
        if not b["complete"]:
            out.append(f"POST {BATCHES[name][0]}: incomplete answer {b}")
        if not b["singles"]["ok"]:
            out.append(f"{name}: no single request answered during the batch")
    u = r["under_ingest"]
    if u["publisher"].get("error") or not u["publisher"].get("events"):
        out.append(f"audience simulate under ingest published nothing: {u['publisher']}")
    if not u["ok"] or not u["freshness"]["messages"]:
        out.append(
            f"personalize under ingest: {u['ok']} answers, {u['freshness']['messages']} "
            "messages applied"
        )
    if not r["ingest"]["accepted_events"]:
        out.append(f"POST /v1/events: no event accepted ({r['ingest']['statuses']})")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    for noisy in ("ray.data", "ray.serve"):  # progress lines of training and Serve
        logging.getLogger(noisy).setLevel(logging.WARNING)
    background = wait_for_quiet(max_wait_s=args.quiet_wait)
    bare: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="audience-bench-serving-") as folder:
        tmp = Path(folder)
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            data_dir=tmp / "data",
            http_port=free_port(),
            num_cpus=4,
            partitions=8,
            shards=2,
            # Two shards throughout: the shard autoscaler would consolidate an idle
            # platform to one between the steps (and the under-ingest step reads
            # every shard's counters by handle).
            autoscale_min_shards=2,
            autoscale_max_shards=2,
            model_poll_s=1.0,
            rate_limit_per_s=1e6,  # keys stay on; the rate limit must not cap what is measured
            rate_limit_burst=1e6,
        )
        platform = Platform(settings)
        try:
            print("setup:", flush=True)
            ready = prepare(args, platform, tmp, bare)
            endpoints = measure_all(args, ready)
            batches = measure_batches(args, ready)
            under_ingest = measure_under_ingest(args, ready, platform)  # changes live users
            ingest = measure_ingest(args, ready)  # last: it changes the live users
        finally:
            for proc in bare:
                stop_process(proc)
            platform.stop()

    result: dict[str, Any] = {
        "smoke": args.smoke,
        "summary": summary_of(endpoints, batches, ingest, ready.answers_match, under_ingest),
        "summary_targets": {key: goal(key) for key in GOALS} | {"answers_match_bare": "all"},
        "endpoints": endpoints,
        "batches": batches,
        "under_ingest": under_ingest,
        "ingest": ingest,
        "targets": TARGETS,
        "setup": ready.setup,
        "answers_match": ready.answers_match,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": host_platform.platform(),
            "python": sys.version.split()[0],
            "background_busy": background,
        },
        "versions": versions(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    result["total_s"] = time.perf_counter() - started
    result["summary_pass"] = {key: meets(key, result["summary"][key]) for key in GOALS} | {
        "answers_match_bare": result["summary"]["answers_match_bare"]
    }
    json_path, _ = write(result, args.out)
    print()
    print(markdown(result))
    print(f"JSON: {json_path.resolve()}")
    broken = broken_steps(result)
    for problem in broken:
        print(f"step not run properly: {problem}", file=sys.stderr)
    return 1 if broken and args.smoke else 0


if __name__ == "__main__":
    raise SystemExit(main())
