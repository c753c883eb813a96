"""Engagement per event-time bucket, as mergeable partial aggregates.

Each shard folds its applied batches into :class:`EngagementWindows`; the API
gathers every shard's :meth:`EngagementWindows.partials` on a timer and combines
them with :func:`merge_partials`, so a query reads one merged snapshot and never
scans users. Partials are plain data (dicts, lists, ints, bytes) for Ray and snapshots.

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

import operator
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from actors.batch import EventBatch
from actors.events import EVENT_TYPES, N_TYPES, TYPE_CODE, EventType
from actors.sketches import HyperLogLog, stable_hash64
from actors.state import iso_ms
from actors.windows import BucketStore, Granularity, LatenessPolicy, Watermarks, WindowConfig

MAX_TRACKED = 2000
TOP_KEEP = 50
HLL_PRECISION = 12
ACTIVE_USERS_RELATIVE_ERROR = HyperLogLog(HLL_PRECISION).relative_error
_DWELL = TYPE_CODE[EventType.DWELL]
_SESSION_START = TYPE_CODE[EventType.SESSION_START]

Partial = dict[str, Any]  # one bucket as plain data, see EngagementBucket.partial


class EngagementBucket:
    """The engagement of one bucket on one shard."""

    def __init__(self) -> None:
        self.events = [0] * N_TYPES
        self.users = HyperLogLog(HLL_PRECISION)
        self.dwell_ms = 0
        self.sessions = 0
        self.session_ms = 0
        self.items: Counter[str] = Counter()
        self.categories: Counter[str] = Counter()

    def partial(self) -> Partial:
        """This bucket as plain data that :func:`merge_buckets` combines."""
        return {
            "events": list(self.events),
            "users": self.users.to_bytes(),
            "active_users": round(self.users.count()),
            "dwell_ms": self.dwell_ms,
            "sessions": self.sessions,
            "session_ms": self.session_ms,
            "items": dict(self.items.most_common(TOP_KEEP)),
            "categories": dict(self.categories.most_common(TOP_KEEP)),
        }


def _fold(
    store: BucketStore[EngagementBucket],
    batch: EventBatch,
    rows: np.ndarray,
    hashes: np.ndarray,
    session_gaps_ms: np.ndarray,
) -> None:
    """Fold the events at ``rows`` of ``batch`` into their buckets of every granularity.

    ``hashes`` holds :func:`~actors.sketches.stable_hash64` of every user id of the
    batch, ``session_gaps_ms`` the session time each event of the batch adds.

    Sums are reduced per bucket with one numpy call each per granularity; user
    ids are hashed once per batch for the sketches; only the item/category
    counters are updated per event, at C speed (``itemgetter``, ``Counter.update``).
    """
    if rows.size == 0:
        return
    types = batch.type[rows].astype(np.int64)
    dwell = np.where(types == _DWELL, np.nan_to_num(batch.value[rows], nan=0.0), 0.0)
    dwell_ms = np.round(dwell * 1000).astype(np.int64)
    starts = (types == _SESSION_START).astype(np.int64)
    gaps = session_gaps_ms[rows]
    for routed in store.route(batch.ts[rows]):
        order, bounds = routed.order, routed.bounds
        heads = bounds[:-1]
        group = np.repeat(np.arange(len(heads)), np.diff(bounds))
        counts = np.bincount(group * N_TYPES + types[order], minlength=len(heads) * N_TYPES)
        per_type = counts.reshape(len(heads), N_TYPES).tolist()
        dwell_sums = np.add.reduceat(dwell_ms[order], heads).tolist()
        session_sums = np.add.reduceat(starts[order], heads).tolist()
        gap_sums = np.add.reduceat(gaps[order], heads).tolist()
        picked = rows[order].tolist()
        picked_hashes = hashes[rows[order]]
        edges = bounds.tolist()
        for g, bucket in enumerate(routed.aggregates):
            bucket.events = [a + b for a, b in zip(bucket.events, per_type[g], strict=True)]
            bucket.dwell_ms += dwell_sums[g]
            bucket.sessions += session_sums[g]
            bucket.session_ms += gap_sums[g]
            pick = _picker(picked[edges[g] : edges[g + 1]])
            bucket.users.add_hashes(picked_hashes[edges[g] : edges[g + 1]])
            _count_bounded(bucket.items, pick(batch.item_id))
            _count_bounded(bucket.categories, pick(batch.category))


def _picker(rows: list[int]) -> Callable[[list[Any]], Iterable[Any]]:
    """A function taking ``rows`` of a column list, at C speed (``itemgetter``)."""
    if len(rows) == 1:
        (row,) = rows
        return lambda column: (column[row],)
    return operator.itemgetter(*rows)


def _count_bounded(counter: Counter[str], ids: Iterable[str | None]) -> None:
    counter.update(ids)  # type: ignore[arg-type]  # None is counted, then removed
    counter.pop(None, None)  # type: ignore[call-overload]
    if len(counter) > MAX_TRACKED:
        kept = counter.most_common(MAX_TRACKED // 2)
        counter.clear()
        counter.update(dict(kept))


def empty_bucket() -> Partial:
    """The neutral element of :func:`merge_buckets`."""
    return EngagementBucket().partial()


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

    Lifecycle: :meth:`apply` on each batch (buckets beyond the retention are
    dropped as they age out; buckets hold only sketches of hashed ids, so a
    ``user_deleted`` event leaves the counts it is part of as they are),
    :meth:`partials` for the merge timer; the state is rebuilt by replaying the
    stream, like the rest of the shard.
    """

    def __init__(self, config: WindowConfig | None = None) -> None:
        self.config = config or WindowConfig()
        self.watermarks = Watermarks(self.config.allowed_lateness_ms)
        self.on_time: BucketStore[EngagementBucket] = BucketStore(
            EngagementBucket, self.config.retention
        )
        self.corrections: BucketStore[EngagementBucket] = BucketStore(
            EngagementBucket, self.config.retention
        )
        self.late_dropped = 0
        self.late_corrected = 0

    def apply(
        self,
        batch: EventBatch,
        partitions: np.ndarray,
        session_gaps_ms: np.ndarray | None = None,
    ) -> np.ndarray:
        """Fold a validated batch in; ``partitions[i]`` is the partition of event ``i``.

        Events of each partition must be in their arrival order (a concatenation
        of deliveries is), since that is what the partition's watermark follows.
        ``session_gaps_ms[i]`` is the session time event ``i`` adds, as
        :attr:`~actors.state.UserStateTable.last_session_gaps_ms` gives it
        (none: no session time).

        Returns:
            Which events were late, so other windows (conversion) apply the same rule.
        """
        late = np.zeros(len(batch), dtype=bool)
        if not len(batch):
            return late
        for partition in np.unique(partitions).tolist():
            rows = np.flatnonzero(partitions == partition)
            late[rows] = self.watermarks.late_mask(partition, batch.ts[rows])
        hashes = stable_hash64(batch.user_id)
        if session_gaps_ms is None:
            session_gaps_ms = np.zeros(len(batch), dtype=np.int64)
        gaps = np.asarray(session_gaps_ms, dtype=np.int64)
        _fold(self.on_time, batch, np.flatnonzero(~late), hashes, gaps)
        late_rows = np.flatnonzero(late)
        if self.config.policy is LatenessPolicy.DROP:
            self.late_dropped += late_rows.size
        else:
            self.late_corrected += late_rows.size
            _fold(self.corrections, batch, late_rows, hashes, gaps)
        return late

    def partials(self) -> dict[str, Any]:
        """Everything the merge step needs, as plain data (see :func:`merge_partials`)."""
        return {
            "buckets": _store_partials(self.on_time),
            "corrections": _store_partials(self.corrections),
            "late_dropped": self.late_dropped,
            "late_corrected": self.late_corrected,
            "watermarks": self.watermarks.all(),
        }


def _store_partials(store: BucketStore[EngagementBucket]) -> dict[str, dict[int, Partial]]:
    out: dict[str, dict[int, Partial]] = {g.value: {} for g in Granularity}
    for granularity, start, bucket in store.items():
        out[granularity.value][start] = bucket.partial()
    return out


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
