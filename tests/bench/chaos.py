"""Full-size chaos run: 1M events with duplicates and garbage, shard kills, a NATS restart.

Reports whether the state came out exact and the recovery times (kill -> the
restarted shard consuming again, and -> caught up with the stream), beside a
reference measured in the same run: how long Ray itself takes to restart a
trivial actor on this machine. Writes ``chaos.json`` and ``chaos.md``.

    python -m tests.bench.chaos --out bench-results [--events 1000000]

``--smoke`` runs the same scenario tiny (see ``SMOKE``: 20k events, one kill, the
NATS restart, one reference restart), for ``make test``; its times mean little.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray

from actors.checkpoint_store import CheckpointConfig
from actors.jetstream import StreamNames
from actors.pool import PoolSpec, ShardPool
from cluster.nats_server import EmbeddedNats
from tests.bench.phases import init_ray
from tests.bench.report import measure_table, write_named
from tests.support.chaos import ChaosPlan, ChaosResult, prepare, run_chaos

RECOVERY_TARGET_S = 5.0
# --smoke: the defaults it changes (options given explicitly still win).
SMOKE: dict[str, Any] = {
    "events": 20_000,
    "users": 2_000,
    "rate": 20_000.0,
    "kills": 1,
    "settle_s": 120.0,
    "reference_restarts": 1,
}


@ray.remote(max_restarts=-1)
class _Bare:
    """A trivial actor: what a restart costs before any of the shard's own work."""

    def __init__(self) -> None:
        self.started_at = time.time()

    def ping(self) -> float:
        return self.started_at


def ray_restart_reference(times: int = 3) -> list[float]:
    """Seconds from killing a trivial actor to its next incarnation answering."""
    actor = _Bare.remote()  # type: ignore[attr-defined]
    out = []
    for _ in range(times):
        before = ray.get(actor.ping.remote())
        killed = time.time()
        ray.kill(actor, no_restart=False)
        while True:
            try:
                if ray.get(actor.ping.remote(), timeout=30) != before:
                    break
            except ray.exceptions.RayActorError:
                time.sleep(0.02)
        out.append(round(time.time() - killed, 3))
    ray.kill(actor, no_restart=True)
    return out


def run(
    events: int,
    rate: float,
    kills: int,
    shards: int,
    settle_s: float = 600,
    users: int = 20_000,
    reference_restarts: int = 3,
) -> dict[str, Any]:
    streams = StreamNames()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp) / "nats") as server:
        asyncio.run(prepare(server.url, streams))
        reference = ray_restart_reference(reference_restarts)
        spec = PoolSpec(
            8,
            shards,
            server.url,
            streams.events,
            name="chaos-bench",
            checkpoints=CheckpointConfig(interval_s=2.0, keep=2),
        )
        pool = ShardPool.create(spec)
        try:
            plan = ChaosPlan(events=events, users=users, kills=kills, rate=rate, seed=7)
            result = asyncio.run(run_chaos(plan, server, pool, streams, settle_timeout_s=settle_s))
            statuses = asyncio.run(pool.status())
        finally:
            pool.shutdown()
    return summarize(result, reference, statuses)


def summarize(
    result: ChaosResult, reference: list[float], statuses: list[dict[str, Any]]
) -> dict[str, Any]:
    consuming = result.recovery_times("consuming_after_s")
    caught_up = result.recovery_times("caught_up_after_s")
    snapshots = [s["checkpoint"] for s in statuses if s.get("checkpoint")]
    return {
        "plan": asdict(result.plan),
        "exact": result.exact,
        "events_published": result.events_published,
        "duplicates_injected": result.duplicates,
        "malformed_injected": result.malformed,
        "dead_letters": result.dead_letters,
        "users_checked": result.users_checked,
        "mismatched_users": len(result.mismatched_users),
        "deleted_present": len(result.deleted_present),
        "kills": result.kills,
        "nats_restart_s": result.nats_restart_s,
        "publish_s": round(result.publish_s, 1),
        "settle_s": round(result.settle_s, 1),
        "recovery_consuming_s": {
            "max": max(consuming, default=None),
            "median": statistics.median(consuming) if consuming else None,
        },
        "recovery_caught_up_s": {
            "max": max(caught_up, default=None),
            "median": statistics.median(caught_up) if caught_up else None,
        },
        "ray_bare_restart_s": {"max": max(reference), "median": statistics.median(reference)},
        "snapshot": {
            "bytes_max": max((s["bytes"] for s in snapshots), default=None),
            "took_s_max": max((s["took_s"] for s in snapshots), default=None),
        },
        "target_recovery_s": RECOVERY_TARGET_S,
    }


def markdown(report: dict[str, Any]) -> str:
    consuming, caught = report["recovery_consuming_s"], report["recovery_caught_up_s"]
    bare = report["ray_bare_restart_s"]
    ok = consuming["max"] is not None and consuming["max"] <= RECOVERY_TARGET_S
    snap = report["snapshot"]
    rows = [
        ("state exact (counts, dead letters, deletions)", str(report["exact"]), "True"),
        ("events published", f"{report['events_published']:,}", ""),
        ("duplicates injected", f"{report['duplicates_injected']:,}", "applied once"),
        (
            "malformed injected / dead letters",
            f"{report['malformed_injected']:,} / {report['dead_letters']:,}",
            "equal",
        ),
        (
            "users checked / mismatched",
            f"{report['users_checked']:,} / {report['mismatched_users']}",
            "0 mismatched",
        ),
        ("shard kills", str(len(report["kills"])), ""),
        ("nats-server restart (s)", f"{report['nats_restart_s']:.2f}", ""),
        (
            "kill -> consuming again (s), median / max",
            f"{consuming['median']:.2f} / {consuming['max']:.2f}",
            f"<= {RECOVERY_TARGET_S:g} ({'PASS' if ok else 'FAIL'})",
        ),
        (
            "kill -> caught up with the stream (s), median / max",
            f"{caught['median']:.2f} / {caught['max']:.2f}",
            "",
        ),
        (
            "reference: Ray restarts a trivial actor (s), median / max",
            f"{bare['median']:.2f} / {bare['max']:.2f}",
            "same run",
        ),
        (
            "largest shard checkpoint (all its partitions): MB, s",
            f"{(snap['bytes_max'] or 0) / 1e6:.1f}, {snap['took_s_max']}",
            "",
        ),
    ]
    return measure_table(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny run (make test runs it)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=40_000)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--settle-s", type=float, default=600, help="most wait for catch-up")
    parser.add_argument(
        "--reference-restarts", type=int, default=3, help="restarts of the trivial actor"
    )
    if parser.parse_args(argv).smoke:
        parser.set_defaults(**SMOKE)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    init_ray(4)
    try:
        report = run(
            args.events,
            args.rate,
            args.kills,
            args.shards,
            args.settle_s,
            users=args.users,
            reference_restarts=args.reference_restarts,
        )
    finally:
        ray.shutdown()
    report["smoke"] = args.smoke
    write_named(args.out, "chaos", report, markdown(report))
    if not report["exact"]:
        raise SystemExit("chaos: the state was NOT exact")


if __name__ == "__main__":
    main()
