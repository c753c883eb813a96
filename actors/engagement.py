"""Engagement per event-time bucket, as mergeable partial aggregates.

Each shard folds its applied batches into :class:`EngagementWindows` (one
bucket set per partition, so a partition's windows move with it); the API
gathers every partition's :meth:`EngagementWindows.partials` on a timer and
combines them with :func:`merge_partials`, so a query reads one merged snapshot
and never scans users. Partials are plain data (dicts, lists, ints, bytes) for
Ray and snapshots.

Definitions, kept simple on purpose:

* active users: distinct user ids with at least one event in the bucket, as a
  :class:`~actors.sketches.HyperLogLog` of precision :data:`HLL_PRECISION` per
  bucket (4 KiB, however many users: exact sets cost gigabytes at 90 day
  buckets of a million users). Partials carry the registers and merge by
  register max, so the count is approximate (standard error
  :data:`ACTIVE_USERS_RELATIVE_ERROR`, 1.6 %; within an id or so below a few
  hundred users). A sketch cannot forget: a ``user_deleted`` event does not take
  the user out of buckets already counted, and only hashes of ids are kept.
* sessions: ``session_start`` events in the bucket.
* session time: active time within sessions, by the state table's session rule
  (:meth:`~actors.state.UserStateTable.apply`): an event that continues a session
  adds its gap after the user's earlier events, in the event's bucket, kept in
  integer milliseconds; a session crossing a bucket edge splits its time between
  the buckets. The average divides it by the bucket's sessions (null without any).
* dwell: the sum of ``value`` of ``dwell`` events, kept in integer milliseconds
  so that merging is exact in any order.
* items and categories: event counts per id. A bucket tracks at most
  :data:`MAX_TRACKED` ids (trimmed to the busiest half when it overflows) and a
  partial carries its :data:`TOP_KEEP` busiest, so the top of the merged list is
  exact while ids near the cut-off may be under-counted.

Rates (likes per active user, ...) are computed at read time from the sums.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from actors.batch import EventBatch
from actors.events import EVENT_TYPES, N_TYPES, TYPE_CODE, EventType
from actors.folded import Folded
from actors.sketches import HyperLogLog
from actors.state import iso_ms
from actors.windows import (
    BucketSlots,
    Granularity,
    LatenessPolicy,
    Watermarks,
    WindowConfig,
)

MAX_TRACKED = 2000
TOP_KEEP = 50
HLL_PRECISION = 12
ACTIVE_USERS_RELATIVE_ERROR = HyperLogLog(HLL_PRECISION).relative_error
_DWELL = TYPE_CODE[EventType.DWELL]
_SESSION_START = TYPE_CODE[EventType.SESSION_START]

Partial = dict[str, Any]  # one bucket as plain data, see _bucket_partial


def empty_bucket() -> Partial:
    """The neutral element of :func:`merge_buckets`."""
    return {
        "events": [0] * N_TYPES,
        "users": HyperLogLog(HLL_PRECISION).to_bytes(),
        "active_users": 0,
        "dwell_ms": 0,
        "sessions": 0,
        "session_ms": 0,
        "items": {},
        "categories": {},
    }


def merge_buckets(a: Partial, b: Partial) -> Partial:
    """Combine two bucket partials (associative and commutative; users may overlap)."""
    users = HyperLogLog.from_bytes(a["users"])
    users.merge(HyperLogLog.from_bytes(b["users"]))
    return {
        "events": [x + y for x, y in zip(a["events"], b["events"], strict=True)],
        "users": users.to_bytes(),
        "active_users": round(users.count()),
        "dwell_ms": a["dwell_ms"] + b["dwell_ms"],
        "sessions": a["sessions"] + b["sessions"],
        "session_ms": a["session_ms"] + b["session_ms"],
        "items": dict(Counter(a["items"]) + Counter(b["items"])),
        "categories": dict(Counter(a["categories"]) + Counter(b["categories"])),
    }


class EngagementWindows:
    """A shard's engagement: watermarks, on-time buckets, corrections, late counters.

    Every partition has its own buckets and counters. Lifecycle: :meth:`fold`
    (or :meth:`apply`) on each batch (buckets beyond the retention are dropped
    as they age out; buckets hold only sketches of hashed ids, so a
    ``user_deleted`` event leaves the counts it is part of as they are),
    :meth:`partials` for the merge timer, :meth:`export` / :meth:`insert` /
    :meth:`forget` when a partition moves; the state is rebuilt by replaying
    the stream, like the rest of the shard.
    """

    def __init__(self, config: WindowConfig | None = None) -> None:
        self.config = config or WindowConfig()
        self.watermarks = Watermarks(self.config.allowed_lateness_ms)
        self.on_time = _store(self.config)
        self.corrections = _store(self.config)
        self._dropped: dict[int, int] = {}  # partition -> late events dropped
        self._corrected: dict[int, int] = {}  # partition -> late events kept as corrections
        self._cache: dict[tuple[int, int], Partial] = {}  # (store, slot) -> partial

    def apply(
        self,
        batch: EventBatch,
        partitions: np.ndarray,
        session_gaps_ms: np.ndarray | None = None,
    ) -> np.ndarray:
        """:meth:`fold` for a batch on its own (``partitions[i]``: event ``i``'s partition)."""
        return self.fold(Folded.of(batch, partitions, session_gaps_ms))

    def fold(self, f: Folded) -> np.ndarray:
        """Fold applied events in (each partition's in its arrival order: its watermark follows it).

        Returns:
            Which events were late, so other windows (conversion) apply the same rule.
        """
        late = self.watermarks.late(f.partition, f.ts)
        if not len(f):
            return late
        _fold(self.on_time, f, np.flatnonzero(~late))
        late_rows = np.flatnonzero(late)
        if late_rows.size:
            correct = self.config.policy is LatenessPolicy.CORRECT
            counter = self._corrected if correct else self._dropped
            parts, counts = np.unique(f.partition[late_rows], return_counts=True)
            for p, n in zip(parts.tolist(), counts.tolist(), strict=True):
                counter[p] = counter.get(p, 0) + n
            if correct:
                _fold(self.corrections, f, late_rows)
        return late

    @property
    def late_dropped(self) -> int:
        """Late events dropped, over all partitions."""
        return sum(self._dropped.values())

    @property
    def late_corrected(self) -> int:
        """Late events kept as corrections, over all partitions."""
        return sum(self._corrected.values())

    def partitions(self) -> list[int]:
        """Partitions with any engagement state."""
        held = set(self.watermarks.all()) | set(self.on_time.partitions())
        return sorted(held | set(self.corrections.partitions()))

    def partials(self, partition: int | None = None) -> dict[str, Any]:
        """One partition's partial as plain data (see :func:`merge_partials`).

        Without a partition: every partition's, merged.
        """
        if partition is None:
            return merge_partials([self.partials(p) for p in self.partitions()])
        watermark = self.watermarks.watermark(partition)
        return {
            "buckets": self._store_partials(0, self.on_time, partition),
            "corrections": self._store_partials(1, self.corrections, partition),
            "late_dropped": self._dropped.get(partition, 0),
            "late_corrected": self._corrected.get(partition, 0),
            "watermarks": {} if watermark is None else {partition: watermark},
        }

    def _store_partials(
        self, which: int, store: BucketSlots, partition: int
    ) -> dict[str, dict[int, Partial]]:
        for slot in store.changed:
            self._cache.pop((which, slot), None)
        store.changed.clear()
        out: dict[str, dict[int, Partial]] = {}
        for g, starts in store.buckets(partition).items():
            out[g.value] = {}
            for start, slot in starts.items():
                cached = self._cache.get((which, slot))
                if cached is None:
                    cached = self._cache[(which, slot)] = _bucket_partial(store, slot)
                out[g.value][start] = cached
        return out

    def export(self, partition: int) -> dict[str, Any]:
        """One partition's engagement as plain data (see :meth:`insert`)."""
        return {
            "newest": self.watermarks.export(partition),
            "on_time": self.on_time.export(partition),
            "corrections": self.corrections.export(partition),
            "late_dropped": self._dropped.get(partition, 0),
            "late_corrected": self._corrected.get(partition, 0),
        }

    def insert(self, partition: int, data: dict[str, Any]) -> None:
        """Take over a partition exported by :meth:`export` (not held here)."""
        self.watermarks.insert(partition, data["newest"])
        self.on_time.insert(partition, data["on_time"])
        self.corrections.insert(partition, data["corrections"])
        for counter, key in (
            (self._dropped, "late_dropped"),
            (self._corrected, "late_corrected"),
        ):
            if data[key]:
                counter[partition] = int(data[key])

    def forget(self, partition: int) -> None:
        """Drop a partition (given to another shard)."""
        self.watermarks.forget(partition)
        self.on_time.forget(partition)
        self.corrections.forget(partition)
        self._dropped.pop(partition, None)
        self._corrected.pop(partition, None)

    def nbytes(self) -> int:
        """Bytes of the bucket arrays."""
        return self.on_time.nbytes() + self.corrections.nbytes()


def _store(config: WindowConfig) -> BucketSlots:
    columns = {"events": N_TYPES, "dwell_ms": 1, "sessions": 1, "session_ms": 1}
    return BucketSlots(
        config.retention, columns, HLL_PRECISION, ("items", "categories"), MAX_TRACKED
    )


def _fold(store: BucketSlots, f: Folded, rows: np.ndarray) -> None:
    """Fold the events at ``rows`` of ``f`` into their buckets of every granularity.

    Events are grouped by (partition, minute) cells; each sum is one
    ``bincount`` into the cells, then added to each granularity's buckets, the
    users one scatter: no per-event Python.
    """
    if rows.size == 0:
        return
    cells = store.cells(f.partition[rows], f.ts[rows])
    types = f.type[rows].astype(np.int64)
    store.add("events", cells, sub=types)
    dwell = np.where(types == _DWELL, np.nan_to_num(f.value[rows], nan=0.0), 0.0)
    store.add("dwell_ms", cells, np.round(dwell * 1000))
    store.add("sessions", cells, (types == _SESSION_START).astype(np.float64))
    store.add("session_ms", cells, f.session_gap_ms[rows].astype(np.float64))
    store.add_users(cells, f.user_hash[rows])
    store.count("items", cells, f.item[rows], f.item_names)
    store.count("categories", cells, f.category[rows], f.category_names)
    store.prune()


def _bucket_partial(store: BucketSlots, slot: int) -> Partial:
    """One bucket as plain data that :func:`merge_buckets` combines."""
    users = store.sketch(slot)
    return {
        "events": store.columns["events"][slot].tolist(),
        "users": users,
        "active_users": round(HyperLogLog.from_bytes(users).count()),
        "dwell_ms": int(store.columns["dwell_ms"][slot, 0]),
        "sessions": int(store.columns["sessions"][slot, 0]),
        "session_ms": int(store.columns["session_ms"][slot, 0]),
        "items": store.top("items", slot, TOP_KEEP),
        "categories": store.top("categories", slot, TOP_KEEP),
    }


def merge_partials(shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Combine the partials of shards into one view (users are merged as sketches)."""
    merged: dict[str, Any] = {
        "buckets": {g.value: {} for g in Granularity},
        "corrections": {g.value: {} for g in Granularity},
        "late_dropped": 0,
        "late_corrected": 0,
        "watermarks": {},
    }
    for shard in shards:
        for kind in ("buckets", "corrections"):
            for granularity, buckets in shard[kind].items():
                into = merged[kind][granularity]
                for start, bucket in buckets.items():
                    into[start] = merge_buckets(into[start], bucket) if start in into else bucket
        merged["late_dropped"] += shard["late_dropped"]
        merged["late_corrected"] += shard["late_corrected"]
        merged["watermarks"].update(shard["watermarks"])
    return merged


def report(
    merged: dict[str, Any],
    granularity: Granularity,
    start_ms: int | None = None,
    end_ms: int | None = None,
    include_late: bool = False,
    top: int = 10,
) -> dict[str, Any]:
    """Buckets of ``granularity`` starting in ``[start_ms, end_ms)``, with rates and totals.

    ``include_late`` adds each bucket's corrections (late events kept under the
    ``correct`` policy) to its numbers; ``late_events`` is reported either way.
    """
    buckets = merged["buckets"][granularity.value]
    corrections = merged["corrections"][granularity.value]
    starts = sorted(
        s
        for s in set(buckets) | set(corrections)
        if (start_ms is None or s >= start_ms) and (end_ms is None or s < end_ms)
    )
    rows = []
    total = empty_bucket()
    for start in starts:
        correction = corrections.get(start, empty_bucket())
        bucket = buckets.get(start, empty_bucket())
        if include_late:
            bucket = merge_buckets(bucket, correction)
        total = merge_buckets(total, bucket)
        end = start + granularity.width_ms
        row = {"start": iso_ms(start), "end": iso_ms(end), **describe(bucket, top)}
        row["late_events"] = sum(correction["events"])
        rows.append(row)
    totals = describe(total, top)
    del totals["active_users"]  # distinct users of several buckets do not add up
    for key in list(totals):
        if key.endswith("_per_active_user"):
            del totals[key]
    return {"buckets": rows, "totals": totals}


def describe(bucket: Partial, top: int = 10) -> dict[str, Any]:
    """A bucket partial as the JSON answer: sums, per-active-user rates, top ids.

    Rates divide by the rounded active-user estimate, so small buckets give
    the rates of their exact counts.
    """
    counts = dict(zip((t.value for t in EVENT_TYPES), bucket["events"], strict=True))
    active = bucket["active_users"]
    dwell_s = bucket["dwell_ms"] / 1000
    session_s = bucket["session_ms"] / 1000
    sessions = bucket["sessions"]

    def per_user(x: float) -> float:
        return x / active if active else 0.0

    return {
        "events": sum(counts.values()),
        "events_by_type": {k: v for k, v in counts.items() if v},
        "active_users": active,
        "likes": counts["like"],
        "shares": counts["share"],
        "comments": counts["comment"],
        "likes_per_active_user": per_user(counts["like"]),
        "shares_per_active_user": per_user(counts["share"]),
        "comments_per_active_user": per_user(counts["comment"]),
        "dwell_seconds": dwell_s,
        "dwell_seconds_per_active_user": per_user(dwell_s),
        "sessions": sessions,
        "session_seconds": session_s,
        "avg_session_seconds": session_s / sessions if sessions else None,
        "top_items": _top(bucket["items"], top),
        "top_categories": _top(bucket["categories"], top),
    }


def _top(counts: dict[str, int], n: int) -> list[dict[str, Any]]:
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [{"id": key, "events": count} for key, count in ranked]
