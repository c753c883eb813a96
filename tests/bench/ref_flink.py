"""Flink SQL reference: a streaming ``GROUP BY user_id`` over the bench events.

Run by ``tests.bench.pipeline`` with the bench interpreter (``apache-flink``'s
pins clash with Ray's), so it imports nothing from the project. One JVM runs
INSERT jobs (filesystem CSV source, blackhole sink) over a small and a large
folder of the same events: one warm-up, then each size ``--repeats`` times. The
marginal rate ``(large - small) / (t_large - t_small)`` over the fastest run of
each size leaves JVM start-up, JIT warm-up and per-job deployment out, the way a
long-running Flink job would see it; a difference of two timings is doubly
sensitive to noise, hence the repeats. Streaming mode, parallelism 2,
mini-batch on (so the planner also splits the aggregate into local and global
phases). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import version

from pyflink.table import EnvironmentSettings, TableEnvironment

TYPE_NAMES = (
    "page_view", "click", "dwell", "like", "share", "comment", "add_to_cart", "purchase",
    "signup", "identify", "session_start", "session_end", "user_deleted",
)  # fmt: skip
DWELL, PURCHASE = 2, 7

SOURCE = """CREATE TEMPORARY TABLE {name} (
  event_id STRING, user_id STRING, `type` INT, ts BIGINT, `value` DOUBLE,
  item_id STRING, category STRING
) WITH ('connector' = 'filesystem', 'path' = '{path}', 'format' = 'csv',
        'csv.null-literal' = '')"""


def sink_ddl() -> str:
    """A blackhole table with one column per aggregate of :func:`query`."""
    per_type = ", ".join(f"n_{t} BIGINT" for t in TYPE_NAMES)
    return (
        f"CREATE TEMPORARY TABLE sink (user_id STRING, events BIGINT, {per_type}, "
        "first_ts BIGINT, last_ts BIGINT, value_sum DOUBLE, dwell DOUBLE, revenue DOUBLE) "
        "WITH ('connector' = 'blackhole')"
    )


def query(source: str) -> str:
    """Per user: count, count per event type, first/last seen, value sums."""
    per_type = ", ".join(
        f"SUM(CASE WHEN `type` = {code} THEN 1 ELSE 0 END)" for code in range(len(TYPE_NAMES))
    )
    return (
        f"INSERT INTO sink SELECT user_id, COUNT(*), {per_type}, MIN(ts), MAX(ts), "
        f"SUM(`value`), SUM(CASE WHEN `type` = {DWELL} THEN `value` ELSE 0 END), "
        f"SUM(CASE WHEN `type` = {PURCHASE} THEN `value` ELSE 0 END) "
        f"FROM {source} GROUP BY user_id"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", required=True, help="folder of CSV parts")
    parser.add_argument("--small-events", type=int, required=True)
    parser.add_argument("--large", required=True, help="folder of CSV parts, a superset")
    parser.add_argument("--large-events", type=int, required=True)
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--allow-latency", default="200 ms")
    parser.add_argument("--mini-batch-size", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=2, help="runs per size; the fastest counts")
    args = parser.parse_args()

    started = time.perf_counter()
    env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
    config = env.get_config()
    config.set("parallelism.default", str(args.parallelism))
    config.set("table.exec.mini-batch.enabled", "true")
    config.set("table.exec.mini-batch.allow-latency", args.allow_latency)
    config.set("table.exec.mini-batch.size", str(args.mini_batch_size))
    env.execute_sql(SOURCE.format(name="events_small", path=args.small))
    env.execute_sql(SOURCE.format(name="events_large", path=args.large))
    env.execute_sql(sink_ddl())
    startup = time.perf_counter() - started

    env.execute_sql(query("events_small")).wait()  # warm-up: class loading and JIT
    warmup = time.perf_counter() - started - startup
    runs: dict[str, list[float]] = {"small": [], "large": []}
    for _ in range(args.repeats):
        for name in runs:
            t0 = time.perf_counter()
            env.execute_sql(query(f"events_{name}")).wait()
            runs[name].append(time.perf_counter() - t0)
    seconds = {name: min(times) for name, times in runs.items()}  # least disturbed run
    extra_events = args.large_events - args.small_events
    extra_seconds = seconds["large"] - seconds["small"]
    print(
        json.dumps(
            {
                "engine": "flink",
                "version": version("apache-flink"),
                "python": sys.version.split()[0],
                "parallelism": args.parallelism,
                "mini_batch": {"allow_latency": args.allow_latency, "size": args.mini_batch_size},
                "startup_s": startup,
                "warmup_s": warmup,
                "runs_s": runs,
                "small": {"events": args.small_events, "seconds": seconds["small"]},
                "large": {"events": args.large_events, "seconds": seconds["large"]},
                "events": extra_events,
                "seconds": extra_seconds,
                "events_per_s": extra_events / extra_seconds if extra_seconds > 0 else None,
                "whole_job_events_per_s": args.large_events / seconds["large"],
            }
        )
    )


if __name__ == "__main__":
    main()
