"""The partitions a shard actor holds, each with its own state: the unit that moves.

A partition's state (a :class:`~actors.shard.Shard` owning that one partition)
depends only on the partition's own stream, never on which other partitions
share its actor. So a partition can be snapshotted on one actor, restored on
another and go on from its position, and the answers after a rescale equal
those of an uninterrupted run: Flink's key groups, without stopping the job.

The price is one apply per partition and step instead of one per step; the
actor takes larger steps to make up for it (see ``bench``). A partition being
handed off is *released*: it no longer applies events, but keeps answering
queries for its users until the new owner has it (then it is forgotten).
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from actors.dedup import DedupConfig
from actors.delivery import Delivery
from actors.errors import NotOwner
from actors.items import ItemGraphConfig
from actors.latency import LatencyRing
from actors.partitioning import partition_of
from actors.shard import FRESHNESS_SAMPLES, ApplyResult, Shard, record_freshness
from actors.state import StateRules, UserRows

MIN_SEEN_FILTER_BITS = 1 << 16
MIN_ITEM_PAIRS = 50_000
MIN_DEDUP_IDS = 100_000


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


class PartitionSet:
    """Owned and released partitions of one shard actor, and queries routed among them."""

    def __init__(self, shard_id: int, partitions: int, make: Callable[[int], Shard]) -> None:
        """Args:
        shard_id: the actor's shard number (for errors and status).
        partitions: the stream's partition count P (routes user ids).
        make: a fresh, empty state for one partition.
        """
        self.shard_id = shard_id
        self.partition_count = partitions
        self.make = make
        self.owned: dict[int, Shard] = {}
        self.released: dict[int, Shard] = {}
        self.busy_s = 0.0  # this actor's work, not the partitions' (those move)
        self.work_messages = 0
        self.apply_ms = LatencyRing()
        # One ring for the actor, in apply order: a bench reads its newest samples by count.
        self.freshness_ms = LatencyRing(FRESHNESS_SAMPLES)

    @property
    def partitions(self) -> list[int]:
        """The partitions this actor owns (applies events to)."""
        return sorted(self.owned)

    @property
    def positions(self) -> dict[int, int]:
        """The stream position of every owned partition."""
        return {p: s.positions[p] for p, s in sorted(self.owned.items())}

    @property
    def applied_events(self) -> int:
        return sum(s.applied_events for s in self.owned.values())

    @property
    def applied_messages(self) -> int:
        return sum(s.applied_messages for s in self.owned.values())

    @property
    def users(self) -> int:
        """Users held by the owned partitions."""
        return sum(len(s.table) for s in self.owned.values())

    def own(self, state: Shard) -> None:
        """Own a partition's state (new, restored, or taken back from released)."""
        (partition,) = state.partitions
        self.released.pop(partition, None)
        self.owned[partition] = state

    def release(self, partition: int) -> Shard:
        """Stop applying ``partition``; it answers its users' queries until forgotten."""
        state = self.owned.pop(partition)
        self.released[partition] = state
        return state

    def forget(self, partition: int) -> None:
        """Drop a released partition (its new owner answers now)."""
        self.released.pop(partition, None)

    def apply(self, deliveries: Sequence[Delivery]) -> ApplyResult:
        """Apply deliveries, one apply per owned partition; others are skipped.

        Order within a partition is kept; partitions are independent.
        """
        groups: dict[int, list[Delivery]] = defaultdict(list)
        for delivery in deliveries:
            groups[delivery.partition].append(delivery)
        total = ApplyResult()
        started = time.perf_counter()
        for partition, group in groups.items():
            state = self.owned.get(partition)
            if state is None:  # released or never ours: its owner applies it
                total.skipped_messages += len(group)
                continue
            result = state.apply(group)
            record_freshness(self.freshness_ms, group)
            total.applied += result.applied
            total.skipped_messages += result.skipped_messages
            total.rejected.extend(result.rejected)
        took = time.perf_counter() - started
        self.work_messages += len(deliveries)
        self.busy_s += took
        self.apply_ms.add(took * 1000)
        return total

    def _holder(self, partition: int) -> Shard | None:
        return self.owned.get(partition) or self.released.get(partition)

    def _by_partition(self, user_ids: Sequence[str]) -> dict[int, list[int]]:
        """Indices of ``user_ids`` grouped by partition.

        Raises:
            NotOwner: some partitions are neither owned nor released here.
        """
        groups: dict[int, list[int]] = defaultdict(list)
        for index, user in enumerate(user_ids):
            groups[partition_of(user, self.partition_count)].append(index)
        missing = sorted(p for p in groups if self._holder(p) is None)
        if missing:
            raise NotOwner(self.shard_id, missing)
        return groups

    def profiles(self, user_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Live profiles of ``user_ids`` in order (None for unknown users)."""
        out: list[dict[str, Any] | None] = [None] * len(user_ids)
        for p, at in self._by_partition(user_ids).items():
            state = self._holder(p)
            assert state is not None
            for index, profile in zip(at, state.profiles([user_ids[i] for i in at]), strict=True):
                out[index] = profile
        return out

    def user_rows(self, user_ids: Sequence[str]) -> UserRows:
        """Model-feature state of ``user_ids`` in order."""
        groups = self._by_partition(user_ids)
        parts = []
        for p, at in groups.items():
            state = self._holder(p)
            assert state is not None
            parts.append(state.user_rows([user_ids[i] for i in at]))
        if not parts:
            return self.make(0).user_rows([])
        order = np.argsort(np.concatenate([groups[p] for p in groups]), kind="stable")
        return UserRows.concat(parts).take(order.tolist())

    def seen(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[list[bool]]:
        """Per (user, items), which items the user touched."""
        out: list[list[bool]] = [[] for _ in pairs]
        for p, at in self._by_partition([user for user, _ in pairs]).items():
            state = self._holder(p)
            assert state is not None
            for index, flags in zip(at, state.seen([pairs[i] for i in at]), strict=True):
                out[index] = flags
        return out

    def user_ids(self, limit: int) -> list[str]:
        """Up to ``limit`` ids of users of the owned partitions."""
        found: list[str] = []
        for state in self.owned.values():
            if len(found) >= limit:
                break
            found.extend(state.table.users(limit - len(found)))
        return found

    def _held(self) -> list[tuple[int, Shard, bool]]:
        """Every partition held, its state, and whether it is owned (else released)."""
        return [(p, s, True) for p, s in sorted(self.owned.items())] + [
            (p, s, False) for p, s in sorted(self.released.items())
        ]

    def item_partials(
        self, top_n: int, known: dict[int, int | None] | None = None
    ) -> dict[int, tuple[dict[str, Any] | None, bool]]:
        """Item partial of each partition held, and whether it is owned (else released).

        None instead of a partial where ``known`` names its version. Released
        partitions answer too: between two owners a partition still counts.
        """
        known = known or {}
        return {p: (s.item_partial(top_n, known.get(p)), owned) for p, s, owned in self._held()}

    def insights_partials(self) -> dict[int, tuple[dict[str, Any], bool]]:
        """Insights partials of each partition held, and whether it is owned (else released)."""
        return {p: (s.insights_partials(), owned) for p, s, owned in self._held()}

    def freshness_ring(self) -> tuple[int, np.ndarray]:
        """How many store-to-applied delays (ms) this actor recorded, and its ring of the latest."""
        return self.freshness_ms.raw()

    def status(self) -> dict[str, Any]:
        """Counters for operators, summed over the owned partitions."""
        states = list(self.owned.values())
        rejected: dict[str, int] = defaultdict(int)
        for s in states:
            for reason, n in s.rejected.items():
                rejected[reason] += n
        return {
            "shard": self.shard_id,
            "partitions": self.partitions,
            "released": sorted(self.released),
            "users": self.users,
            "applied_events": self.applied_events,
            "applied_messages": self.applied_messages,
            "rejected": dict(rejected),
            "positions": self.positions,
            "state_bytes": sum(s.table.nbytes() + s.conversion.tracker.nbytes() for s in states),
            "item_bytes": sum(s.items.nbytes() for s in states),
            "duplicates": sum(s.dedup.duplicates for s in states),
            "dedup_bytes": sum(s.dedup.nbytes() for s in states),
            "items": sum(len(s.items) for s in states),
            "busy_s": round(self.busy_s, 3),
            "freshness_ms": self.freshness_ms.percentiles(),
            "apply_ms": self.apply_ms.percentiles(),
        }
