"""A shard's logic without Ray or NATS: decode deliveries, apply them, keep positions.

:class:`Shard` is what a :class:`~actors.shard_actor.ShardActor` runs; it is
plain Python so that tests and training can drive it directly.
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
from actors.errors import WireError
from actors.events import TYPE_CODE, EventType
from actors.items import ItemGraph, ItemGraphConfig
from actors.latency import LatencyRing
from actors.retention import RetentionAggregate
from actors.segments import SegmentTracker
from actors.state import StateRules, UserRows, UserStateTable
from actors.trends import TrendAggregate
from actors.validation import Rejection, RejectReason, ValidationPolicy, check_batch
from actors.windows import WindowConfig

FRESHNESS_SAMPLES = 4096
INSIGHTS_FOLD_EVENTS = 20_000  # applied events held back before the aggregates see them
_DELETED = TYPE_CODE[EventType.USER_DELETED]
_NO_ROWS = np.zeros(0, dtype=np.int64)
# What a snapshot holds: everything that an uninterrupted run would have built.
_SNAPSHOT_FIELDS = (
    "table",
    "items",
    "dedup",
    "engagement",
    "conversion",
    "retention",
    "trends",
    "segments",
    "event_now_ms",
    "positions",
    "applied_events",
    "applied_messages",
    "rejected",
)


@dataclass(frozen=True)
class _Applied:
    """A batch applied to the state table and not yet folded into the aggregates."""

    batch: EventBatch
    partitions: np.ndarray
    rows: np.ndarray
    first_seen: np.ndarray
    deleted: np.ndarray
    session_gaps_ms: np.ndarray  # per event, the session time it adds (the table's rule)

    @staticmethod
    def concat(steps: Sequence[_Applied]) -> _Applied:
        """One step for many (only valid when none of them deleted a user)."""
        if len(steps) == 1:
            return steps[0]
        return _Applied(
            EventBatch.concat(s.batch for s in steps),
            np.concatenate([s.partitions for s in steps]),
            np.concatenate([s.rows for s in steps]),
            np.concatenate([s.first_seen for s in steps]),
            np.zeros(0, dtype=np.int64),
            np.concatenate([s.session_gaps_ms for s in steps]),
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


class Shard:
    """Per-user state of a set of partitions, with each partition's stream position.

    Besides the per-user table it keeps the partial aggregates that the API
    merges across shards: event-time engagement windows
    (:class:`~actors.engagement.EngagementWindows`, fed with each event's
    partition because watermarks are per partition), cohort retention
    (:class:`~actors.retention.RetentionAggregate`, fed with each event's
    first-seen from the table), decayed trends
    (:class:`~actors.trends.TrendAggregate`) and the conversion funnel
    (:class:`~actors.conversion.ConversionWindows`, keyed by the table's rows and
    fed with engagement's late mask, so both apply one lateness rule). Segment
    memberships (:class:`~actors.segments.SegmentTracker`) follow each apply step
    for the rows it touched and every fold for all rows, as of the newest event
    time applied.
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
    ) -> None:
        self.shard_id = shard_id
        # Snapshots taken under other state-shaping settings are refused on restore.
        self.fingerprint = fingerprint_of(
            rules or StateRules(),
            windows or WindowConfig(),
            funnel or FunnelSpec(),
            items or ItemGraphConfig(),
            dedup or DedupConfig(),
        )
        self.table = UserStateTable(rules or StateRules())
        self.items = ItemGraph(items)
        self.dedup = EventDeduper(dedup)
        self.engagement = EngagementWindows(windows)
        self.conversion = ConversionWindows(funnel, windows)
        self.retention = RetentionAggregate()
        self.trends = TrendAggregate()
        self.segments = SegmentTracker()
        self.event_now_ms: int | None = None  # newest event time applied: segments' "now"
        self.policy = policy or ValidationPolicy()
        self.positions: dict[int, int] = {p: 0 for p in partitions}
        self.applied_events = 0
        self.applied_messages = 0
        self.rejected: Counter[str] = Counter()
        self.freshness_ms = LatencyRing(FRESHNESS_SAMPLES)  # store-to-applied, per message
        self.busy_s = 0.0
        self.apply_ms = LatencyRing()
        self._unfolded: list[_Applied] = []
        self._unfolded_events = 0

    @property
    def partitions(self) -> list[int]:
        """The partitions this shard owns."""
        return sorted(self.positions)

    def apply(self, deliveries: Sequence[Delivery]) -> ApplyResult:
        """Decode, check and apply deliveries in order.

        A delivery at or before its partition's position was applied already
        (a replay) and is skipped; bodies that are not the wire format and rows
        that break a rule come back as rejections for the dead-letter subject.
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
            try:
                batch = decode(delivery.data)
            except WireError as exc:
                reason = RejectReason(exc.reason)
                key = f"{delivery.partition}.{delivery.seq}"
                result.rejected.append(Rejection(-1, reason, exc.detail, delivery.data, key))
                continue
            batches.append(batch)
            taken.append(delivery)
        if batches:
            # One check per step, not per message: its fixed costs dominate small messages.
            checked = check_batch(EventBatch.concat(batches), self.policy)
            sizes = [len(b) for b in batches]
            of_partition = np.repeat([d.partition for d in taken], sizes)
            stored = np.repeat([d.stored_ns // 1_000_000 for d in taken], sizes)  # per event
            batch = checked.batch
            if checked.rejected:
                result.rejected.extend(_keyed(checked.rejected, taken, sizes))
                keep = np.ones(len(of_partition), dtype=bool)
                keep[[r.index for r in checked.rejected]] = False
                of_partition, stored = of_partition[keep], stored[keep]
            fresh = self.dedup.fresh(batch.event_id, stored)
            if not fresh.all():  # the same event_id again: applied once
                at = np.flatnonzero(fresh)
                batch, of_partition = batch.take(at), of_partition[at]
            for start, stop in _steps_ending_at_deletions(batch):
                self._apply_step(batch.slice(start, stop), of_partition[start:stop])
                result.applied += stop - start
        self.applied_events += result.applied
        self.applied_messages += len(batches)
        self.rejected.update(r.reason.value for r in result.rejected)
        record_freshness(self.freshness_ms, taken)
        took = time.perf_counter() - started
        self.busy_s += took
        self.apply_ms.add(took * 1000)
        return result

    def _apply_step(self, batch: EventBatch, of_partition: np.ndarray) -> None:
        """Apply checked, fresh events; a step holds at most one deletion, as its last event.

        The events before a deletion count in the aggregates like any activity
        (as they would had they come in an earlier step); the deletion then
        frees the user's row and leaves the user's segments.
        """
        n = len(batch)
        if batch.type[-1] != _DELETED:
            self._apply_activity(batch, of_partition)
            return
        self._apply_activity(batch.slice(0, n - 1), of_partition[: n - 1])
        deletion = batch.slice(n - 1, n)
        deleted = self._rows_deleted_by(deletion)
        self.table.apply(deletion)
        self._update_segments(deletion, np.full(1, -1, dtype=np.int64), deleted)
        self._unfolded.append(
            _Applied(EventBatch.empty(), _NO_ROWS, _NO_ROWS, _NO_ROWS, deleted, _NO_ROWS)
        )

    def _apply_activity(self, batch: EventBatch, of_partition: np.ndarray) -> None:
        """Apply events that delete nobody to the table and everything that follows it."""
        if not len(batch):
            return
        self.table.apply(batch)
        self.items.observe(self.table, batch)
        rows = self.table.rows_of(batch.user_id)
        self._update_segments(batch, rows, _NO_ROWS)
        first = self.table.first_seen_at(rows)
        gaps = self.table.last_session_gaps_ms
        self._unfolded.append(_Applied(batch, of_partition, rows, first, _NO_ROWS, gaps))
        self._unfolded_events += len(batch)
        if self._unfolded_events >= INSIGHTS_FOLD_EVENTS:
            self.fold_insights()

    def _update_segments(self, batch: EventBatch, rows: np.ndarray, deleted: np.ndarray) -> None:
        """Move event time on and re-evaluate the segments of the rows this batch touched.

        A deletion is not activity: its time does not move "now".
        """
        activity = batch.ts[batch.type != _DELETED]
        newest = int(np.max(activity)) if activity.size else None
        if newest is not None and (self.event_now_ms is None or newest > self.event_now_ms):
            self.event_now_ms = newest
        if self.event_now_ms is None:
            return  # only deletions of users never seen: no segment to leave
        touched = np.unique(np.concatenate([rows[rows >= 0], deleted[deleted >= 0]]))
        self.segments.update(self.table, touched, self.event_now_ms)

    def _rows_deleted_by(self, batch: EventBatch) -> np.ndarray:
        """Rows of users a ``user_deleted`` event of ``batch`` will free (read before applying)."""
        at = np.flatnonzero(batch.type == _DELETED)
        return self.table.rows_of([batch.user_id[i] for i in at.tolist()])

    def fold_insights(self) -> None:
        """Fold the batches applied since the last fold into the insight aggregates.

        Per-user state is updated at once (that is what freshness measures);
        the aggregates are fed in larger, later steps, so their per-call costs
        do not ride on every small apply step. Each applied batch keeps the rows
        and first-seen times it had when applied, so deletions and reused rows
        in between change nothing.
        """
        pending, self._unfolded, self._unfolded_events = self._unfolded, [], 0
        self.items.flush()
        if self.event_now_ms is not None:  # time-driven segment entries and exits
            self.segments.refresh(self.table, self.event_now_ms)
        if pending and not any(p.deleted.size for p in pending):
            pending = [_Applied.concat(pending)]
        for step in pending:
            late = self.engagement.apply(step.batch, step.partitions, step.session_gaps_ms)
            self.conversion.forget(step.deleted)
            self.conversion.apply(step.batch, step.rows, late)
            self._fold_batch(step.batch, step.first_seen)

    def _fold_batch(self, batch: EventBatch, first: np.ndarray) -> None:
        """Feed retention and trends with an applied batch and its users' first-seen times.

        Events of users the table no longer held (deleted in their batch) have
        no first-seen, so they stay out of retention.
        """
        self.trends.update(batch)
        held = np.flatnonzero(first >= 0)
        if held.size < len(batch):
            batch, first = batch.take(held), first[held]
        self.retention.update(batch, first)
        watermarks = self.engagement.watermarks.all()
        if watermarks:
            self.trends.advance(max(watermarks.values()))

    def insights_partials(self) -> dict[str, Any]:
        """Engagement, conversion, retention and trend partials as plain data, for the merge."""
        self.fold_insights()
        return {
            "engagement": self.engagement.partials(),
            "conversion": self.conversion.partials(),
            "retention": self.retention.snapshot(),
            "trends": self.trends.to_dict(),
            "segments": self.segment_sizes(),
        }

    def segment_sizes(self) -> dict[str, Any]:
        """Segment sizes, entries and exits on this shard, and its event-time ``now_ms``."""
        return self.segments.sizes()

    def freshness_ring(self) -> tuple[int, np.ndarray]:
        """How many delays were ever recorded, and a copy of the ring holding the latest."""
        return self.freshness_ms.raw()

    def profiles(self, user_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Live profiles of ``user_ids`` (None for users this shard has not seen).

        Each profile lists the segments its user is in as of this shard's event time.
        """
        profiles = self.table.profiles(user_ids)
        rows = self.table.rows_of(user_ids).tolist()
        for profile, row in zip(profiles, rows, strict=True):
            if profile is not None:
                profile["segments"] = self.segments.of_row(self.table, row)
        return profiles

    def user_rows(self, user_ids: Sequence[str]) -> UserRows:
        """Model-feature state of ``user_ids`` as of this shard's newest event time."""
        return self.table.user_rows(user_ids, self.event_now_ms)

    def seen(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[list[bool]]:
        """Per (user, items) pair, which of the items the user has touched (may over-report)."""
        return [self.table.seen(user, items).tolist() for user, items in pairs]

    def item_partial(self, top_n: int = 100, known: int | None = None) -> dict[str, Any] | None:
        """Item stats and co-visitation of this shard's users, for the serving merge.

        None when nothing changed since the partial of version ``known`` (the
        caller keeps that one): an idle shard costs the merge nothing.
        """
        if known is not None and known == self.items.version:
            return None
        return {**self.items.partial(self.table, top_n), "version": self.items.version}

    def snapshot(self, created_ms: int) -> tuple[SnapshotHeader, bytes]:
        """The whole state and the position of every partition, as one snapshot blob.

        Pending batches are folded first, so the blob holds aggregates and
        per-user rows but no raw events (a deleted user's id is not in it).
        """
        self.fold_insights()
        state = {name: getattr(self, name) for name in _SNAPSHOT_FIELDS}
        return encode_snapshot(
            self.shard_id,
            self.positions,
            created_ms,
            self.fingerprint,
            state,
            applied_events=self.applied_events,
            users=len(self.table),
        )

    def restore(self, blob: bytes) -> SnapshotHeader:
        """Replace the state with a snapshot's; replay then goes on from its positions.

        Raises:
            SnapshotError: the blob is unusable here (format, digest, settings, or
                other partitions); the state is left as it was.
        """
        header, state = decode_snapshot(blob, self.fingerprint)
        if header.partitions != self.partitions:
            raise SnapshotError(
                f"snapshot covers partitions {header.partitions}, this shard owns {self.partitions}"
            )
        if set(state) != set(_SNAPSHOT_FIELDS):
            raise SnapshotError(f"snapshot holds {sorted(state)}, expected {_SNAPSHOT_FIELDS}")
        self._unfolded, self._unfolded_events = [], 0
        for name, value in state.items():
            setattr(self, name, value)
        return header

    def status(self) -> dict[str, Any]:
        """Counters for operators: applied events, users, positions, freshness."""
        return {
            "shard": self.shard_id,
            "partitions": self.partitions,
            "users": len(self.table),
            "applied_events": self.applied_events,
            "applied_messages": self.applied_messages,
            "rejected": dict(self.rejected),
            "positions": dict(self.positions),
            "state_bytes": self.table.nbytes() + self.conversion.tracker.nbytes(),
            "item_bytes": self.items.nbytes(),
            "duplicates": self.dedup.duplicates,
            "dedup_bytes": self.dedup.nbytes(),
            "items": len(self.items),
            "busy_s": round(self.busy_s, 3),
            "freshness_ms": self.freshness_ms.percentiles(),
            "apply_ms": self.apply_ms.percentiles(),
        }
