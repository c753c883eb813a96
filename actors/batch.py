"""Columnar event batches: the one shape events have inside the platform.

A batch holds each field as a column (numpy arrays for codes, times and values;
lists for strings and maps) so that encoding, validation and state updates work
per batch rather than per event.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from itertools import chain
from typing import Any

import numpy as np

from actors.events import (
    EVENT_TYPES,
    SOURCE_CODE,
    SOURCES,
    TYPE_CODE,
    Event,
    Scalar,
    to_epoch_ms,
)

NO_VALUE = float("nan")


@dataclass
class EventBatch:
    """Events as parallel columns. ``value`` is NaN where an event has none."""

    event_id: list[str]
    user_id: list[str]
    type: np.ndarray  # uint8 codes, see EventType
    ts: np.ndarray  # int64 epoch milliseconds
    item_id: list[str | None]
    category: list[str | None]
    value: np.ndarray  # float64
    source: np.ndarray  # uint8 codes, see Source
    traits: list[dict[str, Scalar] | None] = field(default_factory=list)
    properties: list[dict[str, Scalar] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.event_id)
        if not self.traits:
            self.traits = [None] * n
        if not self.properties:
            self.properties = [None] * n

    def __len__(self) -> int:
        return len(self.event_id)

    @classmethod
    def empty(cls) -> EventBatch:
        """A batch with no events."""
        return cls.from_events([])

    @classmethod
    def from_events(cls, events: Sequence[Event]) -> EventBatch:
        """Columns from validated events."""
        return cls(
            event_id=[e.event_id for e in events],
            user_id=[e.user_id for e in events],
            type=np.fromiter((TYPE_CODE[e.type] for e in events), np.uint8, len(events)),
            ts=np.fromiter((to_epoch_ms(e.ts) for e in events), np.int64, len(events)),
            item_id=[e.item_id for e in events],
            category=[e.category for e in events],
            value=np.fromiter(
                (NO_VALUE if e.value is None else e.value for e in events),
                np.float64,
                len(events),
            ),
            source=np.fromiter((SOURCE_CODE[e.source] for e in events), np.uint8, len(events)),
            traits=[e.traits for e in events],
            properties=[e.properties for e in events],
        )

    def take(self, indices: Sequence[int] | np.ndarray) -> EventBatch:
        """The events at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        pick = _picker(idx.tolist())
        return EventBatch(
            event_id=pick(self.event_id),
            user_id=pick(self.user_id),
            type=self.type[idx],
            ts=self.ts[idx],
            item_id=pick(self.item_id),
            category=pick(self.category),
            value=self.value[idx],
            source=self.source[idx],
            traits=pick(self.traits),
            properties=pick(self.properties),
        )

    def slice(self, start: int, stop: int) -> EventBatch:
        """Events ``start`` to ``stop`` (cheap: slices, no gathering)."""
        return EventBatch(
            event_id=self.event_id[start:stop],
            user_id=self.user_id[start:stop],
            type=self.type[start:stop],
            ts=self.ts[start:stop],
            item_id=self.item_id[start:stop],
            category=self.category[start:stop],
            value=self.value[start:stop],
            source=self.source[start:stop],
            traits=self.traits[start:stop],
            properties=self.properties[start:stop],
        )

    @classmethod
    def concat(cls, batches: Iterable[EventBatch]) -> EventBatch:
        """One batch holding the events of ``batches`` in order."""
        parts = [b for b in batches if len(b)]
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]

        def joined(name: str) -> list[Any]:
            return list(chain.from_iterable(getattr(b, name) for b in parts))

        return cls(
            event_id=joined("event_id"),
            user_id=joined("user_id"),
            type=np.concatenate([b.type for b in parts]),
            ts=np.concatenate([b.ts for b in parts]),
            item_id=joined("item_id"),
            category=joined("category"),
            value=np.concatenate([b.value for b in parts]),
            source=np.concatenate([b.source for b in parts]),
            traits=joined("traits"),
            properties=joined("properties"),
        )

    def event_dict(self, i: int) -> dict[str, Any]:
        """Event ``i`` as the JSON-ready dict an :class:`Event` would serialise to."""
        out: dict[str, Any] = {
            "event_id": self.event_id[i],
            "user_id": self.user_id[i],
            "type": _name(EVENT_TYPES, int(self.type[i])),
            "ts": int(self.ts[i]),
            "source": _name(SOURCES, int(self.source[i])),
        }
        optional = {
            "item_id": self.item_id[i],
            "category": self.category[i],
            "value": None if np.isnan(self.value[i]) else float(self.value[i]),
            "traits": self.traits[i],
            "properties": self.properties[i],
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        return out


def _name(members: Sequence[Enum], code: int) -> str | int:
    """The name behind a wire code; the code itself when it is unknown (a bad batch)."""
    return members[code].value if code < len(members) else code


def _picker(rows: list[int]) -> Callable[[list[Any]], list[Any]]:
    """A function taking ``rows`` of a list, at C speed (``itemgetter``)."""
    if not rows:
        return lambda column: []
    if len(rows) == 1:
        (row,) = rows
        return lambda column: [column[row]]
    getter = operator.itemgetter(*rows)
    return lambda column: list(getter(column))
