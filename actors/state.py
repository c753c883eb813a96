"""Compact per-user state, updated one event batch at a time, for any number of partitions.

A shard keeps state for millions of users, so it lives in numpy columns indexed
by a row number (one ``dict`` maps user id to row), not in a dict per user, and
every update rule is vectorised over a whole :class:`~actors.batch.EventBatch`.
One table holds the users of every partition its shard owns (each row knows its
partition), so a step costs the same however many partitions it touches; a
partition's rows can still be exported and inserted elsewhere
(:meth:`UserStateTable.export` / :meth:`UserStateTable.insert`) and nothing of
a partition's state depends on which other partitions share the table.

Every rule except deletion gives the same state however the stream is cut into
batches: extremes and sums are order free, the time-decayed scores are kept as
of the user's ``last_seen`` (rescaled when it moves), the active-days bitmap is
a set, and sessions and recent items follow arrival order, which batching keeps.
A ``user_deleted`` event removes the user after the rest of its batch is applied.
Traits sent with ``identify`` events are merged per user in arrival order (a later
value for a key wins); they live in a dict beside the columns because few users
have them. Category affinity keeps ``max_categories - 1`` named categories per
partition (in order of first appearance; the rest count as "other"). Which items
a user has touched is kept in a Bloom filter per partition keyed by (user
incarnation, item), so recommendations can skip seen items in bounded memory (a
false "seen" is possible, a missed one is not).
Timestamps are assumed validated (1990 to now), so spans fit easily in int64.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from itertools import compress, islice, pairwise, repeat
from typing import Any, NamedTuple

import numpy as np

from actors.batch import EventBatch
from actors.events import EVENT_TYPES, N_TYPES, TYPE_CODE, EventType, Scalar
from actors.sketches._common import _fmix64
from actors.vocabulary import Vocabulary

DAY_MS = 86_400_000
OTHER_CATEGORY = "other"
_NONE = np.iinfo(np.int64).min  # last_seen of a row with no events yet
_EMPTY_I64 = np.zeros(0, dtype=np.int64)
_MAX = np.iinfo(np.int64).max
_DWELL = TYPE_CODE[EventType.DWELL]
_PURCHASE = TYPE_CODE[EventType.PURCHASE]
_CART = TYPE_CODE[EventType.ADD_TO_CART]
_SESSION_START = TYPE_CODE[EventType.SESSION_START]
_DELETED = TYPE_CODE[EventType.USER_DELETED]
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_PART_SPAN = 1 << 20  # partitions per category id in the slot keys (P is far smaller)
_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)

DEFAULT_WEIGHTS: tuple[float, ...] = (1, 1, 0.5, 3, 5, 4, 4, 10, 2, 0, 0, 0, 0)


@dataclass(frozen=True)
class StateRules:
    """The knobs of the update rules; one instance is shared by live and replay code.

    Attributes:
        session_gap_ms: inactivity longer than this starts a new session.
        engagement_half_life_ms: half-life of engagement and category affinity.
        weights: engagement weight per ``EventType`` code (length ``N_TYPES``).
        recent_items: how many recent item ids each user keeps.
        max_categories: category slots per partition; the last slot is "other".
        active_day_window: days covered by the active-days bitmap (at most 64).
        seen_filter_bits: size of each partition's seen-items Bloom filter (a power
            of two); 2**24 bits (2 MiB) keep false "seen" answers under 1% up to
            ~1.5M (user, item) pairs.
    """

    session_gap_ms: int = 30 * 60_000
    engagement_half_life_ms: int = 7 * DAY_MS
    weights: tuple[float, ...] = DEFAULT_WEIGHTS
    recent_items: int = 20
    max_categories: int = 32
    active_day_window: int = 64
    seen_filter_bits: int = 1 << 24

    def __post_init__(self) -> None:
        if len(self.weights) != N_TYPES:
            raise ValueError(f"weights needs {N_TYPES} entries, got {len(self.weights)}")
        if self.engagement_half_life_ms <= 0 or self.session_gap_ms < 0:
            raise ValueError("half-life must be positive and session gap non-negative")
        if not 1 <= self.recent_items <= 1000 or self.max_categories < 2:
            raise ValueError("recent_items must be 1 to 1000 and max_categories >= 2")
        if not 1 <= self.active_day_window <= 64:
            raise ValueError("active_day_window must be between 1 and 64")
        bits = self.seen_filter_bits
        if bits < 64 or bits & (bits - 1):
            raise ValueError("seen_filter_bits must be a power of two, at least 64")


# Per-row columns: name -> (dtype, width or None for a scalar per row).
_COLUMNS: dict[str, tuple[type, str | None]] = {
    "_counts": (np.int32, "types"),
    "_first": (np.int64, None),
    "_last": (np.int64, None),
    "_sessions": (np.int32, None),
    "_dwell": (np.float64, None),
    "_revenue": (np.float64, None),
    "_engagement": (np.float64, None),
    "_recent": (np.int32, "items"),  # ring of item ids
    "_recent_n": (np.uint16, None),  # pushes so far, folded to < 2K (see _fold)
    "_affinity": (np.float32, "categories"),  # by the partition's category slot
    "_days": (np.uint64, None),
    "_last_cart": (np.int64, None),  # newest add_to_cart time, _NONE without one
    "_last_buy": (np.int64, None),  # newest purchase time, _NONE without one
    "_part": (np.int16, None),  # the partition the user belongs to
    "_uid": (np.uint32, None),  # the user's incarnation in its partition (seen filter)
}
_SEEN_HASHES = 3


class UserStateTable:
    """Per-user state for the users of some partitions, in columns grown by doubling.

    Args:
        rules: the update rules.
        capacity: initial number of rows; grows as needed.
        hold_deleted_rows: a row a deletion frees waits for :meth:`free_rows`
            before a new user gets it (a shard keeps aggregates keyed by row
            that must see the deleted user's events first).
    """

    _counts: np.ndarray  # int32[cap, N_TYPES]
    _first: np.ndarray  # int64 min ts
    _last: np.ndarray  # int64 max ts, _NONE for a free row
    _sessions: np.ndarray
    _dwell: np.ndarray
    _revenue: np.ndarray
    _engagement: np.ndarray  # as of _last
    _recent: np.ndarray  # int32[cap, K] ring of item ids
    _recent_n: np.ndarray
    _affinity: np.ndarray  # float32[cap, max_categories], as of _last
    _days: np.ndarray  # uint64 bitmap, bit k = active on day (_last // DAY_MS - k)
    _last_cart: np.ndarray  # int64 newest add_to_cart ts, _NONE without one
    _last_buy: np.ndarray  # int64 newest purchase ts, _NONE without one
    _part: np.ndarray  # int16 partition of the row's user (P is at most 32,767)
    _uid: np.ndarray  # uint32 incarnation of the row's user in its partition

    def __init__(
        self,
        rules: StateRules = StateRules(),
        capacity: int = 1024,
        hold_deleted_rows: bool = False,
    ) -> None:
        self.rules = rules
        self.hold_deleted_rows = hold_deleted_rows
        self._weights = np.asarray(rules.weights, dtype=np.float64)
        self._index: dict[str, int] = {}
        self._users: list[str | None] = []  # row -> user id (None: free)
        self._free: list[int] = []
        self._high = 0  # rows ever handed out
        self._cap = 0
        self.items = Vocabulary()
        self.categories = Vocabulary()
        # (category id, partition) -> affinity slot, as sorted keys and values.
        self._slot_keys = np.zeros(0, dtype=np.int64)
        self._slot_values = np.zeros(0, dtype=np.int64)
        self._slot_names: dict[int, list[str]] = {}  # partition -> names of its named slots
        self._traits: dict[int, dict[str, Scalar]] = {}  # row -> merged identify traits
        self._next_uid: dict[int, int] = {}  # partition -> next user incarnation
        self._seen_words = rules.seen_filter_bits // 64
        self._seen = np.zeros(0, dtype=np.uint64)  # a segment of words per partition
        self._seen_segment: dict[int, int] = {}  # partition -> its segment
        self._segments = np.full(0, -1, dtype=np.int64)  # the same, by partition number
        self._seen_free: list[int] = []
        self._seen_pairs = 0
        # Per row of the batch last applied: the session time each event adds
        # (0 for a session start), aligned with the batch (see apply).
        self.last_session_gaps_ms: np.ndarray = np.zeros(0, dtype=np.int64)
        self.last_rows: np.ndarray = np.zeros(0, dtype=np.int64)  # row of each event applied
        # Of the batch last applied: item and category id per event (-1 for
        # none); the items pushed into recent-items rings as (row, id) in row
        # then arrival order; and those rows' rings before the batch, newest
        # first (what ItemGraph pairs new items with).
        self.last_item_codes: np.ndarray = np.zeros(0, dtype=np.int64)
        self.last_category_codes: np.ndarray = np.zeros(0, dtype=np.int64)
        self.last_pushes: tuple[np.ndarray, np.ndarray] = (_EMPTY_I64, _EMPTY_I64)
        self.last_recent_before: tuple[np.ndarray, np.ndarray] = (
            _EMPTY_I64,
            np.zeros((0, rules.recent_items), np.int64),
        )
        self._grow(max(1, capacity))

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, user_id: object) -> bool:
        return isinstance(user_id, str) and user_id in self._index

    def users(self, limit: int | None = None) -> list[str]:
        """Ids of the users held (the first ``limit`` of them), in no particular order."""
        return list(islice(self._index, limit))

    def apply(
        self,
        batch: EventBatch,
        partitions: np.ndarray | None = None,
        rows: np.ndarray | None = None,
    ) -> int:
        """Fold a validated batch into the state, in row (arrival) order.

        ``partitions[i]`` is the partition of event ``i`` (all 0 when None); a new
        user's row belongs to the partition of its first event, and the caller
        makes sure a user's events all come from one partition. ``rows`` is what
        :meth:`rows_of` said of the batch's users just before (saves looking them
        up twice); afterwards :attr:`last_rows` holds every event's row.
        Afterwards :attr:`last_session_gaps_ms` holds, per row of ``batch``, the
        session time that event adds (see :meth:`_count_sessions`).

        Returns:
            The number of events applied (all of them; deleted users' included).
        """
        n = len(batch)
        self.last_session_gaps_ms = np.zeros(n, dtype=np.int64)
        self.last_item_codes = np.zeros(0, dtype=np.int64)
        self.last_category_codes = np.zeros(0, dtype=np.int64)
        self.last_pushes = (_EMPTY_I64, _EMPTY_I64)
        self.last_recent_before = (_EMPTY_I64, np.zeros((0, self.rules.recent_items), np.int64))
        if n == 0:
            return 0
        parts = np.zeros(n, np.int64) if partitions is None else partitions.astype(np.int64)
        rows = self._rows(batch.user_id, parts, rows)
        self.last_rows = rows
        types = np.asarray(batch.type, dtype=np.intp)
        g = _group(rows, np.asarray(batch.ts, dtype=np.int64), types)

        old_last = self._last[g.urows]
        new_last = np.maximum(old_last, np.maximum.reduceat(g.ts, g.starts))
        first = np.minimum.reduceat(g.ts, g.starts)
        self._first[g.urows] = np.minimum(self._first[g.urows], first)
        self._last[g.urows] = new_last
        np.add.at(self._counts.reshape(-1), rows * N_TYPES + types, np.int32(1))
        for code, column in ((_DWELL, self._dwell), (_PURCHASE, self._revenue)):
            hit = np.flatnonzero(types == code)
            if hit.size:
                np.add.at(column, rows[hit], np.nan_to_num(batch.value[hit], nan=0.0))
        ts = np.asarray(batch.ts, dtype=np.int64)
        for code, column in ((_CART, self._last_cart), (_PURCHASE, self._last_buy)):
            hit = np.flatnonzero(types == code)
            if hit.size:
                np.maximum.at(column, rows[hit], ts[hit])

        self.last_session_gaps_ms[g.order] = self._count_sessions(g, old_last)
        self.last_category_codes = self.categories.ids(batch.category)
        slots = self._category_slots(parts, self.last_category_codes)
        self._add_scores(g, old_last, new_last, slots[g.order])
        self._mark_days(g, old_last, new_last)
        self.last_item_codes = self.items.ids(batch.item_id)
        self._push_items(g, self.last_item_codes[g.order])
        self._mark_seen(rows, self.last_item_codes)
        self._merge_traits(rows, batch.traits)

        for i in np.flatnonzero(types == _DELETED).tolist():
            row = self._index.pop(batch.user_id[i], None)
            if row is not None:
                self._release_rows(np.array([row]), reuse=not self.hold_deleted_rows)
        return n

    def free_rows(self, rows: np.ndarray) -> None:
        """Let new users have rows that deletions freed (see ``hold_deleted_rows``)."""
        self._free.extend(rows.tolist())

    def _merge_traits(self, rows: np.ndarray, traits: list[dict[str, Scalar] | None]) -> None:
        """Merge each event's traits into its user's, in arrival order (later keys win)."""
        if not any(traits):
            return
        for i in compress(range(len(traits)), traits):  # few events carry traits
            self._traits.setdefault(int(rows[i]), {}).update(traits[i])  # type: ignore[arg-type]

    # -- category slots ------------------------------------------------------

    def _category_slots(self, parts: np.ndarray, cats: np.ndarray) -> np.ndarray:
        """Affinity slot of each event (-1 without a category), naming new categories.

        A partition names its first ``max_categories - 1`` categories in order of
        first appearance; the others (and a category called "other") share the last slot.
        """
        out = np.full(len(cats), -1, dtype=np.int64)
        has = np.flatnonzero(cats >= 0)
        if not has.size:
            return out
        keys = cats[has] * _PART_SPAN + parts[has]
        found = _sorted_lookup(self._slot_keys, self._slot_values, keys)
        out[has] = found
        missing = has[found < 0]
        if missing.size:
            keys, first, inverse = np.unique(
                cats[missing] * _PART_SPAN + parts[missing], return_index=True, return_inverse=True
            )
            slots = np.zeros(len(keys), dtype=np.int64)
            for k in np.argsort(first, kind="stable").tolist():  # in order of first appearance
                i = missing[first[k]]
                slots[k] = self._name_slot(int(parts[i]), int(cats[i]))
            out[missing] = slots[inverse]
            self._remember_slots(dict(zip(keys.tolist(), slots.tolist(), strict=True)))
        return out

    def _name_slot(self, partition: int, category: int) -> int:
        other = self.rules.max_categories - 1
        name = self.categories.name(category)
        names = self._slot_names.setdefault(partition, [])
        if name == OTHER_CATEGORY or len(names) >= other:
            return other
        names.append(name)
        return len(names) - 1

    def _remember_slots(self, added: dict[int, int]) -> None:
        keys = np.concatenate([self._slot_keys, np.fromiter(added, np.int64, len(added))])
        values = np.concatenate([self._slot_values, np.fromiter(added.values(), np.int64)])
        order = np.argsort(keys, kind="stable")
        self._slot_keys, self._slot_values = keys[order], values[order]

    def _slot_name(self, partition: int, slot: int) -> str:
        names = self._slot_names.get(partition, [])
        return names[slot] if slot < len(names) else OTHER_CATEGORY

    # -- seen items ----------------------------------------------------------

    def _segment_of(self, partition: int) -> int:
        """The seen-filter segment of a partition, made on first use."""
        segment = self._seen_segment.get(partition)
        if segment is None:
            if self._seen_free:
                segment = self._seen_free.pop()
            else:
                segment = len(self._seen) // self._seen_words
                self._seen = np.concatenate([self._seen, np.zeros(self._seen_words, np.uint64)])
            self._seen_segment[partition] = segment
            if partition >= len(self._segments):
                grown = np.full(max(partition + 1, 2 * len(self._segments)), -1, np.int64)
                grown[: len(self._segments)] = self._segments
                self._segments = grown
            self._segments[partition] = segment
        return segment

    def _segments_of(self, partitions: np.ndarray) -> np.ndarray:
        """The seen-filter segment of each partition (made on first use)."""
        top = int(partitions.max())
        if top < len(self._segments):
            found = self._segments[partitions]
            if found.min() >= 0:
                return found
        for p in np.flatnonzero(np.bincount(partitions)).tolist():
            if p >= len(self._segments) or self._segments[p] < 0:
                self._segment_of(p)
        return self._segments[partitions]

    def _seen_bits(self, rows: np.ndarray, item_hashes: np.ndarray) -> np.ndarray:
        """Word-array bit positions (``_SEEN_HASHES`` per pair) of (user, item) pairs."""
        key = _fmix64(self._uid[rows].astype(np.uint64) * _GOLDEN + _GOLDEN) ^ item_hashes
        h = _fmix64(key)
        h1, h2 = h & _U64(0xFFFFFFFF), (h >> _U64(32)) | _U64(1)
        bits = self.rules.seen_filter_bits
        base = self._segments_of(self._part[rows]).astype(np.uint64) * _U64(bits)
        mask = _U64(bits - 1)
        return np.stack([base + ((h1 + _U64(k) * h2) & mask) for k in range(_SEEN_HASHES)])

    def _mark_seen(self, rows: np.ndarray, codes: np.ndarray) -> None:
        has = np.flatnonzero(codes >= 0)
        if not has.size:
            return
        bits = self._seen_bits(rows[has], self.items.hashes(codes[has])).reshape(-1)
        np.bitwise_or.at(self._seen, bits >> _U64(6), _U64(1) << (bits & _U64(63)))
        self._seen_pairs += int(has.size)

    def seen(self, user_id: str, item_ids: Sequence[str]) -> np.ndarray:
        """Per item, whether ``user_id`` has touched it (Bloom filter: may say yes wrongly).

        An unknown user or an item never seen by the table is always False.
        """
        row = self._index.get(user_id)
        out = np.zeros(len(item_ids), dtype=bool)
        if row is None or not item_ids:
            return out
        codes = self.items.lookup(item_ids)
        known = np.flatnonzero(codes >= 0)
        if known.size:
            rows = np.full(known.size, row, dtype=np.int64)
            bits = self._seen_bits(rows, self.items.hashes(codes[known]))
            words = self._seen[bits >> _U64(6)]
            hit = (words >> (bits & _U64(63))) & _U64(1)
            out[known] = hit.all(axis=0)
        return out

    # -- reading -------------------------------------------------------------

    def traits(self, user_id: str) -> dict[str, Scalar]:
        """The user's merged traits (empty for users without identify traits or unknown)."""
        row = self._index.get(user_id)
        return dict(self._traits.get(row, {})) if row is not None else {}

    def item_name(self, code: int) -> str:
        """The item id behind an interned item id."""
        return self.items.name(code)

    def category_name(self, code: int) -> str | None:
        """The category behind an interned category id (None for -1)."""
        return None if code < 0 else self.categories.name(code)

    def recent_codes(self, rows: np.ndarray) -> np.ndarray:
        """Item ids of each row's recent items, newest first, -1 padded: int64[n, K]."""
        k = self.rules.recent_items
        pushed = self._recent_n[rows].astype(np.int64)
        t = np.arange(k)
        ring = self._recent[rows[:, None], (pushed[:, None] - 1 - t) % k].astype(np.int64)
        return np.where(t < np.minimum(pushed, k)[:, None], ring, -1)

    def _affinity_of(self, row: int, weights: list[float]) -> dict[str, float]:
        """A row's non-zero affinity weights by category name, heaviest first."""
        partition = int(self._part[row])
        named = [(w, self._slot_name(partition, s)) for s, w in enumerate(weights) if w != 0.0]
        named.sort(key=lambda wn: (-wn[0], wn[1]))
        return {name: w for w, name in named}

    def profile(self, user_id: str) -> dict[str, Any] | None:
        """The user's state as a JSON-ready dict, or ``None`` for an unknown user."""
        row = self._index.get(user_id)
        if row is None:
            return None
        counts = self._counts[row].tolist()
        recent = self.recent_codes(np.array([row]))[0]
        first, last = int(self._first[row]), int(self._last[row])
        return {
            "user_id": user_id,
            "counts": {t.value: counts[i] for i, t in enumerate(EVENT_TYPES)},
            "events": sum(counts),
            "first_seen": iso_ms(first),
            "last_seen": iso_ms(last),
            "first_seen_ms": first,
            "last_seen_ms": last,
            "sessions": int(self._sessions[row]),
            "dwell_seconds": float(self._dwell[row]),
            "revenue": float(self._revenue[row]),
            "engagement": float(self._engagement[row]),
            "recent_items": self.items.names_of(recent[recent >= 0]),
            "category_affinity": self._affinity_of(row, self._affinity[row].tolist()),
            "active_days": int(np.bitwise_count(self._days[row])),
            "traits": dict(self._traits.get(row, {})),
        }

    def user_rows(
        self, user_ids: Sequence[str], as_of_ms: int | np.ndarray | None = None
    ) -> UserRows:
        """The compact state of ``user_ids`` that model features are computed from.

        Serving fetches this from the owning shard, training takes it from a
        replay at each label's cutoff: both then run the same feature code.
        ``as_of_ms`` is the holder's "now" (a partition's newest event time; one
        value, or one per user), kept per row because a request's rows come from
        several partitions.
        """
        rows = self.rows_of(user_ids)
        held = rows >= 0
        at = np.where(held, rows, 0)
        recent = self.recent_codes(at)
        affinity = self._affinity[at]
        names = self.items.names
        if as_of_ms is None:
            as_of = np.full(len(held), _NONE, dtype=np.int64)
        else:
            as_of = np.broadcast_to(np.asarray(as_of_ms, dtype=np.int64), len(held)).copy()
        return UserRows(
            user_ids=list(user_ids),
            held=held,
            as_of=as_of,
            counts=np.where(held[:, None], self._counts[at], 0),
            first=np.where(held, self._first[at], _NONE),
            last=np.where(held, self._last[at], _NONE),
            sessions=np.where(held, self._sessions[at], 0),
            dwell=np.where(held, self._dwell[at], 0.0),
            revenue=np.where(held, self._revenue[at], 0.0),
            engagement=np.where(held, self._engagement[at], 0.0),
            days=np.where(held, self._days[at], np.uint64(0)),
            last_cart=np.where(held, self._last_cart[at], _NONE),
            last_purchase=np.where(held, self._last_buy[at], _NONE),
            recent=[
                [names[c] for c in codes if c >= 0] if ok else []
                for ok, codes in zip(held.tolist(), recent.tolist(), strict=True)
            ],
            affinity=[
                self._affinity_of(r, weights) if ok else {}
                for ok, r, weights in zip(
                    held.tolist(), at.tolist(), affinity.tolist(), strict=True
                )
            ],
            traits=[
                dict(self._traits.get(r, {})) if ok else {}
                for ok, r in zip(held.tolist(), rows.tolist(), strict=True)
            ],
            half_life_ms=float(self.rules.engagement_half_life_ms),
        )

    def rows_of(self, user_ids: Sequence[str]) -> np.ndarray:
        """Row per id, -1 for users not held; a freed row is reused by a later new user.

        Aggregates keyed by row (the conversion funnel) read it right after :meth:`apply`.
        """
        get = self._index.get
        return np.fromiter(map(get, user_ids, repeat(-1)), np.int64, len(user_ids))

    def partitions_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """The partition of each row (rows >= 0, held)."""
        return self._part[rows].astype(np.int64)

    def first_seen_of(self, user_ids: Sequence[str]) -> np.ndarray:
        """First-seen time (epoch ms) per id, -1 for users not held (unknown or deleted).

        Read right after :meth:`apply`, it is what cohort retention needs per event.
        """
        return self.first_seen_at(self.rows_of(user_ids))

    def first_seen_at(self, rows: np.ndarray) -> np.ndarray:
        """:meth:`first_seen_of` for rows already looked up with :meth:`rows_of`."""
        held = rows >= 0
        return np.where(held, self._first[np.where(held, rows, 0)], -1)

    def profiles(self, user_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Profiles for many users at once, ``None`` where a user is unknown."""
        return [self.profile(u) for u in user_ids]

    def nbytes(self) -> int:
        """Bytes held: all column arrays at capacity, the user index and interned strings.

        The index estimate counts the dict plus each key string and int value
        (small ints are shared by Python, so that part slightly over-counts).
        """
        total = sum(getattr(self, name).nbytes for name in _COLUMNS)
        index = self._index
        total += sys.getsizeof(index) + sum(sys.getsizeof(k) for k in index)
        total += sum(sys.getsizeof(v) for v in index.values())
        total += sys.getsizeof(self._users) + sys.getsizeof(self._free) + 8 * len(self._free)
        total += self.items.nbytes() + self.categories.nbytes()
        total += self._slot_keys.nbytes + self._slot_values.nbytes
        total += self._seen.nbytes + sys.getsizeof(self._traits)
        total += sum(sys.getsizeof(t) for t in self._traits.values())
        return total

    @property
    def high(self) -> int:
        """Rows ever handed out: every held row is below it."""
        return self._high

    def view(self, rows: np.ndarray | slice) -> RowView:
        """The columns segment rules read, for ``rows`` (a slice gives views, not copies).

        A row not held (never used, or freed by a deletion) has ``held`` False.
        """
        last = self._last[rows]
        return RowView(
            held=last != _NONE,
            first=self._first[rows],
            last=last,
            engagement=self._engagement[rows],
            days=self._days[rows],
            last_cart=self._last_cart[rows],
            last_purchase=self._last_buy[rows],
            half_life_ms=float(self.rules.engagement_half_life_ms),
            partition=self._part[rows],
        )

    # -- partitions: the unit that moves --------------------------------------

    def rows_of_partition(self, partition: int) -> np.ndarray:
        """The held rows of one partition's users, ascending."""
        high = self._high
        return np.flatnonzero((self._part[:high] == partition) & (self._last[:high] != _NONE))

    def export(self, partition: int) -> tuple[np.ndarray, dict[str, Any]]:
        """A copy of one partition's users as plain data (names, not ids), and their rows.

        The rows let row-keyed neighbours (segments, the funnel) export theirs in
        the same order; :meth:`insert` is the inverse.
        """
        rows = self.rows_of_partition(partition)
        rows = rows[np.argsort(self._uid[rows], kind="stable")]  # the partition's own order
        data: dict[str, Any] = {name[1:]: getattr(self, name)[rows] for name in _COLUMNS}
        del data["recent"]
        ring = self.recent_codes(rows)  # newest first, -1 padded
        used = np.zeros(len(self.items) + 1, dtype=bool)  # no sort of the whole ring
        used[ring.reshape(-1)] = True  # -1 marks the last entry, left out below
        codes = np.flatnonzero(used[:-1])
        names = self.items.names_of(codes)
        order = sorted(range(len(names)), key=names.__getitem__)  # the partition's own order
        rank = np.full(len(used), -1, dtype=np.int64)
        rank[codes[order]] = np.arange(len(order))
        data["recent"] = rank[ring].astype(np.int32)
        data["recent_names"] = [names[i] for i in order]
        data["users"] = [self._users[r] for r in rows.tolist()]
        data["traits"] = {
            i: dict(self._traits[r]) for i, r in enumerate(rows.tolist()) if r in self._traits
        }
        segment = self._seen_segment.get(partition)
        words = self._seen_words
        data["seen"] = (
            np.zeros(words, np.uint64)
            if segment is None
            else self._seen[segment * words : (segment + 1) * words].copy()
        )
        data["next_uid"] = self._next_uid.get(partition, 0)
        data["category_slots"] = list(self._slot_names.get(partition, []))
        return rows, data

    def insert(self, partition: int, data: dict[str, Any]) -> np.ndarray:
        """Hold the users of one partition exported by :meth:`export`; their new rows."""
        users: list[str] = data["users"]
        rows = self._take_rows(len(users))
        for name in _COLUMNS:
            if name != "_recent":
                getattr(self, name)[rows] = data[name[1:]]
        codes = np.append(self.items.ids(data["recent_names"]), 0)  # local -1 (none): id 0
        newest_first = codes[data["recent"]]
        k = self.rules.recent_items
        # The t-th newest item sits in ring slot (pushed - 1 - t) % k.
        slots = (data["recent_n"].astype(np.int64)[:, None] - 1 - np.arange(k)) % k
        recent = np.zeros((len(rows), k), dtype=np.int32)
        np.put_along_axis(recent, slots, newest_first.astype(np.int32), axis=1)
        self._recent[rows] = recent
        for user, row in zip(users, rows.tolist(), strict=True):
            self._index[user] = row
            self._users[row] = user
        for i, traits in data["traits"].items():
            self._traits[int(rows[int(i)])] = dict(traits)
        words = self._seen_words
        segment = self._segment_of(partition)
        self._seen[segment * words : (segment + 1) * words] = data["seen"]
        self._next_uid[partition] = int(data["next_uid"])
        self._slot_names[partition] = []
        slots = {
            int(c) * _PART_SPAN + partition: self._name_slot(partition, int(c))
            for c in self.categories.ids(data["category_slots"]).tolist()
        }
        if slots:
            self._remember_slots(slots)
        return rows

    def forget(self, partition: int) -> np.ndarray:
        """Drop one partition's users (given to another shard); the rows freed."""
        rows = self.rows_of_partition(partition)
        for row in rows.tolist():
            user = self._users[row]
            if user is not None:
                self._index.pop(user, None)
        self._release_rows(rows)
        segment = self._seen_segment.pop(partition, None)
        if segment is not None:
            self._segments[partition] = -1
            words = self._seen_words
            self._seen[segment * words : (segment + 1) * words] = 0
            self._seen_free.append(segment)
        self._next_uid.pop(partition, None)
        self._slot_names.pop(partition, None)
        keep = self._slot_keys % _PART_SPAN != partition
        self._slot_keys, self._slot_values = self._slot_keys[keep], self._slot_values[keep]
        return rows

    # -- internals -----------------------------------------------------------

    def _rows(
        self, user_ids: list[str], parts: np.ndarray, known: np.ndarray | None = None
    ) -> np.ndarray:
        """Row per event; unseen users get a fresh row (the only per-event Python)."""
        get = self._index.get
        if known is None:
            rows = np.fromiter(map(get, user_ids, repeat(-1)), np.int64, len(user_ids))
        else:
            rows = known.astype(np.int64, copy=True)
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            first: dict[str, int] = {}  # each new user, at its first event (arrival order)
            for i in missing.tolist():
                first.setdefault(user_ids[i], i)
            fresh = self._take_rows(len(first))
            at = np.fromiter(first.values(), np.int64, len(first))
            owners = parts[at]
            for user, row in zip(first, fresh.tolist(), strict=True):
                self._index[user] = row
                self._users[row] = user
            self._part[fresh] = owners
            uids = []
            for partition in owners.tolist():
                uid = self._next_uid.get(partition, 0)
                self._next_uid[partition] = (uid + 1) & 0xFFFFFFFF
                uids.append(uid)
            self._uid[fresh] = uids
            rows[missing] = np.fromiter(map(get, [user_ids[i] for i in missing.tolist()]), np.int64)
        return rows

    def _take_rows(self, n: int) -> np.ndarray:
        """``n`` rows reset for new users (freed ones first)."""
        out: list[int] = []
        while self._free and len(out) < n:
            out.append(self._free.pop())
        fresh = n - len(out)
        if fresh:
            while self._high + fresh > self._cap:
                self._grow(2 * self._cap)
            out.extend(range(self._high, self._high + fresh))
            self._high += fresh
        rows = np.array(out, dtype=np.int64)
        self._reset(rows)
        return rows

    def _release_rows(self, rows: np.ndarray, reuse: bool = True) -> None:
        """Free rows (a deleted or forgotten user's), for later users if ``reuse``."""
        for row in rows.tolist():
            self._users[row] = None
        if reuse:
            self._free.extend(rows.tolist())
        self._reset(rows)

    def _count_sessions(self, g: _Groups, old_last: np.ndarray) -> np.ndarray:
        """New session: first event ever, a session_start, or a gap after all earlier arrivals.

        Returns:
            Per sorted event, its continuation gap: ts minus the running max ts of
            the user's earlier arrivals when the event continues a session and that
            is positive, else 0 (the session time the event adds).
        """
        prev = np.empty(len(g.ts), dtype=np.int64)
        prev[1:] = _segmented_cummax(g.ts, g.gid)[:-1]
        prev[g.starts] = old_last
        np.maximum(prev, old_last[g.gid], out=prev)
        has_prev = prev != _NONE
        gap = g.ts - np.where(has_prev, prev, g.ts)
        new = ~has_prev | (g.types == _SESSION_START) | (gap > self.rules.session_gap_ms)
        self._sessions[g.urows] += np.add.reduceat(new.astype(np.int32), g.starts)
        return np.where(new, 0, np.maximum(gap, 0))

    def _add_scores(
        self,
        g: _Groups,
        old_last: np.ndarray,
        new_last: np.ndarray,
        codes: np.ndarray,
    ) -> None:
        """Move engagement and affinity to the new last_seen, then add this batch's events."""
        h = float(self.rules.engagement_half_life_ms)
        decay = np.exp2((np.where(old_last != _NONE, old_last, new_last) - new_last) / h)
        gain = self._weights[g.types] * np.exp2((g.ts - new_last[g.gid]) / h)
        self._engagement[g.urows] = self._engagement[g.urows] * decay + np.add.reduceat(
            gain, g.starts
        )
        moved = decay != 1.0  # fresh rows hold zeros and need no rescaling either
        if moved.any():
            self._affinity[g.urows[moved]] *= decay[moved, None]
        width = self.rules.max_categories
        hit = np.flatnonzero(codes >= 0)
        if hit.size:
            flat = g.rows[hit] * width + codes[hit]
            np.add.at(self._affinity.reshape(-1), flat, gain[hit].astype(np.float32))

    def _mark_days(self, g: _Groups, old_last: np.ndarray, new_last: np.ndarray) -> None:
        """Shift each bitmap to the new last active day, then set the days of this batch."""
        window = self.rules.active_day_window
        new_day = new_last // DAY_MS
        shift = (new_day - np.where(old_last != _NONE, old_last, new_last) // DAY_MS).astype(
            np.uint64
        )
        kept = np.where(shift < 64, self._days[g.urows] << np.minimum(shift, 63), 0)
        back = new_day[g.gid] - g.ts // DAY_MS  # >= 0: new_last is the max
        bits = np.where(back < window, np.uint64(1) << np.minimum(back, 63).astype(np.uint64), 0)
        fresh = np.bitwise_or.reduceat(bits.astype(np.uint64), g.starts)
        self._days[g.urows] = (kept | fresh) & np.uint64((1 << window) - 1)

    def _push_items(self, g: _Groups, codes: np.ndarray) -> None:
        """Write item events into each user's ring, keeping only the last K per user.

        An item equal to the user's previous item is not pushed again, so a
        view -> dwell -> cart -> purchase of one item takes one slot, not four.
        ``codes`` are the batch's item ids in sorted (``g``) order.
        """
        has = codes >= 0
        if not has.any():
            return
        k = self.rules.recent_items
        at = np.flatnonzero(has)
        run_of = g.gid[at]
        latest = self._recent_n[g.urows].astype(np.int64)
        previous = np.where(latest > 0, self._recent[g.urows, (latest - 1) % k], -1)[
            run_of
        ]  # the ring's newest item, for each user's first item in this batch
        same_run = np.r_[False, run_of[1:] == run_of[:-1]]
        previous[same_run] = codes[at][:-1][same_run[1:]]
        has[at[codes[at] == previous]] = False
        cum = np.cumsum(has)
        before: np.ndarray = (cum - has)[g.starts]  # item events in earlier runs
        per_run = np.add.reduceat(has.astype(np.int64), g.starts)
        pos = cum - 1 - before[g.gid]  # 0-based index among this user's items in the batch
        pushed = self._recent_n[g.urows].astype(np.int64)
        write = has & (pos >= per_run[g.gid] - k)
        run = g.gid[write]
        slot = (pushed[run] + pos[write]) % k
        touched = g.urows[per_run > 0]
        self.last_recent_before = (touched, self.recent_codes(touched))
        self._recent[g.urows[run], slot] = codes[write]
        self._recent_n[g.urows] = _fold(pushed + per_run, k)
        self.last_pushes = (g.rows[has], codes[has])

    def _reset(self, rows: np.ndarray) -> None:
        for name in _COLUMNS:
            getattr(self, name)[rows] = 0
        for row in rows.tolist():
            self._traits.pop(row, None)
        self._first[rows] = _MAX
        self._last[rows] = _NONE
        self._last_cart[rows] = _NONE
        self._last_buy[rows] = _NONE

    def _grow(self, cap: int) -> None:
        widths = {
            "types": N_TYPES,
            "items": self.rules.recent_items,
            "categories": self.rules.max_categories,
        }
        for name, (dtype, width) in _COLUMNS.items():
            shape = (cap,) if width is None else (cap, widths[width])
            column: np.ndarray = np.zeros(shape, dtype=dtype)
            if self._cap:
                column[: self._cap] = getattr(self, name)
            setattr(self, name, column)
        self._users.extend([None] * (cap - self._cap))
        self._cap = cap


def _sorted_lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``values`` of ``query`` in the sorted ``keys``, -1 where absent."""
    if not len(keys):
        return np.full(len(query), -1, dtype=np.int64)
    at = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[at] == query, values[at], -1)


_ROW_ARRAYS = (
    "held", "as_of", "counts", "first", "last", "sessions", "dwell", "revenue",
    "engagement", "days", "last_cart", "last_purchase",
)  # fmt: skip


@dataclass
class UserRows:
    """Per-user state of some users, as arrays (see :meth:`UserStateTable.user_rows`).

    ``held`` is False for users the table does not hold; their fields are
    zeros/empty and times are int64 min. ``recent`` is newest first;
    ``affinity`` is as of ``last`` (it halves every ``half_life_ms``).
    """

    user_ids: list[str]
    held: np.ndarray
    as_of: np.ndarray  # int64 "now" of the holder (its newest event time), int64 min if none
    counts: np.ndarray  # int32[n, N_TYPES]
    first: np.ndarray
    last: np.ndarray
    sessions: np.ndarray
    dwell: np.ndarray
    revenue: np.ndarray
    engagement: np.ndarray
    days: np.ndarray
    last_cart: np.ndarray
    last_purchase: np.ndarray
    recent: list[list[str]]
    affinity: list[dict[str, float]]
    traits: list[dict[str, Scalar]]
    half_life_ms: float

    def __len__(self) -> int:
        return len(self.user_ids)

    @classmethod
    def concat(cls, parts: Sequence[UserRows]) -> UserRows:
        """One ``UserRows`` holding the users of ``parts`` in order."""
        if not parts:
            raise ValueError("nothing to concatenate")
        arrays = {name: np.concatenate([getattr(p, name) for p in parts]) for name in _ROW_ARRAYS}
        return cls(
            user_ids=[u for p in parts for u in p.user_ids],
            recent=[r for p in parts for r in p.recent],
            affinity=[a for p in parts for a in p.affinity],
            traits=[t for p in parts for t in p.traits],
            half_life_ms=parts[0].half_life_ms,
            **arrays,
        )

    def take(self, indices: Sequence[int]) -> UserRows:
        """The users at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        pick = idx.tolist()
        arrays = {name: getattr(self, name)[idx] for name in _ROW_ARRAYS}
        return UserRows(
            user_ids=[self.user_ids[i] for i in pick],
            recent=[self.recent[i] for i in pick],
            affinity=[self.affinity[i] for i in pick],
            traits=[self.traits[i] for i in pick],
            half_life_ms=self.half_life_ms,
            **arrays,
        )


class RowView(NamedTuple):
    """Columns of some rows, for vectorised rules (see :meth:`UserStateTable.view`).

    Times are epoch ms; ``last_cart`` and ``last_purchase`` hold int64 min when
    the user never did it; ``days`` bit k means active on day ``last // DAY_MS - k``;
    ``engagement`` is as of ``last`` and halves every ``half_life_ms`` after it.
    """

    held: np.ndarray
    first: np.ndarray
    last: np.ndarray
    engagement: np.ndarray
    days: np.ndarray
    last_cart: np.ndarray
    last_purchase: np.ndarray
    half_life_ms: float
    partition: np.ndarray


class _Groups(NamedTuple):
    """A batch sorted by row; each row's events form a run, in arrival order."""

    order: np.ndarray  # batch index of each sorted event
    rows: np.ndarray
    ts: np.ndarray
    types: np.ndarray
    starts: np.ndarray  # sorted position where each run begins
    gid: np.ndarray  # run number of each sorted event
    urows: np.ndarray  # row of each run


def _group(rows: np.ndarray, ts: np.ndarray, types: np.ndarray) -> _Groups:
    n = len(rows)
    key = np.sort(rows * n + np.arange(n))  # keys are unique, so a plain sort is stable
    order, srows = key % n, key // n
    head = np.empty(n, dtype=bool)
    head[0] = True
    np.not_equal(srows[1:], srows[:-1], out=head[1:])
    starts = np.flatnonzero(head)
    gid = np.cumsum(head) - 1
    return _Groups(order, srows, ts[order], types[order], starts, gid, srows[starts])


def iso_ms(ms: int) -> str:
    """ISO-8601 UTC with milliseconds and a ``Z``, e.g. ``2024-05-01T12:00:00.250Z``."""
    dt = _EPOCH + timedelta(milliseconds=ms)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def _fold(pushed: np.ndarray, k: int) -> np.ndarray:
    """Keep a push counter bounded while preserving ``min(n, k)`` and ``n % k``."""
    return np.where(pushed < k, pushed, k + pushed % k).astype(np.int32)


def _segmented_cummax(values: np.ndarray, gid: np.ndarray) -> np.ndarray:
    """Running max of ``values`` within runs of equal, ascending ``gid``.

    Adding ``gid * span`` makes every run start above the previous one, so a
    single ``maximum.accumulate`` cannot leak across runs. Runs are split into
    passes when that offset would overflow int64 (never, for real timestamps).
    """
    lo = int(values.min())
    span = int(values.max()) - lo + 1
    per = max(1, (1 << 62) // span)  # runs per pass
    out = np.empty_like(values)
    last = int(gid[-1])
    bounds = np.searchsorted(gid, [p * per for p in range(last // per + 1)] + [last + 1])
    for p, (a, b) in enumerate(pairwise(bounds.tolist())):
        offset = (gid[a:b] - p * per) * span
        out[a:b] = np.maximum.accumulate(values[a:b] - lo + offset) - offset + lo
    return out
