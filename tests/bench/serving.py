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
servers. Writes ``serving.json`` and ``serving.md`` to ``--out``.

    .venv/bin/python -m tests.bench.serving --out bench-results

``--smoke`` runs every step at a tiny size (a few seconds per server and endpoint,
see ``SMOKE``), so that ``make test`` can tell whether the bench still runs; its
figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import pickle
import platform as host_platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from time import perf_counter
from typing import Any, TypeVar

import httpx
import numpy as np

from cluster.launcher import Platform, policy_of
from cluster.nats_server import free_port
from cluster.replay import replay_history
from cluster.settings import Settings
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
from tests.bench.pipeline import versions as pipeline_versions
from tests.bench.report import _num, _verdict

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
KINDS = (CHURN, PERSONALIZATION)
TARGETS = {"p99_ms_at_rate": 25.0, "rate": 100.0, "max_rps": 500.0, "p50_vs_bare": 2.0}
ENDPOINTS = {  # name -> (platform path, bare path); {u} is the user id
    "churn": ("/v1/churn/{u}", "/churn/{u}"),
    "personalize": ("/v1/personalize/{u}?k=10", "/personalize/{u}?k=10"),
}
SERVERS = ("platform", "bare")
GRACE_S = 5.0  # open loop: how long unanswered requests may still come in after the last send
KEEP_ALIVE_S = 90  # idle keep-alive of the bare app: Ray Serve's proxy default
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
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny run of every step, seconds per measurement (make test runs it)",
    )
    p.add_argument("--out", "--out-dir", dest="out", type=Path, default=Path("bench-results"))
    p.add_argument("--users", type=int, default=1500, help="simulated users (train and replay)")
    p.add_argument("--days", type=float, default=30.0, help="days of simulated history")
    p.add_argument("--rate", type=float, default=TARGETS["rate"], help="open loop requests/s")
    p.add_argument("--open-seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=32, help="closed loop requests in flight")
    p.add_argument("--closed-seconds", type=float, default=8.0)
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
    if p.parse_args(argv).smoke:
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
    """One keep-alive HTTP/1.1 connection; GET only, minimal parsing (cheap per request)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.closed = False

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def get(self, request: bytes) -> int:
        """Send a prepared request; read the whole answer; return its status."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at >= 0:
            end = lower.index(b"\r\n", at + 2)
            await self.reader.readexactly(int(lower[at + 17 : end]))
        elif b"\r\ntransfer-encoding: chunked" in lower:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            await self.reader.read()
            self.close()
        if b"\r\nconnection: close" in lower:
            self.close()
        return status

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


def run_async(coro: Awaitable[T]) -> T:
    """Run the load generator on uvloop when it is installed (less client CPU per request)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


def measure(
    port: int, requests: Sequence[bytes], args: argparse.Namespace, pids: dict[str, int]
) -> dict[str, Any]:
    """Warm-up (one request at a time, kept as the unloaded latency), open loop, closed loop."""

    async def go() -> dict[str, Any]:
        sequential = await closed_loop(port, requests, 1, args.warmup_seconds, args.seed + 99)
        meter = CpuMeter(pids)
        meter.start()
        opened = await open_loop(port, requests, args.rate, args.open_seconds, args.seed)
        opened["cpu_s"] = meter.stop()
        meter.start()
        closed = await closed_loop(port, requests, args.concurrency, args.closed_seconds, args.seed)
        closed["cpu_s"] = meter.stop()
        return {"sequential": sequential, "open_loop": opened, "closed_loop": closed}

    return run_async(go())


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
                f"platform CPU {_ms(po['server_cpu_ms_per_request'])} ms per request; "
                f"{_foreign(po)}",
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
                f"CPU {_ms(pc['server_cpu_ms_per_request'])} ms per request (bare app "
                f"{_ms(bc['server_cpu_ms_per_request'])}); {_foreign(pc)}",
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
    return out


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


def measure_all(args: argparse.Namespace, ready: Prepared) -> dict[str, dict[str, Any]]:
    """Per endpoint, both servers one after the other, and the p50 ratio."""
    endpoints: dict[str, dict[str, Any]] = {}
    pids = {"bare_app": ready.bare_pid, "bench_client": os.getpid()}
    for name, paths in ENDPOINTS.items():
        endpoints[name] = {}
        for server, path in zip(SERVERS, paths, strict=True):
            port = ready.platform_port if server == "platform" else ready.bare_port
            quiet = wait_for_quiet(max_wait_s=args.quiet_wait)
            measured = measure(port, requests_for(path, ready.users, ready.api_key), args, pids)
            measured["background_busy_before"] = quiet
            cpu_of = "bare_app" if server == "bare" else "own_other"  # own_other: Ray, NATS
            for phase in ("open_loop", "closed_loop"):
                m = measured[phase]
                m["server_cpu_ms_per_request"] = (
                    m["cpu_s"][cpu_of] * 1000 / m["requests"] if m["requests"] else None
                )
            endpoints[name][server] = measured
            o, c = measured["open_loop"], measured["closed_loop"]
            print(
                f"  {server:<8} {name:<11} at {args.rate:g} rps p50/p99 "
                f"{_ms(o['p50_ms'])}/{_ms(o['p99_ms'])} ms ({o['errors']} errors); "
                f"closed loop {c['rps']:,.0f} rps ({c['errors']} errors)",
                flush=True,
            )
        ours = endpoints[name]["platform"]["open_loop"]["p50_ms"]
        ref = endpoints[name]["bare"]["open_loop"]["p50_ms"]
        endpoints[name]["p50_ratio"] = ours / ref if ours and ref else None
    return endpoints


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
            model_poll_s=1.0,
            rate_limit_per_s=1e6,  # keys stay on; the rate limit must not cap what is measured
            rate_limit_burst=1e6,
        )
        platform = Platform(settings)
        try:
            print("setup:", flush=True)
            ready = prepare(args, platform, tmp, bare)
            endpoints = measure_all(args, ready)
        finally:
            for proc in bare:
                stop_process(proc)
            platform.stop()

    result: dict[str, Any] = {
        "smoke": args.smoke,
        "endpoints": endpoints,
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
    json_path, _ = write(result, args.out)
    print()
    print(markdown(result))
    print(f"JSON: {json_path.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
