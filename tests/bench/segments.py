"""Cost of segment upkeep on a million-row state table: ``python -m tests.bench.segments``.

Prints the best of several runs for a full re-evaluation (what every insights
fold does, for time-driven entries and exits) and for one apply step's touched
rows. The random users are all recently active, the worst case for the
engagement and fading rules, which only look closer at candidate rows.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from actors.segments import SegmentTracker
from actors.state import DAY_MS, UserStateTable
from tests.support.events import T0, random_batch


def best_ms(run: Callable[[], None], repeat: int) -> float:
    """The fastest of ``repeat`` timed calls, in milliseconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1e3 * min(times)


def main() -> None:
    """Fill a table, then time ``refresh`` over all rows and ``update`` of one step."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--step", type=int, default=1000, help="events per apply step")
    args = parser.parse_args()
    table = UserStateTable(capacity=args.users)
    for seed in range(4):
        table.apply(random_batch(args.users, args.users, seed=seed))
    tracker = SegmentTracker()
    for days in (3, 12):
        now = T0 + days * DAY_MS
        tracker.refresh(table, now)
        full = best_ms(lambda: tracker.refresh(table, now + 3_600_000), 5)  # noqa: B023
        step = random_batch(args.step, args.users, seed=99)
        rows = np.unique(table.rows_of(step.user_id))
        touched = best_ms(lambda: tracker.update(table, rows, now), 20)  # noqa: B023
        print(
            f"now=T0+{days}d rows={table.high}: refresh {full:.1f} ms, "
            f"step of {args.step} events ({rows.size} rows) {1e3 * touched:.0f} us"
        )


if __name__ == "__main__":
    main()
