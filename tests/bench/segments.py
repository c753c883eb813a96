"""Cost of segment upkeep on a million-row state table: ``python -m tests.bench.segments``.

Prints the best of several runs for a full re-evaluation (what every insights
fold does, for time-driven entries and exits) and for one apply step's touched
rows. The random users are all recently active, the worst case for the
engagement and fading rules, which only look closer at candidate rows. Writes
``segments.json`` and ``segments.md`` to ``--out``.

``--smoke`` runs the same steps on a small table (see ``SMOKE``), for ``make test``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from actors.segments import SegmentTracker
from actors.state import DAY_MS, UserStateTable
from tests.bench.report import write_named
from tests.support.events import T0, random_batch

# --smoke: the defaults it changes (options given explicitly still win).
SMOKE: dict[str, Any] = {"users": 20_000, "step": 200, "repeat": 2}


def best_ms(run: Callable[[], None], repeat: int) -> float:
    """The fastest of ``repeat`` timed calls, in milliseconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1e3 * min(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a small run (make test runs it)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--step", type=int, default=1000, help="events per apply step")
    parser.add_argument(
        "--repeat", type=int, default=5, help="timed refreshes (4x as many step updates)"
    )
    if parser.parse_args(argv).smoke:
        parser.set_defaults(**SMOKE)
    return parser.parse_args(argv)


PARTITION = np.array([0])


def run(users: int, step_events: int, repeat: int) -> dict[str, Any]:
    """Fill a table, then time ``refresh`` over all rows and ``update`` of one step."""
    table = UserStateTable(capacity=users)
    for seed in range(4):
        table.apply(random_batch(users, users, seed=seed))
    tracker = SegmentTracker()
    points = []
    for days in (3, 12):
        now = T0 + days * DAY_MS
        tracker.advance(PARTITION, np.array([now]))  # the table's users are all of partition 0
        tracker.refresh(table)
        tracker.advance(PARTITION, np.array([now + 3_600_000]))
        full = best_ms(lambda: tracker.refresh(table), repeat)
        step = random_batch(step_events, users, seed=99)
        rows = np.unique(table.rows_of(step.user_id))
        touched = best_ms(lambda: tracker.update(table, rows), 4 * repeat)  # noqa: B023
        points.append(
            {
                "now_days": days,
                "rows": int(table.high),
                "refresh_ms": round(full, 3),
                "step_events": step_events,
                "step_rows": int(rows.size),
                "update_us": round(1e3 * touched, 1),
            }
        )
        print(
            f"now=T0+{days}d rows={table.high}: refresh {full:.1f} ms, "
            f"step of {step_events} events ({rows.size} rows) {1e3 * touched:.0f} us",
            flush=True,
        )
    return {"users": users, "rows": int(table.high), "repeat": repeat, "points": points}


def markdown(report: dict[str, Any]) -> str:
    rows = []
    for p in report["points"]:
        rows.append(
            (
                f"refresh of every row at T0+{p['now_days']}d (ms, best of {report['repeat']})",
                f"{p['refresh_ms']:.1f}",
                f"{p['rows']:,} rows",
            )
        )
        rows.append(
            (
                f"update of one apply step at T0+{p['now_days']}d (us)",
                f"{p['update_us']:.0f}",
                f"{p['step_events']:,} events, {p['step_rows']:,} rows",
            )
        )
    lines = ["| measure | value | size |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args.users, args.step, args.repeat)
    report["smoke"] = args.smoke
    write_named(args.out, "segments", report, markdown(report))


if __name__ == "__main__":
    main()
