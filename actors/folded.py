"""Applied events on their way into the insight aggregates, as aligned columns.

A shard applies events to per-user state first (what freshness measures) and
folds them into the aggregates later, in larger chunks and on a time budget
(see :meth:`~actors.shard.Shard.fold_due`). :class:`Folded` is what a fold hands
every aggregate: the events plus what the state table knew of each when it was
applied (its row, its user's first-seen time, the session time it added), and
ids of its item and category in the table's vocabularies, so no aggregate
interns or hashes a string again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from actors.batch import EventBatch
from actors.sketches import stable_hash64


@dataclass(frozen=True)
class Folded:
    """Events of many partitions, in apply order within each partition.

    Attributes:
        user_hash: :func:`~actors.sketches.stable_hash64` of each event's user id
            (what the sketches count; the table keeps it per user, hashed once).
        ts: int64 event times (epoch ms).
        type: uint8 event type codes.
        value: float64 values (NaN: none).
        partition: int64 partition of each event.
        row: int64 state-table row of each event's user when applied (-1 when
            the user was deleted in the same step).
        first_seen: int64 first-seen time of the user after its step (-1 as for row).
        session_gap_ms: int64 session time each event added (the table's rule).
        item: int64 item id (-1: none); ``item_names[id]`` is its name.
        category: int64 category id (-1: none); ``category_names[id]`` is its name.
        item_names: the table's item names, indexed by id.
        category_names: the table's category names, indexed by id.
    """

    user_hash: np.ndarray
    ts: np.ndarray
    type: np.ndarray
    value: np.ndarray
    partition: np.ndarray
    row: np.ndarray
    first_seen: np.ndarray
    session_gap_ms: np.ndarray
    item: np.ndarray
    category: np.ndarray
    item_names: Sequence[str]
    category_names: Sequence[str]

    def __len__(self) -> int:
        return len(self.ts)

    @classmethod
    def of(
        cls,
        batch: EventBatch,
        partitions: np.ndarray | None = None,
        session_gaps_ms: np.ndarray | None = None,
        rows: np.ndarray | None = None,
        first_seen: np.ndarray | None = None,
    ) -> Folded:
        """Events on their own, without a state table (tests and single aggregates).

        Items and categories are interned here; rows and first-seen default to unknown (-1).
        """
        n = len(batch)
        items, item_ids = _intern(batch.item_id)
        categories, category_ids = _intern(batch.category)
        return cls(
            stable_hash64(batch.user_id),
            batch.ts,
            batch.type,
            batch.value,
            np.zeros(n, np.int64) if partitions is None else np.asarray(partitions, np.int64),
            np.full(n, -1, np.int64) if rows is None else np.asarray(rows, np.int64),
            np.full(n, -1, np.int64) if first_seen is None else np.asarray(first_seen, np.int64),
            np.zeros(n, np.int64) if session_gaps_ms is None else np.asarray(session_gaps_ms),
            item_ids,
            category_ids,
            items,
            categories,
        )


def _intern(column: Sequence[str | None]) -> tuple[list[str], np.ndarray]:
    ids: dict[str | None, int] = {None: -1}
    for name in column:
        if name not in ids:
            ids[name] = len(ids) - 1
    names = [name for name in ids if name is not None]
    return names, np.fromiter(map(ids.__getitem__, column), np.int64, len(column))
