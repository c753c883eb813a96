"""A shard's logic without Ray or NATS: decode deliveries, apply them, keep positions.

:class:`Shard` is what a :class:`~actors.shard_actor.ShardActor` runs; it is
plain Python so that tests and training can drive it directly.

One shard holds many partitions in one state: every step applies the events of
all its partitions in one vectorised pass, so a step costs the same however
many partitions it touches. Partitions are still the unit of ownership,
snapshots and hand-offs (like Flink's key groups): every part of the state is
kept per partition (each user row, bucket, sketch and counter belongs to one),
so :meth:`Shard.export` takes one partition out as plain data and
:meth:`Shard.insert` puts it into another shard, which goes on from its
position exactly as if it had held it all along.

Per-user state is updated at once (that is what freshness measures); the
insight aggregates are folded in later, in larger chunks and on a time budget
(:meth:`Shard.fold_due`), so their costs never ride on a small step nor come in
bursts. A partition being handed off is *released*: it no longer applies
events but keeps answering its users' queries until it is forgotten.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors import conversion as conversion_partials
from actors.batch import EventBatch
from actors.checkpoint import (
    SnapshotError,
    SnapshotHeader,
    decode_snapshot,
    encode_snapshot,
    fingerprint_of,
)
from actors.codec import decode
from actors.conversion import ConversionWindows, FunnelSpec
from actors.dedup import DedupConfig, EventDeduper
from actors.delivery import Delivery
from actors.engagement import EngagementWindows
from actors.engagement import merge_partials as merge_engagement
from actors.errors import NotOwner, WireError
from actors.events import TYPE_CODE, EventType
from actors.fold_queue import Applied, Chunk, FoldQueue, folded
from actors.items import ItemGraph, ItemGraphConfig
from actors.latency import LatencyRing
from actors.partitioning import partition_of
from actors.retention import RetentionAggregate, RetentionFolds
from actors.segments import SegmentTracker, merge_segments
from actors.state import StateRules, UserRows, UserStateTable
from actors.trends import TrendAggregate, TrendFolds
from actors.validation import Rejection, RejectReason, ValidationPolicy, check_batch, row_bytes
from actors.windows import WindowConfig

FRESHNESS_SAMPLES = 4096
FOLD_BUDGET_S = 0.005  # most time one call of fold_due spends: it delays the next step
FOLD_CHUNK_EVENTS = 2048  # events folded at a time (a call folds one or more)
REFRESH_EVERY_S = 5.0  # time-driven segment entries and exits are evaluated this often
MIN_SEEN_FILTER_BITS = 1 << 16
MIN_ITEM_PAIRS = 50_000
MIN_DEDUP_IDS = 100_000
_DELETED = TYPE_CODE[EventType.USER_DELETED]
_NO_ROWS = np.zeros(0, dtype=np.int64)
_PARTITION_FORMAT = 2  # what a partition's snapshot body holds (see Shard.export)


def partition_configs(
    partitions: int,
    rules: StateRules | None = None,
    items: ItemGraphConfig | None = None,
    dedup: DedupConfig | None = None,
) -> tuple[StateRules, ItemGraphConfig, DedupConfig]:
    """Per-partition shares of the memory bounds that were set for a whole stream.

    The seen-items filter, co-visitation pairs and remembered event ids are
    sized for all users; each partition holds about 1/P of them, so it gets
    about 1/P of each bound (with a floor), whatever the shard count.
    """
    rules, items, dedup = rules or StateRules(), items or ItemGraphConfig(), dedup or DedupConfig()
    bits = max(MIN_SEEN_FILTER_BITS, rules.seen_filter_bits // partitions)
    bits = 1 << (bits.bit_length() - 1)  # a power of two
    pairs = max(MIN_ITEM_PAIRS, items.max_pairs // partitions)
    return (
        dataclasses.replace(rules, seen_filter_bits=bits),
        dataclasses.replace(items, max_pairs=pairs, compact_every=min(items.compact_every, pairs)),
        dataclasses.replace(dedup, max_ids=max(MIN_DEDUP_IDS, dedup.max_ids // partitions)),
    )


@dataclass
class ApplyResult:
    """What one call to :meth:`Shard.apply` did."""

    applied: int = 0
    skipped_messages: int = 0
    rejected: list[Rejection] = field(default_factory=list)


def record_freshness(ring: LatencyRing, applied: Sequence[Delivery]) -> None:
    """Record the store-to-applied delay of each message just applied, in ms."""
    now_ns = time.time_ns()
    for delivery in applied:
        ring.add((now_ns - delivery.stored_ns) / 1e6)


def _keyed(
    rejected: list[Rejection], deliveries: Sequence[Delivery], sizes: Sequence[int]
) -> list[Rejection]:
    """Rejections keyed by where they sit in the stream (``partition.seq.row``).

    ``rejected`` index the concatenation of the deliveries' batches (``sizes``
    events each). A replay after a restore rejects the same rows again; the key
    becomes the dead letter's message id, so JetStream keeps one copy.
    """
    starts = np.cumsum([0, *sizes])
    keyed = []
    for r in rejected:
        at = int(np.searchsorted(starts, r.index, side="right")) - 1
        d = deliveries[at]
        keyed.append(dataclasses.replace(r, key=f"{d.partition}.{d.seq}.{r.index - starts[at]}"))
    return keyed


def _steps_ending_at_deletions(batch: EventBatch) -> list[tuple[int, int]]:
    """Cut ``batch`` right after each ``user_deleted`` event.

    The table removes a deleted user after the rest of its step; cutting there
    makes a deletion erase exactly the events before it in the stream, and the
    events after it start a new user, however the stream was cut into messages
    and apply steps (a restored shard replays in other steps than the original).
    """
    cuts = (np.flatnonzero(batch.type == _DELETED) + 1).tolist()
    bounds = [0, *(c for c in cuts if c < len(batch)), len(batch)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


@dataclass
class _Counters:
    """What operators see of one partition; moves with it."""

    applied_events: int = 0
    applied_messages: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


class Shard:
    """Per-user state and insight aggregates of a set of partitions, with their positions.

    Besides the per-user table it keeps, per partition, the partial aggregates
    that the API merges: event-time engagement windows
    (:class:`~actors.engagement.EngagementWindows`), cohort retention
    (:class:`~actors.retention.RetentionFolds`, fed with each event's
    first-seen from the table), decayed trends
    (:class:`~actors.trends.TrendFolds`) and the conversion funnel
    (:class:`~actors.conversion.ConversionWindows`, keyed by the table's rows and
    fed with engagement's late mask, so both apply one lateness rule). Segment
    memberships (:class:`~actors.segments.SegmentTracker`) follow each apply step
    for the rows it touched and the folds for all rows, as of each partition's
    newest event time. With ``insights`` off (profile-only) none of these is
    kept: per-user state, items and de-duplication only.

    Args:
        partition_count: the stream's partition count P; when given, a user
            whose id belongs to another partition than the one it arrived on is
            a dead letter (``wrong_partition``) and queries for users of
            partitions not held raise :class:`~actors.errors.NotOwner`.
    """

    def __init__(
        self,
        shard_id: int,
        partitions: Sequence[int],
        rules: StateRules | None = None,
        policy: ValidationPolicy | None = None,
        windows: WindowConfig | None = None,
        funnel: FunnelSpec | None = None,
        items: ItemGraphConfig | None = None,
        dedup: DedupConfig | None = None,
        partition_count: int | None = None,
        insights: bool = True,
    ) -> None:
        self.shard_id = shard_id
        self.partition_count = partition_count
        self.insights = insights
        # Snapshots taken under other state-shaping settings are refused on restore.
        self.fingerprint = fingerprint_of(
            rules or StateRules(),
            windows or WindowConfig(),
            funnel or FunnelSpec(),
            items or ItemGraphConfig(),
            dedup or DedupConfig(),
            insights,
            _PARTITION_FORMAT,
        )
        # Rows a deletion frees wait until the fold has seen the events before it.
        self.table = UserStateTable(rules or StateRules(), hold_deleted_rows=insights)
        self.items = ItemGraph(items)
        self.dedup = EventDeduper(dedup)
        self.engagement = EngagementWindows(windows)
        self.conversion = ConversionWindows(funnel, windows)
        self.retention = RetentionFolds()
        self.trends = TrendFolds()
        self.segments = SegmentTracker()
        self.policy = policy or ValidationPolicy()
        self.positions: dict[int, int] = {p: 0 for p in partitions}  # owned: applied
        self.released: dict[int, int] = {}  # held for queries only (-> position), until forgotten
        self._counters: dict[int, _Counters] = {p: _Counters() for p in partitions}
        self.freshness_ms = LatencyRing(FRESHNESS_SAMPLES)  # store-to-applied, per message
        self.busy_s = 0.0
        self.apply_ms = LatencyRing()
        self.fold_ms = LatencyRing()
        self.fold_s = 0.0  # time spent folding the insight aggregates, and how many events
        self.folded_events = 0
        self._queue = FoldQueue()
        self._paced = 0  # the queue's pushed count at the last fold_due
        self._paced_steps = 0  # the item graph's observed steps then
        self._refreshed_at = 0.0
        self._unrefreshed = False  # applied since the last segment refresh

    # -- partitions ------------------------------------------------------------------

    @property
    def partitions(self) -> list[int]:
        """The partitions this shard owns (applies events to)."""
        return sorted(self.positions)

    @property
    def held(self) -> list[int]:
        """Owned and released partitions: those whose users it answers for."""
        return sorted(set(self.positions) | set(self.released))

    @property
    def applied_events(self) -> int:
        """Events applied to the owned partitions (over their whole life)."""
        return sum(self._counters[p].applied_events for p in self.positions)

    @property
    def applied_messages(self) -> int:
        return sum(self._counters[p].applied_messages for p in self.positions)

    @property
    def rejected(self) -> Counter[str]:
        """Rejections per reason, over the owned partitions."""
        total: Counter[str] = Counter()
        for p in self.positions:
            total.update(self._counters[p].rejected)
        return total

    @property
    def event_now_ms(self) -> int | None:
        """The newest activity time applied, over the held partitions (segments' "now")."""
        nows = [self.segments.now[p] for p in self.held if p in self.segments.now]
        return max(nows, default=None)

    def add(self, partition: int) -> None:
        """Own a partition that has no state yet (nothing applied: position 0)."""
        if partition in self.held:
            raise SnapshotError(f"partition {partition} is held by shard {self.shard_id} already")
        self.positions[partition] = 0
        self._counters[partition] = _Counters()

    def release(self, partition: int) -> None:
        """Stop applying ``partition``; it answers its users' queries until forgotten."""
        self.released[partition] = self.positions.pop(partition)

    def own_again(self, partition: int, position: int) -> None:
        """Apply a released partition again, from ``position`` (a hand-off taken back)."""
        self.released.pop(partition, None)
        self.positions[partition] = position

    def forget(self, partition: int) -> None:
        """Drop a partition's state entirely (its new owner answers now)."""
        self.fold_insights()
        self.released.pop(partition, None)
        self.positions.pop(partition, None)
        self._counters.pop(partition, None)
        rows = self.table.forget(partition)
        self.segments.forget(partition, rows)
        self.conversion.forget_rows(rows)
        self.items.forget(partition)
        self.dedup.forget(partition)
        self.engagement.forget(partition)
        self.conversion.forget(partition)
        self.retention.forget(partition)
        self.trends.forget(partition)

    # -- applying ---------------------------------------------------------------------

    def apply(self, deliveries: Sequence[Delivery]) -> ApplyResult:
        """Decode, check and apply deliveries in order, all owned partitions in one pass.

        A delivery at or before its partition's position was applied already
        (a replay) and is skipped, as is one of a partition not owned; bodies
        that are not the wire format and rows that break a rule come back as
        rejections for the dead-letter subject.
        """
        started = time.perf_counter()
        result = ApplyResult()
        batches = []
        taken: list[Delivery] = []  # the decoded deliveries, one per batch
        for delivery in deliveries:
            position = self.positions.get(delivery.partition)
            if position is None or delivery.seq <= position:
                result.skipped_messages += 1
                continue
            self.positions[delivery.partition] = delivery.seq
            self._counters[delivery.partition].applied_messages += 1
            try:
                batch = decode(delivery.data)
            except WireError as exc:
                reason = RejectReason(exc.reason)
                key = f"{delivery.partition}.{delivery.seq}"
                result.rejected.append(Rejection(-1, reason, exc.detail, delivery.data, key))
                self._counters[delivery.partition].rejected[reason.value] += 1
                continue
            batches.append(batch)
            taken.append(delivery)
        if batches:
            result.applied = self._apply_batches(batches, taken, result)
        record_freshness(self.freshness_ms, taken)
        took = time.perf_counter() - started
        self.busy_s += took
        self.apply_ms.add(took * 1000)
        return result

    def _apply_batches(
        self, batches: list[EventBatch], taken: list[Delivery], result: ApplyResult
    ) -> int:
        # One check per step, not per message: its fixed costs dominate small messages.
        checked = check_batch(EventBatch.concat(batches), self.policy)
        sizes = [len(b) for b in batches]
        of_partition = np.repeat([d.partition for d in taken], sizes)
        stored = np.repeat([d.stored_ns // 1_000_000 for d in taken], sizes)  # per event
        batch = checked.batch
        rejected = list(checked.rejected)
        if rejected:
            keep = np.ones(len(of_partition), dtype=bool)
            keep[[r.index for r in rejected]] = False
            of_partition, stored = of_partition[keep], stored[keep]
        rows = self.table.rows_of(batch.user_id)  # looked up once for the whole step
        elsewhere = self._wrong_partition(batch, of_partition, rows)
        if elsewhere.size:
            total = len(of_partition) + len(rejected)
            origin = np.delete(np.arange(total), [r.index for r in rejected])  # input index
            for i in elsewhere.tolist():
                detail = f"its user belongs to another partition than {of_partition[i]}"
                raw = row_bytes(batch, i)
                rejected.append(
                    Rejection(int(origin[i]), RejectReason.WRONG_PARTITION, detail, raw)
                )
            kept = np.delete(np.arange(len(batch)), elsewhere)
            batch, of_partition, stored = batch.take(kept), of_partition[kept], stored[kept]
            rows = rows[kept]
        if rejected:
            keyed = _keyed(rejected, taken, sizes)
            result.rejected.extend(keyed)
            for r in keyed:
                partition = int((r.key or "").split(".", 1)[0])
                self._counters[partition].rejected[r.reason.value] += 1
        fresh = self.dedup.fresh(batch.event_id, stored, of_partition)
        if not fresh.all():  # the same event_id again: applied once
            at = np.flatnonzero(fresh)
            batch, of_partition, rows = batch.take(at), of_partition[at], rows[at]
        per = np.bincount(of_partition)
        for p in np.flatnonzero(per).tolist():
            self._counters[p].applied_events += int(per[p])
        for k, (start, stop) in enumerate(_steps_ending_at_deletions(batch)):
            # After a deletion the rows looked up before it may be stale: look again.
            known = rows[start:stop] if k == 0 else None
            self._apply_step(batch.slice(start, stop), of_partition[start:stop], known)
        return len(batch)

    def _wrong_partition(
        self, batch: EventBatch, partitions: np.ndarray, rows: np.ndarray
    ) -> np.ndarray:
        """Events whose user lives in another partition than the one they came on.

        A held user's partition is its row's (``rows``: the table's); a new
        user's is its id's (when P is known), else the partition of its first
        event in the step.
        """
        held = rows >= 0
        bad = np.zeros(len(batch), dtype=bool)
        if held.any():
            at = np.flatnonzero(held)
            bad[at] = self.table.partitions_of_rows(rows[at]) != partitions[at]
        new = np.flatnonzero(~held)
        if new.size:
            users = [batch.user_id[i] for i in new.tolist()]
            first: dict[str, int] = {}  # each new user's first partition in the step
            for user, p in zip(users, partitions[new].tolist(), strict=True):
                first.setdefault(user, p)
            if self.partition_count is not None:  # its id's partition, once per user
                count = self.partition_count
                first = {user: partition_of(user, count) for user in first}
            home = np.fromiter(map(first.__getitem__, users), np.int64, len(users))
            bad[new] = home != partitions[new]
        return np.flatnonzero(bad)

    def _apply_step(
        self, batch: EventBatch, partitions: np.ndarray, rows: np.ndarray | None = None
    ) -> None:
        """Apply checked, fresh events; a step holds at most one deletion, as its last event.

        The events before a deletion count in the aggregates like any activity
        (as they would had they come in an earlier step); the deletion then
        frees the user's row and leaves the user's segments.
        """
        n = len(batch)
        if batch.type[-1] != _DELETED:
            self._apply_activity(batch, partitions, rows)
            return
        self._apply_activity(
            batch.slice(0, n - 1), partitions[: n - 1], None if rows is None else rows[: n - 1]
        )
        deletion = batch.slice(n - 1, n)
        deleted = self.table.rows_of(deletion.user_id)
        deleted = deleted[deleted >= 0]
        parts = self.table.partitions_of_rows(deleted)
        self.table.apply(deletion, partitions[n - 1 :])  # the rows wait for the fold below
        if not self.insights:
            return  # the rows are free at once: no aggregate is keyed by them
        if deleted.size:
            self.segments.update(self.table, deleted, parts)
        self._queue.push(Applied.deletion(deleted, parts))

    def _apply_activity(
        self, batch: EventBatch, partitions: np.ndarray, rows: np.ndarray | None = None
    ) -> None:
        """Apply events that delete nobody to the table and everything that follows it."""
        if not len(batch):
            return
        self.table.apply(batch, partitions, rows)
        self.items.observe(self.table, batch, partitions, auto_flush=False)  # see fold_due
        newest = np.full(int(partitions.max()) + 1, -(2**62), dtype=np.int64)
        np.maximum.at(newest, partitions, batch.ts)
        touched = np.flatnonzero(newest > -(2**62))
        self.segments.advance(touched, newest[touched])  # each partition's "now", always
        self._unrefreshed = True
        if not self.insights:
            return  # profile-only: nothing to fold
        rows = self.table.last_rows
        self.segments.update(self.table, np.unique(rows))
        self._queue.push(
            Applied(
                batch,
                partitions,
                rows,
                self.table.first_seen_at(rows),
                self.table.last_session_gaps_ms,
                self.table.last_item_codes,
                self.table.last_category_codes,
                _NO_ROWS,
                time.monotonic(),
            )
        )

    # -- folding the aggregates ----------------------------------------------------------

    @property
    def pending_events(self) -> int:
        """Applied events the aggregates have not seen yet."""
        return self._queue.events

    @property
    def insights_lag_ms(self) -> LatencyRing:
        """How long each fold's oldest event had waited since it was applied."""
        return self._queue.lag_ms

    def insights_lag_s(self) -> float:
        """How long the oldest unfolded event has waited (0 when none waits)."""
        return self._queue.lag_s()

    def fold_due(self, budget_s: float = FOLD_BUDGET_S) -> int:
        """Fold waiting events if they are due (see :meth:`FoldQueue.due`); how many.

        Chunks of :data:`FOLD_CHUNK_EVENTS` go in oldest first: at least as many
        events as were applied since the last call (so folds keep pace and the
        lag stays bounded), then more until about ``budget_s`` is spent (so a
        backlog drains without a burst). The item graph's deferred steps follow
        the same rule, in steps, on every call.
        """
        started = time.perf_counter()
        folded = 0
        if self._queue.due():
            owed = self._queue.pushed - self._paced
            while self._queue and (folded < owed or time.perf_counter() - started < budget_s):
                folded += self._fold_chunk(FOLD_CHUNK_EVENTS)
        self._paced = self._queue.pushed
        if self.items.unflushed:
            owed_steps = self.items.observed_steps - self._paced_steps
            self.items.flush(deadline=started + budget_s, least=owed_steps)
        self._paced_steps = self.items.observed_steps
        if time.monotonic() - self._refreshed_at >= REFRESH_EVERY_S:
            self._refresh()
        return folded

    def fold_insights(self, refresh: bool = True) -> None:
        """Fold everything applied so far into the aggregates (and re-evaluate segments).

        Snapshots and exports call this, so the aggregates they hold are as far
        on as the positions (without ``refresh``: time-driven segment changes
        wait for the next refresh, on either side of a hand-off); tests call it
        to read the aggregates of what they applied.
        """
        while self._queue:
            self._fold_chunk(1 << 62)
        self.items.flush()
        if refresh and self._unrefreshed:
            self._refresh()

    def _refresh(self) -> None:
        """Time-driven segment entries and exits, for all rows."""
        self._refreshed_at = time.monotonic()
        self._unrefreshed = False
        if self.insights:
            self.segments.refresh(self.table)

    def _fold_chunk(self, most: int) -> int:
        """Fold up to ``most`` waiting events (up to the next deletion); how many."""
        return self._fold(self._queue.take(most))

    def _fold_partition(self, partition: int) -> None:
        """Fold what waits of one partition (before its export), leaving the others queued."""
        for chunk in self._queue.take_partition(partition):
            self._fold(chunk)
        self.items.flush(partition=partition)

    def _fold(self, chunk: Chunk) -> int:
        """Fold a chunk into the aggregates; how many events it held."""
        started = time.perf_counter()
        if chunk.deleted is not None:  # its rows' attempts go, then the rows are free
            self.conversion.forget_rows(chunk.deleted)
            self.table.free_rows(chunk.deleted)
        elif self.insights:
            f = folded(chunk.steps, self.table.items.names, self.table.categories.names)
            late = self.engagement.fold(f)
            self.conversion.fold(f, late)
            self.retention.fold(f)
            self.trends.fold(f)
        took = time.perf_counter() - started
        self.fold_ms.add(took * 1000)
        self.fold_s += took
        count = sum(len(s) for s in chunk.steps)
        self.folded_events += count
        return count

    # -- partials ----------------------------------------------------------------------

    def insights_partials(self, partition: int | None = None) -> dict[str, Any]:
        """Engagement, conversion, retention, trend and segment partials, as plain data.

        One partition's, or (None) every held partition's merged into one. What
        is folded so far: call :meth:`fold_insights` first to include everything.
        """
        if partition is None:
            self.fold_insights()
            return self._merged_partials()
        return {
            "engagement": self.engagement.partials(partition),
            "conversion": self.conversion.partials(partition),
            "retention": self.retention.partial(partition),
            "trends": self.trends.partial(partition),
            "segments": self.segments.sizes(partition),
        }

    def _merged_partials(self) -> dict[str, Any]:
        parts = [self.insights_partials(p) for p in self.held]
        retention = RetentionAggregate()
        trends = TrendAggregate()
        for part in parts:
            retention.merge(RetentionAggregate.restore(part["retention"]))
            trends.merge(TrendAggregate.from_dict(part["trends"]))
        return {
            "engagement": merge_engagement([p["engagement"] for p in parts]),
            "conversion": conversion_partials.merge_partials([p["conversion"] for p in parts])
            | {"funnel": self.conversion.spec.describe()},
            "retention": retention.snapshot(),
            "trends": trends.to_dict(),
            "segments": merge_segments([p["segments"] for p in parts]),
        }

    def segment_sizes(self) -> dict[str, Any]:
        """Segment sizes, entries and exits over the held partitions, and the newest ``now_ms``."""
        return merge_segments([self.segments.sizes(p) for p in self.held])

    def freshness_ring(self) -> tuple[int, np.ndarray]:
        """How many delays were ever recorded, and a copy of the ring holding the latest."""
        return self.freshness_ms.raw()

    # -- queries -----------------------------------------------------------------------

    def _check_held(self, user_ids: Sequence[str]) -> None:
        """Raise :class:`NotOwner` for users of partitions this shard does not hold."""
        if self.partition_count is None or not user_ids:
            return
        held = set(self.positions) | set(self.released)
        missing = sorted({partition_of(u, self.partition_count) for u in user_ids} - held)
        if missing:
            raise NotOwner(self.shard_id, missing)

    def profiles(self, user_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Live profiles of ``user_ids`` (None for users this shard has not seen).

        Each profile lists the segments its user is in as of its partition's event time.
        """
        self._check_held(user_ids)
        profiles = self.table.profiles(user_ids)
        rows = self.table.rows_of(user_ids).tolist()
        for profile, row in zip(profiles, rows, strict=True):
            if profile is not None:
                profile["segments"] = self.segments.of_row(self.table, row)
        return profiles

    def user_rows(self, user_ids: Sequence[str]) -> UserRows:
        """Model-feature state of ``user_ids`` as of their partitions' newest event times."""
        self._check_held(user_ids)
        rows = self.table.rows_of(user_ids)
        held = rows >= 0
        now = self.segments.now
        as_of = np.full(len(rows), np.iinfo(np.int64).min, dtype=np.int64)
        parts = self.table.partitions_of_rows(rows[held]).tolist()
        as_of[held] = [now.get(p, np.iinfo(np.int64).min) for p in parts]
        return self.table.user_rows(user_ids, as_of)

    def seen(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[list[bool]]:
        """Per (user, items) pair, which of the items the user has touched (may over-report)."""
        self._check_held([user for user, _ in pairs])
        return [self.table.seen(user, items).tolist() for user, items in pairs]

    def user_ids(self, limit: int) -> list[str]:
        """Up to ``limit`` ids of users this shard holds."""
        return self.table.users(limit)

    def item_partials(
        self, top_n: int = 100, known: dict[int, int | None] | None = None
    ) -> dict[int, dict[str, Any] | None]:
        """Each held partition's item stats and co-visitation (see :meth:`ItemGraph.partial`).

        None for a partition whose items did not change since the version
        ``known[p]`` (the caller keeps that one): an idle partition costs the merge nothing.
        """
        known = known or {}
        versions = {p: self.items.versions.get(p, 0) for p in self.held}
        changed = [p for p, v in versions.items() if known.get(p) is None or known[p] != v]
        fresh = self.items.partials(self.table, top_n, changed) if changed else {}
        return {p: {**fresh[p], "version": versions[p]} if p in fresh else None for p in versions}

    # -- snapshots and hand-offs --------------------------------------------------------

    def export(self, partition: int) -> dict[str, Any]:
        """One held partition's whole state and position, as plain data (a copy).

        Everything applied is folded first, so the aggregates are as far on as
        the position. The state holds no raw event (a deleted user's id is in
        no part of it); :meth:`insert` is the inverse.
        """
        self._fold_partition(partition)
        return self._export(partition)

    def _export(self, partition: int) -> dict[str, Any]:
        rows, table = self.table.export(partition)
        counters = self._counters.get(partition, _Counters())
        data: dict[str, Any] = {
            "partition": partition,
            "position": self.positions.get(partition, self.released.get(partition)),
            "table": table,
            "funnel": self.conversion.tracker.export(rows),
            "segments": self.segments.export(partition, rows),
            "items": self.items.export(self.table, partition),
            "dedup": self.dedup.export(partition),
            "counters": {
                "applied_events": counters.applied_events,
                "applied_messages": counters.applied_messages,
                "rejected": dict(counters.rejected),
            },
        }
        if self.insights:
            data |= {
                "engagement": self.engagement.export(partition),
                "conversion": self.conversion.export(partition),
                "retention": self.retention.export(partition),
                "trends": self.trends.export(partition),
            }
        return data

    def insert(self, data: dict[str, Any], position: int | None = None) -> None:
        """Own a partition from :meth:`export`'s data; it goes on from its position.

        Raises:
            SnapshotError: the partition is held here already.
        """
        partition = int(data["partition"])
        if partition in self.held:
            raise SnapshotError(f"partition {partition} is held by shard {self.shard_id} already")
        rows = self.table.insert(partition, data["table"])
        self.conversion.tracker.insert(rows, data["funnel"])
        self.segments.insert(partition, rows, data["segments"])
        self.items.insert(self.table, partition, data["items"])
        self.dedup.insert(partition, data["dedup"])
        if self.insights:
            self.engagement.insert(partition, data["engagement"])
            self.conversion.insert(partition, data["conversion"])
            self.retention.insert(partition, data["retention"])
            self.trends.insert(partition, data["trends"])
        counters = data["counters"]
        self._counters[partition] = _Counters(
            counters["applied_events"], counters["applied_messages"], Counter(counters["rejected"])
        )
        self.positions[partition] = int(data["position"] if position is None else position)

    def snapshot(
        self, created_ms: int, partitions: Sequence[int] | None = None
    ) -> tuple[SnapshotHeader, bytes]:
        """A snapshot of owned partitions (all by default) with their positions, as one blob."""
        return encode_partitions(
            self.shard_id, self.fingerprint, created_ms, self.exports(partitions)
        )

    def exports(self, partitions: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """:meth:`export` of owned partitions (all by default): a snapshot's synchronous part."""
        chosen = self.partitions if partitions is None else partitions
        for p in chosen:
            self._fold_partition(p)
        return [self._export(p) for p in chosen]

    def restore(self, blob: bytes) -> SnapshotHeader:
        """Replace the state of exactly the snapshot's partitions (all this shard owns).

        Raises:
            SnapshotError: the blob is unusable here (format, digest, settings, or
                other partitions); the state is left as it was.
        """
        header, states = self.decode(blob)
        if header.partitions != self.partitions or self.released:
            raise SnapshotError(
                f"snapshot covers partitions {header.partitions}, this shard owns {self.partitions}"
            )
        for p in header.partitions:
            self.forget(p)
        for state in states:
            self.insert(state)
        return header

    def decode(self, blob: bytes) -> tuple[SnapshotHeader, list[dict[str, Any]]]:
        """The header and partition states of a snapshot taken under this shard's settings.

        Raises:
            SnapshotError: wrong format, digest, settings, or a body that is not partition states.
        """
        header, state = decode_snapshot(blob, self.fingerprint)
        parts = state.get("partitions")
        if not isinstance(parts, list) or [p.get("partition") for p in parts] != header.partitions:
            raise SnapshotError(f"snapshot body does not hold partitions {header.partitions}")
        return header, parts

    def status(self) -> dict[str, Any]:
        """Counters for operators: applied events, users, positions, freshness, fold lag."""
        return {
            "shard": self.shard_id,
            "partitions": self.partitions,
            "released": sorted(self.released),
            "users": len(self.table),
            "applied_events": self.applied_events,
            "applied_messages": self.applied_messages,
            "rejected": dict(self.rejected),
            "positions": dict(sorted(self.positions.items())),
            "state_bytes": self.table.nbytes() + self.conversion.tracker.nbytes(),
            "item_bytes": self.items.nbytes(),
            "insight_bytes": self.engagement.nbytes()
            + self.conversion.nbytes()
            + self.retention.nbytes()
            + self.trends.nbytes(),
            "duplicates": self.dedup.duplicates,
            "dedup_bytes": self.dedup.nbytes(),
            "items": len(self.items),
            "busy_s": round(self.busy_s, 3),
            "freshness_ms": self.freshness_ms.percentiles(),
            "apply_ms": self.apply_ms.percentiles(),
            "fold_ms": self.fold_ms.percentiles(),
            "fold_s": round(self.fold_s, 3),
            "folded_events": self.folded_events,
            "insights_lag_ms": self.insights_lag_ms.percentiles(),
            "pending_fold_events": self._queue.events,
        }


def encode_partitions(
    shard: int, fingerprint: str, created_ms: int, states: list[dict[str, Any]]
) -> tuple[SnapshotHeader, bytes]:
    """A snapshot blob of exported partition states (pure: safe to run off the event loop)."""
    positions = {int(s["partition"]): int(s["position"]) for s in states}
    return encode_snapshot(
        shard,
        positions,
        created_ms,
        fingerprint,
        {"partitions": states},
        applied_events=sum(s["counters"]["applied_events"] for s in states),
        users=sum(len(s["table"]["users"]) for s in states),
    )
