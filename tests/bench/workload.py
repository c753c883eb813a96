"""The events every engine of the bench sees, and the files the reference engines read.

The publisher process and the main process both call :func:`generate` with the
same :class:`Workload`; the simulator is deterministic, so both hold identical
events without shipping gigabytes between processes. The reference engines run
under another interpreter (their pins clash with Ray's), so they get the events
as CSV part files: Flink's filesystem connector reads CSV natively, splits work
per file (so several parts keep both source subtasks busy), and Python's ``csv``
module parses it fast enough to load before timing.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actors.batch import EventBatch
from actors.events import EVENT_TYPES
from actors.simulator import AudienceModel, Simulator

# Columns of the CSV files, in order; empty fields are nulls (no value, no item).
CSV_COLUMNS = ("event_id", "user_id", "type", "ts", "value", "item_id", "category")
TYPE_NAMES = tuple(t.value for t in EVENT_TYPES)


@dataclass(frozen=True)
class Workload:
    """Simulator arguments that fix a sequence of chunks exactly.

    Attributes:
        users: audience size.
        seed: simulator seed.
        start_ms: event time of the first event.
        events: total events (``rate * duration``).
        rate: events per wall second; chunks are ``rate * chunk_s`` events.
        chunk_s: wall seconds per chunk (the pacing step of a paced run).
        time_scale: event seconds per wall second (spreads sessions out).
    """

    users: int
    seed: int
    start_ms: int
    events: int
    rate: float
    chunk_s: float
    time_scale: float = 1.0

    @property
    def duration_s(self) -> float:
        """Wall seconds the workload covers at ``rate``."""
        return self.events / self.rate


def generate(workload: Workload) -> list[tuple[float, EventBatch]]:
    """(wall offset, batch) per chunk; a flat daily cycle keeps event time linear."""
    sim = Simulator(
        workload.users,
        workload.seed,
        workload.start_ms,
        model=AudienceModel(daily_amplitude=0.0),
        time_scale=workload.time_scale,
    )
    chunks = sim.batches(workload.rate, workload.duration_s, chunk_s=workload.chunk_s)
    return [(c.wall_offset_s, c.batch) for c in chunks if len(c.batch)]


def slices(batch: EventBatch, size: int) -> list[EventBatch]:
    """``batch`` cut into consecutive pieces of ``size`` events (the last may be shorter)."""
    return [
        batch.take(np.arange(lo, min(lo + size, len(batch)))) for lo in range(0, len(batch), size)
    ]


def write_csv_parts(batch: EventBatch, folder: Path, part_events: int) -> list[Path]:
    """Write ``batch`` as ``part-NNN.csv`` files of ``part_events`` rows, in event order.

    The columns are :data:`CSV_COLUMNS`, no header.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(math.ceil(len(batch) / part_events)):
        lo, hi = k * part_events, min((k + 1) * part_events, len(batch))
        values = ["" if v != v else repr(v) for v in batch.value[lo:hi].tolist()]
        items = [x or "" for x in batch.item_id[lo:hi]]
        cats = [x or "" for x in batch.category[lo:hi]]
        rows = map(
            "{},{},{},{},{},{},{}\n".format,
            batch.event_id[lo:hi],
            batch.user_id[lo:hi],
            batch.type[lo:hi].tolist(),
            batch.ts[lo:hi].tolist(),
            values,
            items,
            cats,
        )
        path = folder / f"part-{k:03d}.csv"
        with open(path, "w", encoding="utf-8") as out:
            out.writelines(rows)
        paths.append(path)
    return paths


def link_parts(parts: list[Path], folder: Path) -> None:
    """A folder holding ``parts`` (hard links, so a sub-dataset costs no disk writes)."""
    folder.mkdir(parents=True, exist_ok=True)
    for part in parts:
        target = folder / part.name
        if not target.exists():
            os.link(part, target)
