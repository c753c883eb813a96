"""CPU accounting on a shared machine: who used the cores during a measurement.

The bench runs on two cores that other people's processes also use. Each
timed phase first waits (briefly) for the machine to be quiet, and records the
CPU seconds of every process that matters, so a slow result can be told apart
from a busy neighbour.
"""

from __future__ import annotations

import time

import psutil


class CpuMeter:
    """CPU seconds per named process, the rest of this process tree, and everyone else.

    ``foreign`` is CPU used by processes outside this bench's process tree.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self._named = pids
        self._before: dict[int, float] = {}
        self._machine_busy = 0.0
        self._wall = 0.0

    @staticmethod
    def _tree() -> dict[int, float]:
        out = {}
        for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
            try:
                times = proc.cpu_times()
                out[proc.pid] = times.user + times.system
            except psutil.Error:
                continue
        return out

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))

    def start(self) -> None:
        self._before = self._tree()
        self._machine_busy = self._busy()
        self._wall = time.perf_counter()

    def stop(self) -> dict[str, float]:
        """CPU seconds by name, ``own_other`` (Ray daemons...), ``foreign``, ``idle``."""
        after = self._tree()
        used = {pid: after[pid] - self._before.get(pid, 0.0) for pid in after}
        wall = time.perf_counter() - self._wall
        busy = self._busy() - self._machine_busy
        out = {name: round(used.get(pid, 0.0), 2) for name, pid in self._named.items()}
        own = sum(used.values())
        out["own_other"] = round(own - sum(out.values()), 2)
        out["foreign"] = round(max(0.0, busy - own), 2)
        out["idle"] = round(max(0.0, (psutil.cpu_count() or 1) * wall - busy), 2)
        out["wall_s"] = round(wall, 2)
        return out


def background_busy(seconds: float = 1.0) -> float:
    """Share of the machine (0..1) used by processes outside this bench's tree."""
    meter = CpuMeter({})
    meter.start()
    time.sleep(seconds)
    cpu = meter.stop()
    return cpu["foreign"] / ((psutil.cpu_count() or 1) * cpu["wall_s"])


QUIET_WAIT_S = 30.0  # how long a phase waits for a quiet machine; a smoke run sets 0


def wait_for_quiet(max_wait_s: float | None = None, threshold: float = 0.25) -> float:
    """Wait (up to ``max_wait_s``) until other processes use under ``threshold`` of the CPUs.

    Returns the last measured share, which the report shows next to the results.
    """
    deadline = time.monotonic() + (QUIET_WAIT_S if max_wait_s is None else max_wait_s)
    share = background_busy()
    while share > threshold and time.monotonic() < deadline:
        share = background_busy()
    return round(share, 3)
