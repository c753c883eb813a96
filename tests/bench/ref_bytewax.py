"""Bytewax reference: a keyed ``stateful_map`` over the bench events, in memory.

Run by ``tests.bench.pipeline`` with the bench interpreter (Bytewax's pins clash
with Ray's), so it imports nothing from the project. The CSV parts are parsed
into ``(user_id, event)`` tuples before the clock starts; the clock covers
``run_main`` only: one worker, a :class:`TestingSource` over the list, a
per-user state (counts per type, first/last seen, dwell, revenue) and a sink
that drops everything. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import sys
import time
from importlib.metadata import version

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import TestingSource, run_main

N_TYPES = 13
DWELL, PURCHASE = 2, 7  # EventType codes


class _Drop(StatelessSinkPartition):
    def write_batch(self, items: list) -> None:
        pass


class DropSink(DynamicSink):
    """Discards its input, so only the stateful step is measured."""

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Drop:
        return _Drop()


def load(paths: list[str]) -> list[tuple[str, tuple[int, int, float]]]:
    """``(user_id, (type, ts, value))`` per CSV row; an empty value is 0.

    The rows are ``event_id, user_id, type, ts, value, item_id, category``
    (``tests.bench.workload.CSV_COLUMNS``).
    """
    out = []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            for _event, user, typ, ts, value, _item, _cat in csv.reader(f):
                out.append((user, (int(typ), int(ts), float(value) if value else 0.0)))
    return out


def update(state: list | None, event: tuple[int, int, float]) -> tuple[list, None]:
    """Fold one event into ``[counts, first, last, dwell, revenue]``."""
    typ, ts, value = event
    if state is None:
        state = [[0] * N_TYPES, ts, ts, 0.0, 0.0]
    state[0][typ] += 1
    if ts < state[1]:
        state[1] = ts
    if ts > state[2]:
        state[2] = ts
    if typ == DWELL:
        state[3] += value
    elif typ == PURCHASE:
        state[4] += value
    return state, None


def run(events: list, batch_size: int) -> float:
    """Seconds for one ``run_main`` over ``events``."""
    flow = Dataflow("bench")
    stream = op.input("events", flow, TestingSource(events, batch_size=batch_size))
    state = op.stateful_map("user_state", stream, update)
    op.output("drop", state, DropSink())
    started = time.perf_counter()
    run_main(flow)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", nargs="+", required=True)
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[1000, 1],
        help="TestingSource batch sizes to run; the first is the headline figure",
    )
    args = parser.parse_args()
    events = load(args.files)
    gc.collect()
    gc.freeze()  # the loaded input is not the engine's garbage; keep full GC passes off it
    runs = {size: run(events, size) for size in args.batch_sizes}
    headline = runs[args.batch_sizes[0]]
    print(
        json.dumps(
            {
                "engine": "bytewax",
                "version": version("bytewax"),
                "python": sys.version.split()[0],
                "events": len(events),
                "seconds": headline,
                "events_per_s": len(events) / headline,
                "batch_size": args.batch_sizes[0],
                "by_batch_size": {str(k): len(events) / v for k, v in runs.items()},
                "users": len({user for user, _ in events}),
            }
        )
    )


if __name__ == "__main__":
    main()
