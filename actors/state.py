"""Compact per-user state, updated one event batch at a time.

A shard keeps state for millions of users, so it lives in numpy columns indexed
by a row number (one ``dict`` maps user id to row), not in a dict per user, and
every update rule is vectorised over a whole :class:`~actors.batch.EventBatch`.

Every rule except deletion gives the same state however the stream is cut into
batches: extremes and sums are order free, the time-decayed scores are kept as
of the user's ``last_seen`` (rescaled when it moves), the active-days bitmap is
a set, and sessions and recent items follow arrival order, which batching keeps.
A ``user_deleted`` event removes the user after the rest of its batch is applied.
Traits sent with ``identify`` events are merged per user in arrival order (a later
value for a key wins); they live in a dict beside the columns because few users
have them. Which items a user has touched is kept in a Bloom filter keyed by
(row, row generation, item), so recommendations can skip seen items in bounded
memory (a false "seen" is possible, a missed one is not).
Timestamps are assumed validated (1990 to now), so spans fit easily in int64.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from itertools import islice, pairwise, repeat
from typing import Any, NamedTuple

import numpy as np

from actors.batch import EventBatch
from actors.events import EVENT_TYPES, N_TYPES, TYPE_CODE, EventType, Scalar
from actors.sketches._common import _fmix64

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

DEFAULT_WEIGHTS: tuple[float, ...] = (1, 1, 0.5, 3, 5, 4, 4, 10, 2, 0, 0, 0, 0)


@dataclass(frozen=True)
class StateRules:
    """The knobs of the update rules; one instance is shared by live and replay code.

    Attributes:
        session_gap_ms: inactivity longer than this starts a new session.
        engagement_half_life_ms: half-life of engagement and category affinity.
        weights: engagement weight per ``EventType`` code (length ``N_TYPES``).
        recent_items: how many recent item ids each user keeps.
        max_categories: category slots per table; the last slot is "other".
        active_day_window: days covered by the active-days bitmap (at most 64).
        seen_filter_bits: size of the seen-items Bloom filter (a power of two);
            2**24 bits (2 MiB) keep false "seen" answers under 1% up to ~1.5M
            (user, item) pairs per shard.
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
        if self.recent_items < 1 or self.max_categories < 2:
            raise ValueError("recent_items must be >= 1 and max_categories >= 2")
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
    "_recent": (np.int32, "items"),
    "_recent_n": (np.int32, None),  # pushes so far, folded to < 2K (see _fold)
    "_affinity": (np.float32, "categories"),
    "_days": (np.uint64, None),
    "_last_cart": (np.int64, None),  # newest add_to_cart time, _NONE without one
    "_last_buy": (np.int64, None),  # newest purchase time, _NONE without one
    "_generation": (np.uint32, None),  # bumped when a row gets a new user (seen filter)
}
_SEEN_HASHES = 3


class UserStateTable:
    """Per-user state for the users of one shard, in columns grown by doubling.

    Args:
        rules: the update rules.
        capacity: initial number of rows; grows as needed.
    """

    _counts: np.ndarray  # int32[cap, N_TYPES]
    _first: np.ndarray  # int64 min ts
    _last: np.ndarray  # int64 max ts, _NONE for a fresh row
    _sessions: np.ndarray
    _dwell: np.ndarray
    _revenue: np.ndarray
    _engagement: np.ndarray  # as of _last
    _recent: np.ndarray  # int32[cap, K] ring of item codes
    _recent_n: np.ndarray
    _affinity: np.ndarray  # float32[cap, max_categories], as of _last
    _days: np.ndarray  # uint64 bitmap, bit k = active on day (_last // DAY_MS - k)
    _last_cart: np.ndarray  # int64 newest add_to_cart ts, _NONE without one
    _last_buy: np.ndarray  # int64 newest purchase ts, _NONE without one
    _generation: np.ndarray  # uint32, incremented each time the row is handed to a new user

    def __init__(self, rules: StateRules = StateRules(), capacity: int = 1024) -> None:
        self.rules = rules
        self._weights = np.asarray(rules.weights, dtype=np.float64)
        self._index: dict[str, int] = {}
        self._free: list[int] = []
        self._high = 0  # rows ever handed out
        self._cap = 0
        # Interned strings; the None key makes a missing value a plain lookup.
        self._item_codes: dict[str | None, int] = {None: -1}
        self._items: list[str] = []
        self._cat_codes: dict[str | None, int] = {
            None: -1,
            OTHER_CATEGORY: rules.max_categories - 1,
        }
        self._cats: list[str] = []
        self._traits: dict[int, dict[str, Scalar]] = {}  # row -> merged identify traits
        self._seen = np.zeros(rules.seen_filter_bits // 64, dtype=np.uint64)
        self._seen_pairs = 0
        # Per row of the batch last applied: the session time each event adds
        # (0 for a session start), aligned with the batch (see apply).
        self.last_session_gaps_ms: np.ndarray = np.zeros(0, dtype=np.int64)
        # Of the batch last applied: item and category code per event (-1 for
        # none); the items pushed into recent-items rings as (row, code) in row
        # then arrival order; and those rows' rings before the batch, newest
        # first (what ItemGraph pairs new items with).
        self.last_item_codes: np.ndarray = np.zeros(0, dtype=np.int32)
        self.last_category_codes: np.ndarray = np.zeros(0, dtype=np.int32)
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

    def apply(self, batch: EventBatch) -> int:
        """Fold a validated batch into the state, in row (arrival) order.

        Afterwards :attr:`last_session_gaps_ms` holds, per row of ``batch``, the
        session time that event adds (see :meth:`_count_sessions`).

        Returns:
            The number of events applied (all of them; deleted users' included).
        """
        n = len(batch)
        self.last_session_gaps_ms = np.zeros(n, dtype=np.int64)
        self.last_item_codes = np.zeros(0, dtype=np.int32)
        self.last_category_codes = np.zeros(0, dtype=np.int32)
        self.last_pushes = (_EMPTY_I64, _EMPTY_I64)
        self.last_recent_before = (_EMPTY_I64, np.zeros((0, self.rules.recent_items), np.int64))
        if n == 0:
            return 0
        rows = self._rows(batch.user_id)
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
        width = self.rules.max_categories
        self.last_category_codes = _intern(batch.category, self._cat_codes, self._cats, width - 1)
        self._add_scores(g, old_last, new_last, self.last_category_codes[g.order])
        self._mark_days(g, old_last, new_last)
        self.last_item_codes = _intern(batch.item_id, self._item_codes, self._items, None)
        self._push_items(g, self.last_item_codes[g.order])
        self._mark_seen(rows, self.last_item_codes)
        self._merge_traits(rows, batch.traits)

        for i in np.flatnonzero(types == _DELETED).tolist():
            row = self._index.pop(batch.user_id[i], None)
            if row is not None:
                self._free.append(row)
                self._reset(np.array([row]))
        return n

    def _merge_traits(self, rows: np.ndarray, traits: list[dict[str, Scalar] | None]) -> None:
        """Merge each event's traits into its user's, in arrival order (later keys win)."""
        if not any(traits):
            return
        for i in [i for i, sent in enumerate(traits) if sent]:  # few events carry traits
            self._traits.setdefault(int(rows[i]), {}).update(traits[i])  # type: ignore[arg-type]

    def _seen_bits(self, rows: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Bit positions (``_SEEN_HASHES`` per pair) of (row, generation, item) pairs."""
        key = (rows.astype(np.uint64) << np.uint64(32)) | codes.astype(np.uint64)
        key ^= self._generation[rows].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h = _fmix64(key)
        h1, h2 = h & np.uint64(0xFFFFFFFF), (h >> np.uint64(32)) | np.uint64(1)
        mask = np.uint64(self.rules.seen_filter_bits - 1)
        return np.stack([(h1 + np.uint64(k) * h2) & mask for k in range(_SEEN_HASHES)])

    def _mark_seen(self, rows: np.ndarray, codes: np.ndarray) -> None:
        has = np.flatnonzero(codes >= 0)
        if not has.size:
            return
        bits = self._seen_bits(rows[has], codes[has]).reshape(-1)
        np.bitwise_or.at(self._seen, bits >> np.uint64(6), np.uint64(1) << (bits & np.uint64(63)))
        self._seen_pairs += int(has.size)

    def seen(self, user_id: str, item_ids: Sequence[str]) -> np.ndarray:
        """Per item, whether ``user_id`` has touched it (Bloom filter: may say yes wrongly).

        An unknown user or an item never seen by the shard is always False.
        """
        row = self._index.get(user_id)
        out = np.zeros(len(item_ids), dtype=bool)
        if row is None or not item_ids:
            return out
        get = self._item_codes.get
        codes = np.fromiter(map(get, item_ids, repeat(-1)), np.int64, len(item_ids))
        known = np.flatnonzero(codes >= 0)
        if known.size:
            bits = self._seen_bits(np.full(known.size, row, dtype=np.int64), codes[known])
            words = self._seen[bits >> np.uint64(6)]
            hit = (words >> (bits & np.uint64(63))) & np.uint64(1)
            out[known] = hit.all(axis=0)
        return out

    def traits(self, user_id: str) -> dict[str, Scalar]:
        """The user's merged traits (empty for users without identify traits or unknown)."""
        row = self._index.get(user_id)
        return dict(self._traits.get(row, {})) if row is not None else {}

    def item_name(self, code: int) -> str:
        """The item id behind an interned item code."""
        return self._items[code]

    def category_name(self, code: int) -> str | None:
        """The category behind an interned category code (None for -1)."""
        return None if code < 0 else self._cat_name(code)

    def recent_codes(self, rows: np.ndarray) -> np.ndarray:
        """Item codes of each row's recent items, newest first, -1 padded: int64[n, K]."""
        k = self.rules.recent_items
        pushed = self._recent_n[rows].astype(np.int64)
        t = np.arange(k)
        ring = self._recent[rows[:, None], (pushed[:, None] - 1 - t) % k].astype(np.int64)
        return np.where(t < np.minimum(pushed, k)[:, None], ring, -1)

    def profile(self, user_id: str) -> dict[str, Any] | None:
        """The user's state as a JSON-ready dict, or ``None`` for an unknown user."""
        row = self._index.get(user_id)
        if row is None:
            return None
        counts = self._counts[row].tolist()
        k = self.rules.recent_items
        pushed = int(self._recent_n[row])
        ring = self._recent[row].tolist()
        recent = [self._items[ring[(pushed - 1 - t) % k]] for t in range(min(pushed, k))]
        affinity = self._affinity[row].tolist()
        slots = [(w, c) for c, w in enumerate(affinity) if w != 0.0]
        slots.sort(key=lambda wc: (-wc[0], self._cat_name(wc[1])))
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
            "recent_items": recent,
            "category_affinity": {self._cat_name(c): w for w, c in slots},
            "active_days": int(np.bitwise_count(self._days[row])),
            "traits": dict(self._traits.get(row, {})),
        }

    def user_rows(self, user_ids: Sequence[str], as_of_ms: int | None = None) -> UserRows:
        """The compact state of ``user_ids`` that model features are computed from.

        Serving fetches this from the owning shard, training takes it from a
        replay at each label's cutoff: both then run the same feature code.
        ``as_of_ms`` is the holder's "now" (a shard's newest event time), kept
        per row because a request's rows come from several shards.
        """
        rows = self.rows_of(user_ids)
        held = rows >= 0
        at = np.where(held, rows, 0)
        recent = self.recent_codes(at)
        names = self._items
        affinity = self._affinity[at]
        return UserRows(
            user_ids=list(user_ids),
            held=held,
            as_of=np.full(len(held), _NONE if as_of_ms is None else as_of_ms, dtype=np.int64),
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
                {self._cat_name(c): w for c, w in enumerate(weights) if w} if ok else {}
                for ok, weights in zip(held.tolist(), affinity.tolist(), strict=True)
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
        total += sys.getsizeof(self._free) + 8 * len(self._free)
        total += sys.getsizeof(self._item_codes) + sys.getsizeof(self._items)
        total += sum(sys.getsizeof(s) + 28 for s in self._items)  # name + its int code
        total += sys.getsizeof(self._cat_codes) + sum(sys.getsizeof(s) for s in self._cats)
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
        )

    # -- internals -----------------------------------------------------------

    def _cat_name(self, code: int) -> str:
        return self._cats[code] if code < len(self._cats) else OTHER_CATEGORY

    def _rows(self, user_ids: list[str]) -> np.ndarray:
        """Row per event; unseen users get a fresh row (the only per-event Python)."""
        get = self._index.get
        rows = np.fromiter(map(get, user_ids, repeat(-1)), np.int64, len(user_ids))
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            fresh = []
            for i in missing.tolist():
                user = user_ids[i]
                row = self._index.get(user)
                if row is None:
                    if self._free:
                        row = self._free.pop()
                    else:
                        if self._high == self._cap:
                            self._grow(2 * self._cap)
                        row = self._high
                        self._high += 1
                    self._index[user] = row
                    fresh.append(row)
                rows[i] = row
            self._reset(np.array(fresh, dtype=np.int64))
        return rows

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
        ``codes`` are the batch's item codes in sorted (``g``) order.
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
        generation = self._generation[rows] + np.uint32(1)
        for name in _COLUMNS:
            getattr(self, name)[rows] = 0
        self._generation[rows] = generation
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
        self._cap = cap


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


def _intern(
    values: list[str | None], codes: dict[str | None, int], names: list[str], limit: int | None
) -> np.ndarray:
    """Codes for strings (-1 for None), adding new names; past ``limit`` they map to it."""
    get = codes.get
    out = np.fromiter(map(get, values, repeat(-2)), np.int32, len(values))
    unknown = np.flatnonzero(out == -2)
    for i in unknown.tolist():
        name = values[i]
        assert name is not None
        code = codes.get(name)
        if code is None:
            if limit is not None and len(names) >= limit:
                code = limit  # overflow bucket, not remembered: the vocabulary stays bounded
            else:
                code = len(names)
                codes[name] = code
                names.append(name)
        out[i] = code
    return out


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
