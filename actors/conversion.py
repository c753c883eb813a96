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
Events of users deleted in the same batch stay out, as in retention. Buckets
are kept per partition (the attempts live with the users' rows), so a
partition's funnel moves with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.batch import EventBatch
from actors.engagement import HLL_PRECISION
from actors.events import N_TYPES, TYPE_CODE, EventType
from actors.folded import Folded
from actors.sketches import HyperLogLog
from actors.windows import BucketSlots, Granularity, LatenessPolicy, WindowConfig

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

    def export(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The attempts of ``rows`` (a partition's users), in their order."""
        self._ensure(int(rows.max(initial=-1)) + 1)
        return {"reached": self.reached[rows], "at": self.at[rows]}

    def insert(self, rows: np.ndarray, data: dict[str, np.ndarray]) -> None:
        """Attempts exported by :meth:`export`, for the users now at ``rows``."""
        self._ensure(int(rows.max(initial=-1)) + 1)
        self.reached[rows] = data["reached"]
        self.at[rows] = data["at"]

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


def empty_bucket(n_steps: int) -> Partial:
    """The neutral element of :func:`merge_buckets`."""
    return {
        "steps": [0] * n_steps,
        "revenue_milli": 0,
        "purchases": 0,
        "purchasers": HyperLogLog(HLL_PRECISION).to_bytes(),
    }


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
    """A shard's funnel: per-user attempts, on-time buckets and late corrections, per partition.

    Lifecycle: :meth:`fold` (or :meth:`apply`) after the state table applied a
    batch (rows come from it), :meth:`forget_rows` for rows of deleted users,
    :meth:`partials` for the merge timer, :meth:`export` / :meth:`insert` /
    :meth:`forget` when a partition moves; rebuilt by replaying the stream,
    like the rest of the shard.
    """

    def __init__(self, spec: FunnelSpec | None = None, config: WindowConfig | None = None) -> None:
        self.spec = spec or FunnelSpec()
        self.config = config or WindowConfig()
        self.tracker = FunnelTracker(self.spec)
        self.on_time = _store(self.spec, self.config)
        self.corrections = _store(self.spec, self.config)

    def apply(
        self,
        batch: EventBatch,
        rows: np.ndarray,
        late: np.ndarray,
        partitions: np.ndarray | None = None,
    ) -> None:
        """:meth:`fold` for a batch on its own, with its users' table ``rows``."""
        self.fold(Folded.of(batch, partitions, rows=rows), late)

    def fold(self, f: Folded, late: np.ndarray) -> None:
        """Advance attempts and count transitions and purchases into their buckets.

        Args:
            f: the events, in arrival order; rows of users not held (-1) are skipped.
            late: per event, whether engagement's watermarks found it late.
        """
        held = np.flatnonzero(f.row >= 0)
        if held.size == 0:
            return
        types = f.type[held].astype(np.int64)
        step = self.tracker.advance(f.row[held], types, f.ts[held])
        purchase = types == _PURCHASE
        keep = np.flatnonzero((step >= 0) | purchase)
        if keep.size == 0:
            return
        at, step = held[keep], step[keep]
        bought = purchase[keep]
        value = np.where(bought, np.nan_to_num(f.value[at], nan=0.0), 0.0)
        revenue = np.round(value * 1000)
        is_late = late[at]
        stores = [(self.on_time, ~is_late)]
        if self.config.policy is LatenessPolicy.CORRECT:
            stores.append((self.corrections, is_late))
        for store, chosen in stores:
            sel = np.flatnonzero(chosen)
            if not sel.size:
                continue
            cells = store.cells(f.partition[at[sel]], f.ts[at[sel]])
            steps = step[sel]
            made = (steps >= 0).astype(np.float64)
            store.add("steps", cells, made, sub=np.maximum(steps, 0))
            store.add("revenue_milli", cells, revenue[sel])
            buyers = bought[sel]
            store.add("purchases", cells, buyers.astype(np.float64))
            if buyers.any():
                store.add_users(cells.only(buyers), f.user_hash[at[sel]][buyers])
            store.prune()

    def forget_rows(self, rows: np.ndarray) -> None:
        """See :meth:`FunnelTracker.forget`."""
        self.tracker.forget(rows)

    def partitions(self) -> list[int]:
        """Partitions with any buckets."""
        return sorted(set(self.on_time.partitions()) | set(self.corrections.partitions()))

    def partials(self, partition: int | None = None) -> dict[str, Any]:
        """One partition's partial as plain data (see :func:`merge_partials`).

        Without a partition: every partition's, merged.
        """
        if partition is None:
            merged = merge_partials([self.partials(p) for p in self.partitions()])
            return merged | {"funnel": self.spec.describe()}
        return {
            "funnel": self.spec.describe(),
            "buckets": _store_partials(self.on_time, partition),
            "corrections": _store_partials(self.corrections, partition),
        }

    def export(self, partition: int) -> dict[str, Any]:
        """One partition's buckets as plain data (its attempts go with the table's rows)."""
        return {
            "on_time": self.on_time.export(partition),
            "corrections": self.corrections.export(partition),
        }

    def insert(self, partition: int, data: dict[str, Any]) -> None:
        """Take over a partition's buckets exported by :meth:`export`."""
        self.on_time.insert(partition, data["on_time"])
        self.corrections.insert(partition, data["corrections"])

    def forget(self, partition: int) -> None:
        """Drop a partition's buckets."""
        self.on_time.forget(partition)
        self.corrections.forget(partition)

    def nbytes(self) -> int:
        """Bytes of the attempts and bucket arrays."""
        return self.tracker.nbytes() + self.on_time.nbytes() + self.corrections.nbytes()


def _store(spec: FunnelSpec, config: WindowConfig) -> BucketSlots:
    columns = {"steps": len(spec.steps), "revenue_milli": 1, "purchases": 1}
    return BucketSlots(config.retention, columns, HLL_PRECISION)


def _store_partials(store: BucketSlots, partition: int) -> dict[str, dict[int, Partial]]:
    store.changed.clear()  # no cache here: partials are cheap without a count
    out: dict[str, dict[int, Partial]] = {}
    for g, starts in store.buckets(partition).items():
        out[g.value] = {
            start: {
                "steps": store.columns["steps"][slot].tolist(),
                "revenue_milli": int(store.columns["revenue_milli"][slot, 0]),
                "purchases": int(store.columns["purchases"][slot, 0]),
                "purchasers": store.sketch(slot),
            }
            for start, slot in starts.items()
        }
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
