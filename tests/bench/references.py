"""The reference engines on the bench events: plain Python loops, Bytewax and Flink SQL.

The plain loops run in this process on batches already in memory. Bytewax and
Flink run as subprocesses of the bench interpreter and report one JSON line;
anything that goes wrong there (missing Java, a crash, a timeout) becomes a
``None`` rate with the reason, never a failed bench.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from actors.batch import EventBatch
from actors.events import TYPE_CODE, EventType
from tests.support.reference_state import ReferenceState

HERE = Path(__file__).parent
_DWELL = TYPE_CODE[EventType.DWELL]
_PURCHASE = TYPE_CODE[EventType.PURCHASE]


def plain_loop(batches: list[EventBatch]) -> dict[str, Any]:
    """The project's event-by-event oracle (every state rule, one dict per user)."""
    state = ReferenceState()
    events = sum(len(b) for b in batches)
    started = time.perf_counter()
    for batch in batches:
        state.apply(batch)
    seconds = time.perf_counter() - started
    return {"events": events, "seconds": seconds, "events_per_s": events / seconds}


def plain_loop_simple(batches: list[EventBatch]) -> dict[str, Any]:
    """The updates Bytewax and Flink do (counts per type, first/last, dwell, revenue).

    The columns are turned into Python lists before the clock starts, as the
    Bytewax reference parses its input before timing.
    """
    columns = [(b.user_id, b.type.tolist(), b.ts.tolist(), b.value.tolist()) for b in batches]
    events = sum(len(b) for b in batches)
    users: dict[str, list[Any]] = {}
    started = time.perf_counter()
    for user_ids, types, stamps, values in columns:
        for user, typ, ts, value in zip(user_ids, types, stamps, values, strict=True):
            s = users.get(user)
            if s is None:
                s = users[user] = [[0] * 13, ts, ts, 0.0, 0.0]
            s[0][typ] += 1
            if ts < s[1]:
                s[1] = ts
            if ts > s[2]:
                s[2] = ts
            if typ == _DWELL:
                s[3] += value if value == value else 0.0
            elif typ == _PURCHASE:
                s[4] += value if value == value else 0.0
    seconds = time.perf_counter() - started
    return {"events": events, "seconds": seconds, "events_per_s": events / seconds}


def run_reference(command: list[str], timeout_s: float) -> dict[str, Any]:
    """Run a reference script; its last JSON line, or ``events_per_s: None`` and why."""
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"events_per_s": None, "reason": f"{type(exc).__name__}: {exc}"}
    wall = time.perf_counter() - started
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            try:
                result: dict[str, Any] = json.loads(line)
            except json.JSONDecodeError:
                continue
            result["wall_s"] = wall
            return result
    return {
        "events_per_s": None,
        "reason": f"exit code {done.returncode}: {_cause(done.stderr or done.stdout)}",
        "wall_s": wall,
    }


def _cause(output: str) -> str:
    """The most telling line of a failed run: the root Java cause or the last exception."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    found = [line for line in lines if line.startswith("Caused by:")] or [
        line for line in lines if re.match(r"^([\w.$]+(Exception|Error)\b)", line)
    ]
    return (found[-1] if found else " | ".join(lines[-3:]))[:400]


def bytewax(python: str, files: list[Path], timeout_s: float = 600) -> dict[str, Any]:
    """Bytewax keyed ``stateful_map`` over ``files`` (see ``ref_bytewax.py``)."""
    script = HERE / "ref_bytewax.py"
    return run_reference([python, str(script), "--files", *map(str, files)], timeout_s)


def flink(
    python: str,
    small: Path,
    small_events: int,
    large: Path,
    large_events: int,
    parallelism: int = 2,
    timeout_s: float = 600,
) -> dict[str, Any]:
    """Flink SQL ``GROUP BY user_id``, marginal rate between two sizes (see ``ref_flink.py``)."""
    java = java_version()
    if java is None:
        return {"events_per_s": None, "reason": "java not found on PATH (Flink needs a JVM)"}
    command = [python, str(HERE / "ref_flink.py")]
    command += ["--small", str(small), "--small-events", str(small_events)]
    command += ["--large", str(large), "--large-events", str(large_events)]
    command += ["--parallelism", str(parallelism)]
    result = run_reference(command, timeout_s)
    result["java"] = java
    return result


def flink_same_work(
    python: str,
    small: Path,
    small_events: int,
    large: Path,
    large_events: int,
    events: tuple[int, int] = (250_000, 1_000_000),
    operator_events: tuple[int, int] | None = (250_000, 1_000_000),
    parallelism: int = 2,
    timeout_s: float = 900,
) -> dict[str, Any]:
    """Flink SQL doing the platform's work as one job, and each query alone.

    See ``ref_flink_same_work.py``: de-duplication feeding the per-user profile,
    30-minute sessions, per-minute and per-hour engagement, the hourly top 10
    items and the page_view -> add_to_cart -> purchase funnel. The events are the
    first ``events`` (small, large) of the CSV parts (``small`` holds the first
    ``small_events``, ``large`` all ``large_events``); the rate is marginal
    between the two sizes, like :func:`flink`. ``operator_events`` sizes the
    one-query runs (``None``: skip them). Returns ``events_per_s`` (None and a
    ``reason`` on failure), ``per_operator`` (query name -> events/s, empty when
    skipped or failed), ``notes`` (what Flink could not express as asked) and the
    script's other keys.
    """
    java = java_version()
    if java is None:
        return {
            "events_per_s": None,
            "per_operator": {},
            "reason": "java not found on PATH (Flink needs a JVM)",
        }
    command = [python, str(HERE / "ref_flink_same_work.py")]
    command += ["--small", str(small), "--small-events", str(small_events)]
    command += ["--large", str(large), "--large-events", str(large_events)]
    command += ["--parallelism", str(parallelism), "--events", *map(str, events)]
    if operator_events is None:
        command.append("--no-per-operator")
    else:
        command += ["--operator-events", *map(str, operator_events)]
    result = run_reference(command, timeout_s)
    result.setdefault("per_operator", {})
    result["java"] = java
    return result


def java_version() -> str | None:
    """The first line of ``java -version``, or None when there is no Java."""
    java = shutil.which("java")
    if java is None:
        return None
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[0] if done.returncode == 0 and lines else None
