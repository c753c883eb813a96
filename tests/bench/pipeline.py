"""``make bench``: end-to-end throughput, freshness and state size, against reference engines.

One run, in this order so that no measurement shares the two cores with
another: generate the events (deterministic, so the publisher process makes the
same ones) and write them as CSV; the references (plain Python loops here,
Bytewax and Flink SQL as subprocesses of the bench interpreter); then Ray and
the real pipeline (unpaced ingest, paced freshness); then the size of the state
at 1M users. Writes ``bench.json`` and ``bench.md`` to ``--out-dir``.

    .venv/bin/python -m tests.bench.pipeline --reference-python .venv-bench/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import ray

from actors.batch import EventBatch
from actors.events import TYPE_CODE, EventType
from actors.producer import DEFAULT_LINGER_MS
from actors.simulator import AudienceModel, Simulator
from actors.state import UserStateTable
from cluster.nats_server import find_binary
from cluster.settings import Settings
from tests.bench import machine, phases, references, report
from tests.bench.machine import wait_for_quiet
from tests.bench.publisher import PublishPlan
from tests.bench.workload import Workload, generate, link_parts, write_csv_parts

DAY_MS = 86_400_000
DEFAULT_PARTITIONS = Settings.model_fields["partitions"].default
DEFAULT_MAX_BATCH = Settings.model_fields["batch_max_events"].default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--reference-python",
        default=".venv-bench/bin/python",
        help="interpreter with bytewax and apache-flink",
    )
    p.add_argument("--events", type=int, default=3_000_000, help="events for the ingest phase")
    p.add_argument("--users", type=int, default=100_000, help="audience of the ingest phase")
    p.add_argument(
        "--reference-events",
        type=int,
        default=1_000_000,
        help="the first N events feed the plain loops and Bytewax, and are Flink's small size",
    )
    p.add_argument("--out-dir", type=Path, default=Path("bench-results"))
    p.add_argument("--skip-flink", action="store_true")
    p.add_argument("--skip-bytewax", action="store_true")
    p.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS, help="default: settings'")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=2000, help="producer max_batch, ingest")
    p.add_argument("--linger-ms", type=float, default=10.0, help="producer linger, ingest")
    p.add_argument("--fresh-rate", type=float, default=100_000, help="events/s, freshness")
    p.add_argument("--fresh-rate-high", type=float, default=200_000, help="events/s, 2nd run")
    p.add_argument("--fresh-seconds", type=float, default=18.0)
    p.add_argument("--fresh-warmup", type=float, default=3.0)
    p.add_argument("--fresh-max-batch", type=int, default=DEFAULT_MAX_BATCH)
    p.add_argument("--fresh-linger-ms", type=float, default=DEFAULT_LINGER_MS)
    p.add_argument("--steady-rate", type=float, default=1000, help="events/s, shard CPU per event")
    p.add_argument("--steady-seconds", type=float, default=25.0)
    p.add_argument("--steady-warmup", type=float, default=5.0)
    p.add_argument("--size-users", type=int, default=1_000_000, help="users for bytes_per_user")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="seconds-long run of every phase (for make test): tiny sizes, no Flink/Bytewax",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.events, args.users, args.reference_events = 60_000, 5_000, 20_000
        args.skip_flink = args.skip_bytewax = True
        args.fresh_rate, args.fresh_rate_high, args.fresh_seconds = 5_000, 10_000, 4.0
        args.fresh_warmup = 1.0
        args.steady_rate, args.steady_seconds, args.steady_warmup = 500, 4.0, 1.0
        args.size_users = 20_000
        machine.QUIET_WAIT_S = 0.0  # figures of a smoke run mean nothing: do not wait
    return args


def run_references(
    args: argparse.Namespace, workload: Workload, folder: Path
) -> dict[str, dict[str, Any]]:
    """Plain loops, Bytewax and Flink on the ingest events (before Ray takes the cores)."""
    started = time.perf_counter()
    batch = EventBatch.concat(b for _, b in generate(workload))
    part_events = min(250_000, len(batch))  # several parts keep both Flink sources busy
    small_events = max(
        part_events, min(args.reference_events, len(batch)) // part_events * part_events
    )
    parts = write_csv_parts(batch, folder / "all", part_events)
    small_parts = parts[: small_events // part_events]
    link_parts(small_parts, folder / "small")
    print(f"  {len(batch):,} events generated and written in {time.perf_counter() - started:.1f} s")
    sample = [
        batch.take(np.arange(lo, min(lo + 100_000, small_events)))
        for lo in range(0, small_events, 100_000)
    ]
    del batch
    gc.collect()
    gc.freeze()  # as in the publisher: input held in memory is not the loops' garbage
    out: dict[str, dict[str, Any]] = {}
    quiet = wait_for_quiet()
    out["plain_loop"] = references.plain_loop(sample) | {"background_busy": quiet}
    quiet = wait_for_quiet()
    out["plain_loop_simple"] = references.plain_loop_simple(sample) | {"background_busy": quiet}
    plain, simple = out["plain_loop"]["events_per_s"], out["plain_loop_simple"]["events_per_s"]
    print(f"  plain loop {plain:,.0f}/s, simple {simple:,.0f}/s")
    gc.unfreeze()
    del sample
    py = args.reference_python

    def engine(skipped: bool, flag: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A reference engine's result, or why it did not run (skipped, no interpreter)."""
        if skipped:
            return {"events_per_s": None, "reason": flag}
        if not Path(py).exists():
            return {"events_per_s": None, "reason": f"no reference python at {py}"}
        quiet = wait_for_quiet()
        return run() | {"background_busy": quiet}

    small, every = folder / "small", folder / "all"
    out["bytewax"] = engine(
        args.skip_bytewax, "--skip-bytewax", lambda: references.bytewax(py, small_parts)
    )
    print(f"  bytewax {out['bytewax'].get('events_per_s') or out['bytewax'].get('reason')}")
    out["flink"] = engine(
        args.skip_flink,
        "--skip-flink",
        lambda: references.flink(py, small, small_events, every, workload.events),
    )
    print(f"  flink {out['flink'].get('events_per_s') or out['flink'].get('reason')}")
    out["flink_same_work"] = engine(
        args.skip_flink,
        "--skip-flink",
        lambda: references.flink_same_work(py, small, small_events, every, workload.events),
    )
    same = out["flink_same_work"]
    print(f"  flink same work {same.get('events_per_s') or same.get('reason')}")
    return out


def bytes_per_user(users: int, seed: int, start_ms: int) -> dict[str, Any]:
    """Fill one table with simulated traffic, then one page view for every user not yet seen."""
    sim = Simulator(users, seed, start_ms, AudienceModel(daily_amplitude=0.0), time_scale=3600)
    table = UserStateTable()
    simulated = 0
    for chunk in sim.batches(1_000_000, 2.0, chunk_s=0.25):
        simulated += table.apply(chunk.batch)
    names = [f"user-{i:07d}" for i in range(1, users + 1)]  # the simulator's user ids
    missing = [u for u in names if u not in table]
    view = TYPE_CODE[EventType.PAGE_VIEW]
    for lo in range(0, len(missing), 100_000):
        ids = missing[lo : lo + 100_000]
        n = len(ids)
        table.apply(
            EventBatch(
                event_id=[f"fill-{lo + i}" for i in range(n)],
                user_id=ids,
                type=np.full(n, view, np.uint8),
                ts=np.full(n, start_ms, np.int64),
                item_id=[f"item-{i % 5000:05d}" for i in range(n)],
                category=[f"cat-{i % 20:02d}" for i in range(n)],
                value=np.full(n, np.nan),
                source=np.zeros(n, np.uint8),
            )
        )
    nbytes = table.nbytes()
    return {
        "users": len(table),
        "capacity": int(table._cap),  # rows allocated (columns grow by doubling)
        "simulated_events": simulated,
        "filled_users": len(missing),
        "nbytes": nbytes,
        "bytes_per_user": nbytes / len(table),
    }


def versions() -> dict[str, str]:
    out = {p: version(p) for p in ("ray", "nats-py", "numpy", "orjson")}
    try:
        binary = find_binary()
        out["nats-server"] = (
            subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10)
            .stdout.strip()
            .removeprefix("nats-server: ")
        )
    except Exception as exc:  # informational only
        out["nats-server"] = f"unknown ({exc})"
    return out


def workloads(args: argparse.Namespace, now_ms: int) -> dict[str, Workload]:
    """The unpaced ingest events and the paced runs' events, by phase."""
    out = {
        "ingest": Workload(
            users=args.users,
            seed=args.seed,
            start_ms=now_ms - DAY_MS,  # a day back, so every event time is valid
            events=args.events,
            rate=1_000_000,  # only sets the chunk size and the simulator's lanes here
            chunk_s=0.1,
            time_scale=3 * 3600,  # three event-hours per wall second spread sessions out
        )
    }
    paced = {
        "fresh": (args.fresh_rate, args.fresh_seconds),
        "fresh_high": (args.fresh_rate_high, args.fresh_seconds),
        "steady": (args.steady_rate, args.steady_seconds),
    }
    for k, (name, (rate, seconds)) in enumerate(paced.items()):
        out[name] = Workload(
            users=args.users,
            seed=args.seed + 1 + k,
            start_ms=now_ms - 3_600_000,
            events=round(rate * seconds),
            rate=rate,
            chunk_s=0.01,  # one send() every 10 ms
        )
    return out


def run_pipeline(
    args: argparse.Namespace, loads: dict[str, Workload], folder: Path
) -> dict[str, dict[str, Any]]:
    """The phases on a local Ray; ``nats_url`` is filled in by each phase's own server."""
    shape = phases.PoolShape(args.partitions, args.shards)

    def plan(load: Workload, paced: bool) -> PublishPlan:
        if not paced:
            return PublishPlan(
                "",
                args.partitions,
                load,
                paced=False,
                max_batch=args.max_batch,
                linger_ms=args.linger_ms,
                send_events=int(args.partitions * args.max_batch * 1.95),
            )
        return PublishPlan(
            "",
            args.partitions,
            load,
            paced=True,
            max_batch=args.fresh_max_batch,
            linger_ms=args.fresh_linger_ms,
        )

    out: dict[str, dict[str, Any]] = {}
    phases.init_ray(cpus=os.cpu_count() or 2)
    try:
        for name, profile_only in (("ingest", False), ("ingest_profile_only", True)):
            run_shape = dataclasses.replace(shape, insights=not profile_only)
            out[name] = asyncio.run(
                phases.ingest(folder, run_shape, plan(loads["ingest"], paced=False), name=name)
            )
            state = "complete" if out[name]["complete"] else "INCOMPLETE"
            print(f"  {name} {out[name]['events_per_s']:,.0f} events/s ({state})")
        for name in ("fresh", "fresh_high"):
            out[name] = asyncio.run(
                phases.freshness(
                    folder, shape, plan(loads[name], paced=True), args.fresh_warmup, name=name
                )
            )
            print(
                f"  {name} at {loads[name].rate:,.0f}/s: store->applied ms "
                f"{out[name]['store_to_applied_ms']}, insights lag ms "
                f"{out[name]['insights_lag_ms']}, {out[name]['events_per_message']:.0f} events/msg"
            )
        out["steady"] = asyncio.run(
            phases.steady_cpu(folder, shape, plan(loads["steady"], paced=True), args.steady_warmup)
        )
        print(
            f"  steady {loads['steady'].rate:,.0f}/s: shard CPU "
            f"{out['steady']['shard_cpu_us_per_event']:.1f} us/event"
        )
    finally:
        ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    now_ms = time.time_ns() // 1_000_000
    loads = workloads(args, now_ms)
    with tempfile.TemporaryDirectory(prefix="audience-bench-") as tmp:
        print("references (no Ray running yet):")
        refs = run_references(args, loads["ingest"], Path(tmp) / "csv")
        print("pipeline:")
        runs = run_pipeline(args, loads, Path(tmp))
    size = bytes_per_user(args.size_users, args.seed, now_ms - DAY_MS)
    print(f"state size: {size['bytes_per_user']:.0f} bytes/user at {size['users']:,} users")
    ingest, fresh, high = runs["ingest"], runs["fresh"], runs["fresh_high"]

    def ratio(ours: float, ref: float | None) -> float | None:
        return ours / ref if ref else None

    flink = refs["flink"].get("events_per_s")
    same = refs["flink_same_work"].get("events_per_s")
    result: dict[str, Any] = {
        "ingest_events_per_s": ingest["events_per_s"],
        "ingest_complete": ingest["complete"],
        "ingest_profile_only_events_per_s": runs["ingest_profile_only"]["events_per_s"],
        "plain_loop_events_per_s": refs["plain_loop"]["events_per_s"],
        "bytewax_events_per_s": refs["bytewax"].get("events_per_s"),
        "bytewax_skipped_reason": refs["bytewax"].get("reason"),
        "flink_events_per_s": flink,
        "flink_skipped_reason": refs["flink"].get("reason"),
        "flink_same_work_events_per_s": same,
        "flink_same_work_skipped_reason": refs["flink_same_work"].get("reason"),
        "ingest_vs_flink": ratio(ingest["events_per_s"], flink),
        "ingest_vs_flink_same_work": ratio(ingest["events_per_s"], same),
        "profile_only_vs_flink": ratio(runs["ingest_profile_only"]["events_per_s"], flink),
        "freshness_p50_ms": fresh["store_to_applied_ms"]["p50"],
        "freshness_p99_ms": fresh["store_to_applied_ms"]["p99"],
        "freshness_p99_ms_200k": high["store_to_applied_ms"]["p99"],
        "events_per_message_100k": fresh["events_per_message"],
        "insights_lag_p99_ms": fresh["insights_lag_ms"]["p99"],
        "snapshot_apply_pause_max_ms": max(
            (r["snapshot_apply_pause_max_ms"] or 0.0 for r in (fresh, high)), default=None
        ),
        "shard_cpu_us_per_event_1k": runs["steady"]["shard_cpu_us_per_event"],
        "bytes_per_user": size["bytes_per_user"],
        "targets": report.TARGETS,
        "shape": {"partitions": args.partitions, "shards": args.shards},
        **runs,
        "state_size": size,
        **refs,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "java": references.java_version(),
        },
        "versions": versions()
        | {k: refs[k]["version"] for k in ("bytewax", "flink") if refs[k].get("version")},
        "args": {k: str(v) for k, v in vars(args).items()},
        "smoke": args.smoke,
    }
    result["total_s"] = time.perf_counter() - started
    json_path, _ = report.write(result, args.out_dir)
    print()
    print(report.markdown(result))
    print(f"JSON: {json_path.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
