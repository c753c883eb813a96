"""Publish recorded history into a running platform: ``audience replay``.

History (a frame from :mod:`models.history`) goes out in frame order, which is
replay order, through the same :class:`~actors.producer.Producer` that live
traffic uses, so the shards apply it with the same code and the same checks.
``speed`` maps event time to wall time (86400: a day of history per second);
0 publishes as fast as the stream acknowledges.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
from nats.errors import Error as NatsError

from actors.errors import AudienceError, UnavailableError
from actors.nats_auth import NatsAuthError, NatsCredentials, redact_url
from actors.nats_auth import connect as nats_connect
from actors.producer import DEFAULT_LINGER_MS, Producer
from actors.validation import ValidationPolicy
from cluster.settings import Settings
from models.history import frame_to_batch, holdout_last, read_history, read_ratings

CHUNK_EVENTS = 5000
PACE_STEP_S = 0.05  # with a speed, no chunk spans more wall time than this
CONNECT_TIMEOUT_S = 10.0

Progress = Callable[[int, int], None]


class ReplayError(AudienceError):
    """A replay was asked for in a way that cannot work (bad option, nothing running)."""


@dataclass(frozen=True)
class ReplayReport:
    """What a replay published.

    Attributes:
        events: events accepted and acknowledged by the stream.
        messages: NATS messages they went out in.
        rejected: events the contract refused (sent to the dead-letter subjects).
        users: distinct users in the replayed frame.
        items: distinct items in the replayed frame.
        seconds: wall time from the first publish to the last acknowledgement.
    """

    events: int
    messages: int
    rejected: int
    users: int
    items: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        """Achieved publish rate."""
        return self.events / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        """The one line ``audience replay`` ends with."""
        return (
            f"replayed {self.events} events ({self.users} users, {self.items} items) "
            f"in {self.seconds:.1f} s ({self.events_per_s:,.0f} events/s), "
            f"{self.rejected} rejected"
        )


async def replay_history(
    nats_url: str,
    partitions: int,
    frame: pd.DataFrame,
    *,
    speed: float = 0.0,
    max_batch: int = 1000,
    linger_ms: float = DEFAULT_LINGER_MS,
    policy: ValidationPolicy | None = None,
    progress: Progress | None = None,
    chunk_events: int = CHUNK_EVENTS,
    stop: asyncio.Event | None = None,
    credentials: NatsCredentials | None = None,
) -> ReplayReport:
    """Publish a history frame in frame order and wait until the stream has all of it.

    Per-user order is kept end to end: the producer keeps the order of a
    partition's events, and a user's events all go to one partition.

    Args:
        nats_url: the platform's NATS.
        partitions: the platform's partition count P (must match the running one).
        frame: a history frame (see :mod:`models.history`), already in replay order.
        speed: event time per wall time; 0 publishes as fast as possible.
        max_batch: most events per NATS message.
        linger_ms: how long a partial per-partition batch may wait.
        policy: validation limits (the running platform's, ideally).
        progress: called as ``progress(handed_over, total)`` after each chunk.
        chunk_events: events converted and handed to the producer at a time.
        stop: when set, the replay ends early (after flushing what was sent).
        credentials: the NATS login (the producer role is enough).

    Raises:
        ValueError: ``speed`` is negative or ``chunk_events`` not positive.
        UnavailableError: NATS cannot be reached, or publishes were not acknowledged.
    """
    if speed < 0:
        raise ValueError(f"speed must be >= 0, got {speed}")
    if chunk_events < 1:
        raise ValueError(f"chunk_events must be >= 1, got {chunk_events}")
    total = len(frame)
    ts = frame["ts"].to_numpy(np.int64)
    bounds = _chunk_bounds(ts, speed, chunk_events)
    nc = await _connect(nats_url, credentials)
    producer = await Producer(
        nc.jetstream(), partitions, policy=policy, max_batch=max_batch, linger_ms=linger_ms
    ).start()
    started = time.monotonic()
    try:
        for start, stop_at in itertools.pairwise(bounds):
            if stop is not None and stop.is_set():
                break
            if speed > 0:
                due = started + (int(ts[start]) - int(ts[0])) / 1000 / speed
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await producer.send(frame_to_batch(frame.iloc[start:stop_at]))
            if progress is not None:
                progress(stop_at, total)
        await producer.close()
    finally:
        await nc.close()
    items = frame["item_id"].dropna()
    return ReplayReport(
        events=producer.published_events,
        messages=producer.published_messages,
        rejected=sum(producer.rejected.values()),
        users=int(frame["user_id"].nunique()),
        items=int(items.nunique()),
        seconds=time.monotonic() - started,
    )


def _chunk_bounds(ts: np.ndarray, speed: float, chunk_events: int) -> list[int]:
    """Row offsets cutting the frame into chunks: at most ``chunk_events`` rows each,
    and with a speed, no chunk longer than ``PACE_STEP_S`` of wall time."""
    n = len(ts)
    if n == 0:
        return [0]
    cuts = {0, n, *range(chunk_events, n, chunk_events)}
    if speed > 0:
        step = ((ts - ts[0]) / 1000 / speed // PACE_STEP_S).astype(np.int64)
        changes = np.flatnonzero(np.diff(step)) + 1
        cuts.update(changes.tolist())
        # A long quiet-then-busy stretch can still put many rows in one step:
        ordered = sorted(cuts)
        for start, stop in itertools.pairwise(ordered):
            cuts.update(range(start + chunk_events, stop, chunk_events))
    return sorted(cuts)


async def _connect(nats_url: str, credentials: NatsCredentials | None = None) -> Any:
    """A NATS connection that reconnects while replaying, but fails fast if never up."""
    errors: list[BaseException] = []

    async def remember(exc: Exception) -> None:
        errors.append(exc)

    try:
        return await asyncio.wait_for(
            nats_connect(
                nats_url,
                credentials,
                name="audience-replay",
                max_reconnect_attempts=-1,
                connect_timeout=2,
                error_cb=remember,
            ),
            timeout=CONNECT_TIMEOUT_S,
        )
    except NatsAuthError:
        raise
    except (asyncio.TimeoutError, OSError, NatsError) as exc:
        cause = errors[-1] if errors else exc
        detail = f"cannot connect to {redact_url(nats_url)}: {cause}"
        raise UnavailableError("nats", detail) from None


class ProgressBar:
    """A plain-text progress line on a stream: redrawn in place on a terminal, else every 10%.

    Call it as ``bar(done, total)``; call :meth:`close` once at the end.
    """

    def __init__(self, stream: TextIO | None = None, every_s: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._started = time.monotonic()
        self._drawn_at = -float("inf")
        self._decile = -1
        self._drew = False
        self._width = 0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.tty:
            if now - self._drawn_at < self.every_s and done < total:
                return
            text = self.line(done, total, now - self._started)
            self.stream.write("\r" + text.ljust(self._width))  # cover a longer last line
            self._width = max(self._width, len(text))
            self._drew = True
        else:
            decile = 10 if total == 0 else done * 10 // total
            if decile <= self._decile:
                return
            self._decile = decile
            self.stream.write(self.line(done, total, now - self._started) + "\n")
        self._drawn_at = now
        self.stream.flush()

    @staticmethod
    def line(done: int, total: int, seconds: float) -> str:
        """``replay  1,234/10,000 events  12.3%  5,678 events/s``."""
        percent = 100.0 if total == 0 else 100.0 * done / total
        rate = done / seconds if seconds > 0 else 0.0
        return f"replay  {done:,}/{total:,} events  {percent:5.1f}%  {rate:,.0f} events/s"

    def close(self) -> None:
        """End the redrawn line so that what follows starts on its own line."""
        if self.tty and self._drew:
            self.stream.write("\n")
            self.stream.flush()


def load_frame(
    ratings: Path | None, events: Path | None, movies: Path | None, holdout: bool
) -> pd.DataFrame:
    """The frame ``audience replay`` publishes: the chosen file, minus test items if asked.

    Raises:
        ReplayError: not exactly one of ``ratings`` / ``events``, or ``movies``
            without ``ratings``.
        models.history.HistoryError: the file cannot be read.
    """
    if (ratings is None) == (events is None):
        raise ReplayError("give exactly one of --ratings and --events")
    if ratings is not None:
        frame = read_ratings(ratings, movies)
    else:
        if movies is not None:
            raise ReplayError("--movies goes with --ratings")
        assert events is not None
        frame = read_history(events)
    if holdout:
        frame, _ = holdout_last(frame)
    return frame


def command(args: argparse.Namespace, settings: Settings) -> int:
    """``audience replay``: read the history, find the platform, publish, summarise."""
    from cluster.launcher import find_nats, nats_credentials_of, policy_of

    if args.speed < 0:
        raise ReplayError(f"--speed must be >= 0, got {args.speed}")
    frame = load_frame(args.ratings, args.events, args.movies, args.holdout_last)
    nats_url, partitions = find_nats(settings, args.nats_url)
    bar = ProgressBar(sys.stderr)
    try:
        report = asyncio.run(
            replay_history(
                nats_url,
                partitions,
                frame,
                speed=args.speed,
                max_batch=settings.batch_max_events,
                linger_ms=settings.linger_ms,
                policy=policy_of(settings),
                progress=bar,
                credentials=nats_credentials_of(settings, "producer"),
            )
        )
    finally:
        bar.close()
    print(report.summary(), flush=True)
    return 0
