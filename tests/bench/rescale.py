"""Live rescale under load: 2 -> 4 -> 1 shards while events stream and queries run.

A simulated audience is published at a steady rate for the whole run; a
reader asks for 50 users' profiles in a loop; the pool rescales up, then
down. Reported per rescale: each step's time, partitions and snapshot bytes
handed over; for the queries, their latency while no rescale runs (the
reference, same run) and while one does, and whether any failed; at the end,
whether every user's counts equal the published events. Writes
``rescale.json`` and ``rescale.md``.

    python -m tests.bench.rescale --out bench-results [--rate 20000 --duration 60]

``--smoke`` runs both rescales on a tiny stream (see ``SMOKE``), for ``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
import numpy as np
import ray

from actors.checkpoint_store import CheckpointConfig
from actors.jetstream import StreamNames
from actors.pool import PoolSpec, ShardPool
from actors.producer import Producer
from actors.simulator import Simulator
from cluster.nats_server import EmbeddedNats
from tests.bench.phases import init_ray
from tests.bench.report import measure_table, write_named
from tests.support.chaos import prepare
from tests.support.truth import mismatched, settled_profiles, truth_of

PARTITIONS = 16
STEPS = (4, 1)  # from 2 shards
# --smoke: the defaults it changes (options given explicitly still win).
SMOKE: dict[str, Any] = {"rate": 5_000.0, "duration": 8.0, "users": 2_000}


class QueryClock:
    """Profiles of some users in a loop; latency per call, tagged by what ran meanwhile."""

    def __init__(self, pool: ShardPool, users: list[str]) -> None:
        self.pool = pool
        self.users = users
        self.phase = "steady"
        self.latency_ms: dict[str, list[float]] = {"steady": [], "rescaling": []}
        self.failures: list[str] = []

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            phase, started = self.phase, time.perf_counter()
            try:
                await self.pool.profiles(self.users)
            except Exception as exc:  # counted, never hidden
                self.failures.append(repr(exc)[:200])
            else:
                self.latency_ms[phase].append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.02)


async def _publish(url: str, chunks: list[Any], started: float) -> None:
    nc = await nats.connect(url)
    producer = await Producer(nc.jetstream(), PARTITIONS, producer_id="rescale-bench").start()
    for chunk in chunks:
        await asyncio.sleep(max(0.0, started + chunk.wall_offset_s - time.monotonic()))
        if len(chunk.batch):
            await producer.send(chunk.batch)
    await producer.close()
    await nc.close()


async def _scenario(url: str, pool: ShardPool, chunks: list[Any], duration_s: float) -> dict:
    truth = truth_of(*(c.batch for c in chunks))
    clock = QueryClock(pool, sorted(truth)[:: max(1, len(truth) // 50)][:50])
    stop = asyncio.Event()
    started = time.monotonic()
    publishing = asyncio.create_task(_publish(url, chunks, started))
    querying = asyncio.create_task(clock.run(stop))
    reports = []
    for i, shards in enumerate(STEPS):
        await asyncio.sleep(
            max(0.0, started + duration_s * (i + 1) / (len(STEPS) + 1.5) - time.monotonic())
        )
        clock.phase = "rescaling"
        reports.append(await pool.rescale(shards))
        clock.phase = "steady"
    await publishing
    publish_s = time.monotonic() - started
    profiles = await settled_profiles(pool, truth, timeout_s=300)
    settle_s = time.monotonic() - started - publish_s
    stop.set()
    await querying
    return {
        "rescales": reports,
        "events": sum(len(c.batch) for c in chunks),
        "users": len(truth),
        "mismatched_users": len(mismatched(profiles, truth)),
        "publish_s": round(publish_s, 1),
        "settle_after_publish_s": round(settle_s, 1),
        "query_failures": clock.failures[:10],
        "queries_failed": len(clock.failures),
        "query_ms": {
            phase: {
                "calls": len(values),
                "p50": round(float(np.percentile(values, 50)), 2) if values else None,
                "p99": round(float(np.percentile(values, 99)), 2) if values else None,
                "max": round(max(values), 2) if values else None,
            }
            for phase, values in clock.latency_ms.items()
        },
    }


def run(rate: float, duration_s: float, users: int) -> dict[str, Any]:
    streams = StreamNames()
    sim = Simulator(users=users, seed=11, start_ms=1_767_225_600_000)  # 2026-01-01
    chunks = list(sim.batches(rate=rate, duration_s=duration_s, chunk_s=0.1))
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp) / "nats") as server:
        asyncio.run(prepare(server.url, streams))
        spec = PoolSpec(
            PARTITIONS,
            2,
            server.url,
            streams.events,
            name="rescale-bench",
            checkpoints=CheckpointConfig(interval_s=0),
        )
        pool = ShardPool.create(spec)
        try:
            result = asyncio.run(_scenario(server.url, pool, chunks, duration_s))
        finally:
            pool.shutdown()
    result.update(rate=rate, duration_s=duration_s, partitions=PARTITIONS)
    result["exact"] = result["mismatched_users"] == 0
    return result


def markdown(report: dict[str, Any]) -> str:
    rows = [
        (
            "events published (rate, duration)",
            f"{report['events']:,} ({report['rate']:,.0f}/s, {report['duration_s']:g} s)",
            "",
        ),
        ("state exact after the rescales", str(report["exact"]), "True"),
        ("queries failed during the run", str(report["queries_failed"]), "0"),
    ]
    for r in report["rescales"]:
        rows.append(
            (
                f"rescale {r['from']} -> {r['to']}: total s (start new / release / adopt)",
                f"{r['took_s']:.2f} ({r['started_s']:.2f} / {r['released_s'] - r['started_s']:.2f}"
                f" / {r['adopted_s'] - r['released_s']:.2f})",
                "",
            )
        )
        rows.append(
            (
                f"rescale {r['from']} -> {r['to']}: partitions handed over, snapshot MB",
                f"{r['handed_over']} of {r['moved']}, {r['snapshot_bytes'] / 1e6:.1f}",
                "all by hand-off",
            )
        )
    steady, moving = report["query_ms"]["steady"], report["query_ms"]["rescaling"]
    rows.append(
        (
            "reference: profile query ms while no rescale runs, p50 / p99",
            f"{steady['p50']} / {steady['p99']} ({steady['calls']} calls)",
            "same run",
        )
    )
    rows.append(
        (
            "profile query ms during rescales, p50 / p99 / max",
            f"{moving['p50']} / {moving['p99']} / {moving['max']} ({moving['calls']} calls)",
            "",
        )
    )
    rows.append(
        ("stream caught up after publishing ended (s)", f"{report['settle_after_publish_s']}", "")
    )
    return measure_table(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny run (make test runs it)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--rate", type=float, default=20_000)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--users", type=int, default=50_000)
    if parser.parse_args(argv).smoke:
        parser.set_defaults(**SMOKE)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    init_ray(4)
    try:
        report = run(args.rate, args.duration, args.users)
    finally:
        ray.shutdown()
    report["smoke"] = args.smoke
    write_named(args.out, "rescale", report, markdown(report))
    if not report["exact"] or report["queries_failed"]:
        raise SystemExit("rescale: the state was NOT exact or queries failed")


if __name__ == "__main__":
    main()
