"""Ending a subprocess that runs in a session of its own, and all it started, by pid.

Tests that run a bench or a Ray cluster in a subprocess (``start_new_session=True``)
end it here: Ray re-parents some of its processes, so children alone are not
enough; members of the subprocess's session are found too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import psutil


def end_session(
    process: subprocess.Popen[str] | subprocess.Popen[bytes], grace_s: float
) -> list[str]:
    """Kill ``process`` if it still runs, then whatever of its session or children remains.

    Returns what was still alive ``grace_s`` after the process itself ended:
    processes its own shutdown should have ended (they are killed too).
    """
    family = _family(process.pid)
    if process.poll() is None:  # not reaped yet, so the group id is still the process's
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    deadline = time.monotonic() + grace_s
    while (alive := [p for p in family + _family(process.pid) if _alive(p)]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    left = sorted({f"{p.pid} {_name(p)}" for p in alive})
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    return left


def _family(pid: int) -> list[psutil.Process]:
    """Descendants of ``pid`` and members of its session (orphans are re-parented)."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        found.update({p.pid: p for p in psutil.Process(pid).children(recursive=True)})
    for proc in psutil.process_iter():
        try:
            if proc.pid != pid and os.getsid(proc.pid) == pid:
                found[proc.pid] = proc
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return list(found.values())


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.NoSuchProcess:
        return "?"
