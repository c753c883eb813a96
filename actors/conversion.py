"""Conversion funnels: per-user progress through ordered steps, counted per event-time bucket.

A :class:`FunnelSpec` names the steps (default ``page_view -> add_to_cart ->
purchase``) and a conversion window. Each user has one *attempt* at a time,
kept as two numpy columns keyed by the state table's row: the number of steps
reached ``r`` and the event time ``t`` of the latest event of step ``r``.
Events of a user are taken in arrival order (like sessions in
:mod:`actors.state`), and only events of a funnel type matter:

* a step-1 event starts a new attempt (step 1 reached, counted) when the user
  has none, when the attempt is complete, or when ``ts - t`` exceeds the window;
* an event of step ``r + 1`` advances the attempt (counted) when ``ts - t`` is at
  most the window. Arrival order decides the sequence, so a step stamped a
  little before the previous one still advances; the window only bounds how
  much later it may come;
* a repeat of the step the user is at (``r``) moves ``t`` to the later of the two
  times: the window runs from the latest event of the current step;
* anything else (a skipped step, an expired attempt's next step) changes nothing.

So counts are *step transitions*: attempts reaching each step. They depend only
on each user's events in arrival order, never on where batches are cut. A
transition is counted in the bucket of the event that made it, under the same
lateness rules as engagement (the per-user progress itself follows every event).
Purchases give revenue (the sum of ``value``, kept in integer thousandths so
merges are exact) and purchasing users, a :class:`~actors.sketches.HyperLogLog`
like engagement's active users (standard error :data:`PURCHASERS_RELATIVE_ERROR`).
Events of users deleted in the same batch stay out, as in retention.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.batch import EventBatch
from actors.engagement import HLL_PRECISION
from actors.events import N_TYPES, TYPE_CODE, EventType
from actors.sketches import HyperLogLog, stable_hash64
from actors.windows import BucketStore, Granularity, LatenessPolicy, WindowConfig

DEFAULT_STEPS = (EventType.PAGE_VIEW, EventType.ADD_TO_CART, EventType.PURCHASE)
PURCHASERS_RELATIVE_ERROR = HyperLogLog(HLL_PRECISION).relative_error
_PURCHASE = TYPE_CODE[EventType.PURCHASE]

Partial = dict[str, Any]  # one bucket as plain data, see ConversionBucket.partial


@dataclass(frozen=True)
class FunnelSpec:
    """The funnel: ordered, distinct event types and the window between consecutive steps.

    Attributes:
        steps: event types in funnel order (at least two, no repeats).
        window_ms: most event time allowed from one step to the next.
    """

    steps: tuple[EventType, ...] = DEFAULT_STEPS
    window_ms: int = 30 * 60_000

    def __post_init__(self) -> None:
        if len(self.steps) < 2 or len(set(self.steps)) != len(self.steps):
            raise ValueError("a funnel needs at least two distinct event types")
        if self.window_ms <= 0:
            raise ValueError("the conversion window must be positive")

    @classmethod
    def parse(cls, steps: str, window_s: float) -> FunnelSpec:
        """A spec from settings: comma-separated type names and a window in seconds.

        Raises:
            ValueError: on an unknown type, a repeat, fewer than two steps or a bad window.
        """
        names = [s.strip() for s in steps.split(",") if s.strip()]
        known = {t.value: t for t in EventType}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown event types {unknown}; known: {sorted(known)}")
        return cls(tuple(known[n] for n in names), round(window_s * 1000))

    def describe(self) -> dict[str, Any]:
        """The spec as JSON, for answers."""
        return {"steps": [s.value for s in self.steps], "window_s": self.window_ms / 1000}


class FunnelTracker:
    """Each user's current attempt, in two columns indexed by the state table's row."""

    def __init__(self, spec: FunnelSpec, capacity: int = 1024) -> None:
        self.spec = spec
        self._step_of = np.full(N_TYPES, -1, dtype=np.int64)
        for k, step in enumerate(spec.steps):
            self._step_of[TYPE_CODE[step]] = k
        self.reached = np.zeros(capacity, dtype=np.int8)
        self.at = np.zeros(capacity, dtype=np.int64)
        self.min_round = 16  # smaller rounds go one event at a time (see advance)

    def advance(self, rows: np.ndarray, types: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Apply events (in arrival order; rows >= 0) and say which step each one reached.

        The rules are sequential per user, so events are taken in rounds: the
        j-th funnel event of every user at once, with numpy. Once a round holds
        fewer than :attr:`min_round` users (a few very busy ones), the rest goes
        through the same rules one event at a time, which bounds the numpy calls.

        Returns:
            Per event, the 0-based step it made the user reach, or -1.
        """
        out = np.full(len(rows), -1, dtype=np.int64)
        steps = self._step_of[types]
        hit = np.flatnonzero(steps >= 0)
        if hit.size == 0:
            return out
        self._ensure(int(rows[hit].max()) + 1)
        users, local = np.unique(rows[hit], return_inverse=True)
        order = np.argsort(local, kind="stable")  # by user, arrival order kept
        user, step, t = local[order], steps[hit][order], ts[hit][order]
        head = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
        rank = np.arange(len(user)) - np.repeat(head, np.diff(np.r_[head, len(user)]))
        by_rank = np.argsort(rank, kind="stable")
        bounds = np.searchsorted(rank[by_rank], np.arange(int(rank.max()) + 2))
        reached = self.reached[users].astype(np.int64)
        at = self.at[users].copy()
        made = np.full(len(user), -1, dtype=np.int64)
        j = 0
        while j + 1 < len(bounds) and bounds[j + 1] - bounds[j] >= self.min_round:
            self._round(by_rank[bounds[j] : bounds[j + 1]], user, step, t, reached, at, made)
            j += 1
        if j + 1 < len(bounds):
            rest = np.sort(by_rank[bounds[j] :])  # sorted positions: user by user, in order
            self._one_by_one(rest, user, step, t, reached, at, made)
        self.reached[users], self.at[users] = reached, at
        out[hit[order]] = made
        return out

    def _round(
        self,
        idx: np.ndarray,
        user: np.ndarray,
        step: np.ndarray,
        t: np.ndarray,
        reached: np.ndarray,
        at: np.ndarray,
        made: np.ndarray,
    ) -> None:
        """One event per user (``idx``), all at once."""
        u, s, ts = user[idx], step[idx], t[idx]
        r, a = reached[u], at[u]
        gap = ts - a
        window, last = self.spec.window_ms, len(self.spec.steps)
        restart = (s == 0) & ((r == 0) | (r == last) | (gap > window))
        refresh = ~restart & (s == r - 1)
        advance = ~restart & ~refresh & (s == r) & (gap <= window)
        moved = restart | advance
        reached[u] = np.where(restart, 1, np.where(advance, r + 1, r))
        at[u] = np.where(moved, ts, np.where(refresh, np.maximum(a, ts), a))
        made[idx[moved]] = s[moved]

    def _one_by_one(
        self,
        idx: np.ndarray,
        user: np.ndarray,
        step: np.ndarray,
        t: np.ndarray,
        reached: np.ndarray,
        at: np.ndarray,
        made: np.ndarray,
    ) -> None:
        """The same rules as :meth:`_round`, event by event (``idx`` in per-user order)."""
        window, last = self.spec.window_ms, len(self.spec.steps)
        r_of, a_of = reached.tolist(), at.tolist()
        done = []
        for i, u, s, ts in zip(
            idx.tolist(), user[idx].tolist(), step[idx].tolist(), t[idx].tolist(), strict=True
        ):
            r, a = r_of[u], a_of[u]
            if s == 0 and (r == 0 or r == last or ts - a > window):
                r_of[u], a_of[u] = 1, ts
                done.append((i, 0))
            elif s == r - 1:
                a_of[u] = max(a, ts)
            elif s == r and ts - a <= window:
                r_of[u], a_of[u] = r + 1, ts
                done.append((i, s))
        reached[:], at[:] = r_of, a_of
        if done:
            where, reached_step = zip(*done, strict=True)
            made[list(where)] = reached_step

    def forget(self, rows: np.ndarray) -> None:
        """Drop the attempts of rows the table freed (deleted users), before they are reused."""
        rows = rows[(rows >= 0) & (rows < len(self.reached))]
        self.reached[rows] = 0
        self.at[rows] = 0

    def nbytes(self) -> int:
        """Bytes held by the columns."""
        return self.reached.nbytes + self.at.nbytes

    def _ensure(self, size: int) -> None:
        if size > len(self.reached):
            cap = max(size, 2 * len(self.reached))
            self.reached = np.concatenate(
                [self.reached, np.zeros(cap - len(self.reached), np.int8)]
            )
            self.at = np.concatenate([self.at, np.zeros(cap - len(self.at), np.int64)])


class ConversionBucket:
    """Step transitions, revenue and purchasers of one bucket on one shard."""

    def __init__(self, n_steps: int) -> None:
        self.steps = [0] * n_steps
        self.revenue_milli = 0
        self.purchases = 0
        self.purchasers = HyperLogLog(HLL_PRECISION)

    def partial(self) -> Partial:
        """This bucket as plain data that :func:`merge_buckets` combines."""
        return {
            "steps": list(self.steps),
            "revenue_milli": self.revenue_milli,
            "purchases": self.purchases,
            "purchasers": self.purchasers.to_bytes(),
        }


def empty_bucket(n_steps: int) -> Partial:
    """The neutral element of :func:`merge_buckets`."""
    return ConversionBucket(n_steps).partial()


def merge_buckets(a: Partial, b: Partial) -> Partial:
    """Combine two bucket partials (associative and commutative; purchasers may overlap)."""
    users = HyperLogLog.from_bytes(a["purchasers"])
    users.merge(HyperLogLog.from_bytes(b["purchasers"]))
    return {
        "steps": [x + y for x, y in zip(a["steps"], b["steps"], strict=True)],
        "revenue_milli": a["revenue_milli"] + b["revenue_milli"],
        "purchases": a["purchases"] + b["purchases"],
        "purchasers": users.to_bytes(),
    }


class ConversionWindows:
    """A shard's funnel: per-user attempts, on-time buckets and late corrections.

    Lifecycle: :meth:`apply` after the state table applied a batch (rows come
    from it), :meth:`forget` for rows of deleted users, :meth:`partials` for the
    merge timer; rebuilt by replaying the stream, like the rest of the shard.
    """

    def __init__(self, spec: FunnelSpec | None = None, config: WindowConfig | None = None) -> None:
        self.spec = spec or FunnelSpec()
        self.config = config or WindowConfig()
        self.tracker = FunnelTracker(self.spec)
        n = len(self.spec.steps)
        # A partial, not a lambda: the store is part of a shard snapshot (pickled).
        self.on_time = BucketStore(functools.partial(ConversionBucket, n), self.config.retention)
        self.corrections = BucketStore(
            functools.partial(ConversionBucket, n), self.config.retention
        )

    def apply(self, batch: EventBatch, rows: np.ndarray, late: np.ndarray) -> None:
        """Advance attempts and count transitions and purchases into their buckets.

        Args:
            batch: the batch, in arrival order.
            rows: state-table row per event, -1 for users not held (skipped).
            late: per event, whether engagement's watermarks found it late.
        """
        held = np.flatnonzero(rows >= 0)
        if held.size == 0:
            return
        types = batch.type[held].astype(np.int64)
        step = self.tracker.advance(rows[held], types, batch.ts[held])
        purchase = types == _PURCHASE
        keep = np.flatnonzero((step >= 0) | purchase)
        if keep.size == 0:
            return
        at, bought = held[keep], purchase[keep]
        value = np.where(bought, np.nan_to_num(batch.value[at], nan=0.0), 0.0)
        hashes = np.zeros(len(at), dtype=np.uint64)  # only purchasers are sketched
        buyers = np.flatnonzero(bought)
        hashes[buyers] = stable_hash64([batch.user_id[i] for i in at[buyers].tolist()])
        counted = _Counted(
            batch.ts[at], step[keep], np.round(value * 1000).astype(np.int64), bought, hashes
        )
        is_late = late[at]
        _fold(self.on_time, counted.take(np.flatnonzero(~is_late)), len(self.spec.steps))
        if self.config.policy is LatenessPolicy.CORRECT:
            _fold(self.corrections, counted.take(np.flatnonzero(is_late)), len(self.spec.steps))

    def forget(self, rows: np.ndarray) -> None:
        """See :meth:`FunnelTracker.forget`."""
        self.tracker.forget(rows)

    def partials(self) -> dict[str, Any]:
        """Everything the merge step needs, as plain data (see :func:`merge_partials`)."""
        return {
            "funnel": self.spec.describe(),
            "buckets": _store_partials(self.on_time),
            "corrections": _store_partials(self.corrections),
        }


@dataclass(frozen=True)
class _Counted:
    """Events that made a transition or are purchases, as columns."""

    ts: np.ndarray
    step: np.ndarray
    revenue_milli: np.ndarray
    purchase: np.ndarray
    hashes: np.ndarray

    def take(self, idx: np.ndarray) -> _Counted:
        return _Counted(*(column[idx] for column in vars(self).values()))


def _fold(store: BucketStore[ConversionBucket], c: _Counted, n: int) -> None:
    """Reduce counted events per bucket with a few numpy calls per granularity."""
    for routed in store.route(c.ts):
        order, bounds = routed.order, routed.bounds
        heads = bounds[:-1]
        group = np.repeat(np.arange(len(heads)), np.diff(bounds))
        step = c.step[order]
        has = step >= 0
        per_step = np.bincount(group[has] * n + step[has], minlength=len(heads) * n)
        steps = per_step.reshape(len(heads), n).tolist()
        revenue = np.add.reduceat(c.revenue_milli[order], heads).tolist()
        bought = c.purchase[order]
        purchases = np.add.reduceat(bought.astype(np.int64), heads).tolist()
        hashes = c.hashes[order]
        edges = bounds.tolist()
        for g, bucket in enumerate(routed.aggregates):
            bucket.steps = [a + b for a, b in zip(bucket.steps, steps[g], strict=True)]
            bucket.revenue_milli += revenue[g]
            bucket.purchases += purchases[g]
            if purchases[g]:
                lo, hi = edges[g], edges[g + 1]
                bucket.purchasers.add_hashes(hashes[lo:hi][bought[lo:hi]])


def _store_partials(store: BucketStore[ConversionBucket]) -> dict[str, dict[int, Partial]]:
    out: dict[str, dict[int, Partial]] = {g.value: {} for g in Granularity}
    for granularity, start, bucket in store.items():
        out[granularity.value][start] = bucket.partial()
    return out


def merge_partials(shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Combine the partials of shards (all running the same funnel) into one view.

    Raises:
        ValueError: if shards run different funnels.
    """
    funnel = shards[0]["funnel"] if shards else FunnelSpec().describe()
    merged: dict[str, Any] = {
        "funnel": funnel,
        "buckets": {g.value: {} for g in Granularity},
        "corrections": {g.value: {} for g in Granularity},
    }
    for shard in shards:
        if shard["funnel"] != funnel:
            raise ValueError(f"shards run different funnels: {funnel} and {shard['funnel']}")
        for kind in ("buckets", "corrections"):
            for granularity, buckets in shard[kind].items():
                into = merged[kind][granularity]
                for start, bucket in buckets.items():
                    into[start] = merge_buckets(into[start], bucket) if start in into else bucket
    return merged
