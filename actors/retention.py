"""Cohort retention and DAU/WAU/MAU as a mergeable per-shard partial aggregate.

Each shard folds its batches into a :class:`RetentionAggregate`; the serving
layer merges the shards' aggregates and answers from the merge alone, so a
query never scans users. Every distinct count is a HyperLogLog register array
(the registers :class:`~actors.sketches.HyperLogLog` builds, with its estimator):

* cell ``(c, k)``: users of cohort ``c`` (first-seen UTC day) active on day ``c + k``,
  for ``0 <= k <= max_offset``; the cohort size is the union of its cells (the
  user's first event lands in ``(c, 0)``);
* day ``d``: users active on day ``d``; WAU and MAU are unions of 7 and 30 days.

Why sketches rather than exact per-shard counts: register-wise max is
idempotent, so answers depend only on the *set* of ``(user, cohort day,
activity day)`` facts. Arrival order, batching and redelivery of a batch change
nothing, and merging is associative and commutative. The price is that a
sketch cannot forget: when a late event moves a user's first-seen to an
earlier day, the user stays counted in its old cohort as well (with its earlier
activity at the old offsets). Every answer states ``relative_error``, the
standard error ``1.04 / sqrt(2**precision)`` of a count (2.3 % at 11); below
``0.75 * 2**precision`` users linear counting does better, ``1 / sqrt(2**(p+1))``
(1.6 %, under one user for a few dozen). A share divides two counts, so its
relative error is up to about ``sqrt(2)`` times that.

Memory is bounded: cohorts older than ``max_cohorts`` days and activity days
older than ``max_days`` days before the latest day seen are dropped, so a shard
holds at most ``(max_cohorts * (max_offset + 1) + max_days) * 2**precision``
bytes of registers (6.6 MiB at the defaults, far less while cells are empty).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable
from datetime import date, timedelta
from typing import Any

import numpy as np

from actors.batch import EventBatch
from actors.events import TYPE_CODE, EventType
from actors.folded import Folded
from actors.sketches import HyperLogLog, SketchError, stable_hash64
from actors.windows import hll_slots

DAY_MS = 86_400_000
MILESTONES = (1, 7, 30)
_DELETED = TYPE_CODE[EventType.USER_DELETED]
_MAGIC = b"RET\x01"
_HLL_HEAD = b"HLL\x01"  # HyperLogLog.to_bytes header, to reuse its estimator
_EPOCH = date(1970, 1, 1)


def day_of(ts_ms: int) -> int:
    """The UTC day number (days since 1970-01-01) of an epoch-ms time."""
    return ts_ms // DAY_MS


def iso_day(day: int) -> str:
    """A day number as ``YYYY-MM-DD``."""
    return (_EPOCH + timedelta(days=day)).isoformat()


class RetentionAggregate:
    """One shard's retention partial: cohort curves and daily actives, as sketches.

    Args:
        precision: HyperLogLog index bits (11: 2 KiB per cell, 2.3 % standard error).
        max_offset: last day after first-seen that cohort curves track (at least 30).
        max_cohorts: cohort days kept before the latest day seen.
        max_days: activity days kept for DAU/WAU/MAU (at least 30).

    Raises:
        SketchError: on a bad precision or bounds.
    """

    def __init__(
        self, precision: int = 11, max_offset: int = 35, max_cohorts: int = 90, max_days: int = 90
    ) -> None:
        if max_offset < max(MILESTONES) or max_cohorts < 1 or max_days < 30:
            raise SketchError(
                "bad_config", "need max_offset >= 30, max_cohorts >= 1, max_days >= 30"
            )
        self._error = HyperLogLog(precision).relative_error  # also validates precision
        self.precision, self.max_offset = precision, max_offset
        self.max_cohorts, self.max_days = max_cohorts, max_days
        self._m, self._width = 1 << precision, max_offset + 1
        self._cells: dict[int, np.ndarray] = {}  # cohort * width + offset -> registers
        self._days: dict[int, np.ndarray] = {}  # activity day -> registers
        self.latest_day: int | None = None
        self.rejected = 0  # events earlier than the first-seen passed with them

    @property
    def relative_error(self) -> float:
        """Standard error of every count relative to the true count."""
        return self._error

    def update(self, batch: EventBatch, first_seen_ms: np.ndarray) -> None:
        """Fold a batch in.

        Args:
            batch: the events; ``user_deleted`` events are not activity and are skipped.
            first_seen_ms: per event, its user's first-seen time (epoch ms) as the
                shard's state table holds it *after* applying this batch, i.e. the
                minimum ``ts`` over every event of the user applied so far. An event
                with ``ts`` before it breaks that contract: it is counted in
                :attr:`rejected` and left out of the cohorts (not out of DAU).

        Raises:
            SketchError: if ``first_seen_ms`` does not have one entry per event.
        """
        first = np.asarray(first_seen_ms, dtype=np.int64)
        if first.shape != (len(batch),):
            raise SketchError("bad_first_seen", f"{first.shape} for {len(batch)} events")
        keep = np.flatnonzero(batch.type != _DELETED)
        if keep.size == 0:
            return
        idx, rank = self._slots(stable_hash64(batch.user_id)[keep])
        day = batch.ts[keep] // DAY_MS
        cohort = first[keep] // DAY_MS
        offset = day - cohort
        latest = int(day.max()) if self.latest_day is None else max(self.latest_day, int(day.max()))
        self.latest_day = latest
        self.rejected += int(np.count_nonzero(offset < 0))
        recent = day > latest - self.max_days
        _fold(self._days, day[recent], idx[recent], rank[recent], self._m)
        cell = (offset >= 0) & (offset <= self.max_offset) & (cohort > latest - self.max_cohorts)
        key = cohort[cell] * self._width + offset[cell]
        _fold(self._cells, key, idx[cell], rank[cell], self._m)
        self._prune()

    def merge(self, other: RetentionAggregate) -> None:
        """Fold another shard's aggregate into this one (associative, commutative).

        Raises:
            SketchError: if the two were built with different settings.
        """
        if other._settings() != self._settings():
            raise SketchError("config_mismatch", f"{other._settings()} vs {self._settings()}")
        for mine, theirs in ((self._cells, other._cells), (self._days, other._days)):
            for k, regs in theirs.items():
                if k in mine:
                    np.maximum(mine[k], regs, out=mine[k])
                else:
                    mine[k] = regs.copy()
        seen = [d for d in (self.latest_day, other.latest_day) if d is not None]
        self.latest_day = max(seen, default=None)
        self.rejected += other.rejected
        self._prune()

    # -- queries ------------------------------------------------------------

    def cohort_table(
        self, start_day: int | None = None, end_day: int | None = None
    ) -> list[dict[str, Any]]:
        """Per cohort day in ``[start_day, end_day]``: size, day 1/7/30 shares and the curve.

        A share is ``None`` (and the curve stops) where the day is not yet
        observable: cohort day + k after the latest day seen.
        """
        out = []
        for c in self._cohorts(start_day, end_day):
            cells = self._cohort_cells(c)
            size = self._count(cells)
            horizon = min(self.max_offset, self._latest() - c)
            curve = [self._share(self._count(cells[k : k + 1]), size) for k in range(horizon + 1)]
            row: dict[str, Any] = {"cohort_day": c, "date": iso_day(c), "size": round(size)}
            row.update({f"day_{k}": curve[k] if k <= horizon else None for k in MILESTONES})
            out.append(row | {"curve": curve, "relative_error": self._error})
        return out

    def rolling_retention(
        self, n: int, start_day: int | None = None, end_day: int | None = None
    ) -> dict[str, Any]:
        """Share of each cohort active on day ``n`` or any later tracked day (to ``max_offset``).

        Only cohorts whose day ``n`` has been observed take part; ``share`` pools
        them (cohorts are disjoint, so sizes add up).

        Raises:
            SketchError: if ``n`` is outside ``[1, max_offset]``.
        """
        if not 1 <= n <= self.max_offset:
            raise SketchError("bad_offset", f"n must be in [1, {self.max_offset}], got {n}")
        rows, total, retained = [], 0.0, 0.0
        for c in self._cohorts(start_day, end_day):
            if c + n > self._latest():
                continue
            cells = self._cohort_cells(c)
            size, later = self._count(cells), self._count(cells[n:])
            total, retained = total + size, retained + later
            share = self._share(later, size)
            rows.append({"cohort_day": c, "date": iso_day(c), "size": round(size), "share": share})
        share = self._share(retained, total)
        return {"n": n, "share": share, "cohorts": rows, "relative_error": self._error}

    def active_users(self, day: int | None = None) -> dict[str, Any]:
        """DAU, WAU, MAU (windows ending on ``day``, default the latest) and DAU/MAU.

        ``complete`` is false when part of the 30-day window is older than the
        days kept, so WAU/MAU would under-count.

        Raises:
            SketchError: if no event has been seen yet.
        """
        d = self._latest() if day is None else day
        dau, wau, mau = (
            self._count(self._days.get(x) for x in range(d - w, d + 1)) for w in (0, 6, 29)
        )
        return {
            "day": d,
            "date": iso_day(d),
            "dau": round(dau),
            "wau": round(wau),
            "mau": round(mau),
            "stickiness": self._share(dau, mau),
            "complete": d - 29 > self._latest() - self.max_days,
            "relative_error": self._error,
        }

    def to_dict(self) -> dict[str, Any]:
        """Every answer for the retained window, JSON-ready."""
        if self.latest_day is None:
            return {"latest_day": None, "relative_error": self._error, "cohorts": []}
        return {
            "latest_day": self.latest_day,
            "relative_error": self._error,
            "rejected_events": self.rejected,
            "active": self.active_users(),
            "rolling": {str(n): self.rolling_retention(n)["share"] for n in MILESTONES},
            "cohorts": self.cohort_table(),
        }

    def nbytes(self) -> int:
        """Bytes of registers held."""
        return (len(self._cells) + len(self._days)) * self._m

    # -- snapshot -----------------------------------------------------------

    def snapshot(self) -> bytes:
        """Plain bytes: a JSON header, then the zlib-compressed registers in key order."""
        cells, days = sorted(self._cells), sorted(self._days)
        head = self._settings() | {"latest_day": self.latest_day, "rejected": self.rejected}
        raw = json.dumps(head | {"cells": cells, "days": days}).encode()
        regs = b"".join(
            [self._cells[k].tobytes() for k in cells] + [self._days[k].tobytes() for k in days]
        )
        return _MAGIC + struct.pack("<I", len(raw)) + raw + zlib.compress(regs, 1)

    @classmethod
    def restore(cls, data: bytes) -> RetentionAggregate:
        """Rebuild an aggregate from :meth:`snapshot`.

        Raises:
            SketchError: if ``data`` is not such a snapshot.
        """
        try:
            if data[:4] != _MAGIC:
                raise ValueError("magic")
            (n,) = struct.unpack_from("<I", data, 4)
            head = json.loads(data[8 : 8 + n])
            agg = cls(head["precision"], head["max_offset"], head["max_cohorts"], head["max_days"])
            keys = head["cells"] + head["days"]
            regs = np.frombuffer(zlib.decompress(data[8 + n :]), dtype=np.uint8)
            regs = regs.reshape(len(keys), agg._m)
            if regs.size and int(regs.max()) > 65 - agg.precision:
                raise ValueError("register value out of range")
        except (ValueError, KeyError, TypeError, struct.error, zlib.error) as exc:
            raise SketchError("bad_snapshot", f"not a retention snapshot: {exc}") from exc
        split = len(head["cells"])
        agg._cells = {int(k): regs[i].copy() for i, k in enumerate(head["cells"])}
        agg._days = {int(k): regs[split + i].copy() for i, k in enumerate(head["days"])}
        agg.latest_day, agg.rejected = head["latest_day"], int(head["rejected"])
        return agg

    # -- internals ----------------------------------------------------------

    def _settings(self) -> dict[str, int]:
        names = ("precision", "max_offset", "max_cohorts", "max_days")
        return {name: getattr(self, name) for name in names}

    def _cohort_cells(self, c: int) -> list[np.ndarray | None]:
        return [self._cells.get(c * self._width + k) for k in range(self._width)]

    def _latest(self) -> int:
        if self.latest_day is None:
            raise SketchError("empty", "no events yet")
        return self.latest_day

    def _slots(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Register index and rank per hash, exactly as ``HyperLogLog.add_hashes`` does."""
        return hll_slots(h, self.precision)

    def _prune(self) -> None:
        if self.latest_day is None:
            return
        floor_c, floor_d = self.latest_day - self.max_cohorts, self.latest_day - self.max_days
        if any(k // self._width <= floor_c for k in self._cells):
            self._cells = {k: v for k, v in self._cells.items() if k // self._width > floor_c}
        if any(d <= floor_d for d in self._days):
            self._days = {d: v for d, v in self._days.items() if d > floor_d}

    def _cohorts(self, start: int | None, end: int | None) -> list[int]:
        lo = -(2**62) if start is None else start
        hi = 2**62 if end is None else end
        return sorted({c for c in (k // self._width for k in self._cells) if lo <= c <= hi})

    def _count(self, parts: Iterable[np.ndarray | None]) -> float:
        """Estimated distinct users in the union of some register arrays (0 for none)."""
        arrays = [p for p in parts if p is not None]
        if not arrays:
            return 0.0
        regs = arrays[0] if len(arrays) == 1 else np.maximum.reduce(arrays)
        return HyperLogLog.from_bytes(_HLL_HEAD + bytes([self.precision]) + regs.tobytes()).count()

    @staticmethod
    def _share(part: float, whole: float) -> float | None:
        return None if whole <= 0 else min(1.0, part / whole)


def _fold(
    store: dict[int, np.ndarray], keys: np.ndarray, idx: np.ndarray, rank: np.ndarray, m: int
) -> None:
    """Max ``rank`` into register ``idx`` of ``store[key]``, one scatter for the whole batch."""
    if keys.size == 0:
        return
    uniq, inv = np.unique(keys, return_inverse=True)
    tmp = np.zeros((uniq.size, m), dtype=np.uint8)
    np.maximum.at(tmp.reshape(-1), inv * m + idx, rank)
    for i, k in enumerate(uniq.tolist()):
        if k in store:
            np.maximum(store[k], tmp[i], out=store[k])
        else:
            store[k] = tmp[i].copy()


_KIND_SHIFT = 40  # keys: (partition * 2 + kind) << 40 | cell or day
_CELL, _DAY = 0, 1


class _Cohorts:
    """One partition's retention bookkeeping: its latest day, rejects and register slots."""

    def __init__(self) -> None:
        self.latest_day: int | None = None
        self.rejected = 0
        self.slots: dict[int, int] = {}  # (kind << _KIND_SHIFT) | key -> register slot


class RetentionFolds:
    """Retention of a shard's partitions: one :class:`RetentionAggregate` each, folded at once.

    Every partition keeps its own cohorts, days and latest day (so it can move),
    in one register matrix: a fold of many partitions' events is one scatter.
    :meth:`partial` gives a partition's :meth:`RetentionAggregate.snapshot`.
    """

    def __init__(
        self, precision: int = 11, max_offset: int = 35, max_cohorts: int = 90, max_days: int = 90
    ) -> None:
        self.template = RetentionAggregate(precision, max_offset, max_cohorts, max_days)
        self._m = 1 << precision
        self._width = max_offset + 1
        self._registers = np.zeros((64, self._m), dtype=np.uint8)
        self._free = list(range(63, -1, -1))
        self._parts: dict[int, _Cohorts] = {}
        self._cache: dict[int, bytes] = {}  # partition -> snapshot, until it changes

    def fold(self, f: Folded) -> None:
        """Fold events in; deletions and events of users no longer held are not activity."""
        keep = np.flatnonzero((f.type != _DELETED) & (f.first_seen >= 0))
        if keep.size == 0:
            return
        t = self.template
        parts = f.partition[keep]
        idx, rank = hll_slots(f.user_hash[keep], t.precision)
        day = f.ts[keep] // DAY_MS
        cohort = f.first_seen[keep] // DAY_MS
        offset = day - cohort
        touched = np.unique(parts).tolist()
        latest = np.full(max(touched) + 1, -(2**62), dtype=np.int64)
        np.maximum.at(latest, parts, day)
        rejected = np.bincount(parts[offset < 0], minlength=len(latest))
        for p in touched:
            state = self._parts.setdefault(p, _Cohorts())
            top = int(latest[p])
            state.latest_day = top if state.latest_day is None else max(state.latest_day, top)
            latest[p] = state.latest_day
            state.rejected += int(rejected[p])
            self._cache.pop(p, None)
        now = latest[parts]
        recent = day > now - t.max_days
        cell = (offset >= 0) & (offset <= t.max_offset) & (cohort > now - t.max_cohorts)
        keys = np.concatenate(
            [
                ((parts[recent] * 2 + _DAY) << _KIND_SHIFT) | day[recent],
                ((parts[cell] * 2 + _CELL) << _KIND_SHIFT)
                | (cohort[cell] * self._width + offset[cell]),
            ]
        )
        if keys.size:
            unique, inverse = np.unique(keys, return_inverse=True)
            slots = np.array([self._slot(int(k)) for k in unique.tolist()], dtype=np.int64)
            at = slots[inverse] * self._m + np.concatenate([idx[recent], idx[cell]])
            ranks = np.concatenate([rank[recent], rank[cell]])
            np.maximum.at(self._registers.reshape(-1), at, ranks)
        for p in touched:
            self._prune(p)

    def _slot(self, key: int) -> int:
        p, local = key >> (_KIND_SHIFT + 1), key & ((1 << (_KIND_SHIFT + 1)) - 1)
        slots = self._parts[p].slots
        slot = slots.get(local)
        if slot is None:
            if not self._free:
                have = len(self._registers)
                self._registers = np.concatenate([self._registers, np.zeros_like(self._registers)])
                self._free = list(range(2 * have - 1, have - 1, -1))
            slot = slots[local] = self._free.pop()
        return slot

    def _prune(self, p: int) -> None:
        state, t = self._parts[p], self.template
        assert state.latest_day is not None
        floor_c, floor_d = state.latest_day - t.max_cohorts, state.latest_day - t.max_days
        mask = (1 << _KIND_SHIFT) - 1
        for local in list(state.slots):
            kind, key = local >> _KIND_SHIFT, local & mask
            if (kind == _CELL and key // self._width <= floor_c) or (
                kind == _DAY and key <= floor_d
            ):
                slot = state.slots.pop(local)
                self._registers[slot] = 0
                self._free.append(slot)

    def partitions(self) -> list[int]:
        """Partitions with retention state."""
        return sorted(self._parts)

    def aggregate(self, partition: int) -> RetentionAggregate:
        """A partition's retention as a :class:`RetentionAggregate` (registers copied)."""
        t = self.template
        agg = RetentionAggregate(t.precision, t.max_offset, t.max_cohorts, t.max_days)
        state = self._parts.get(partition)
        if state is None:
            return agg
        mask = (1 << _KIND_SHIFT) - 1
        for local, slot in state.slots.items():
            store = agg._cells if local >> _KIND_SHIFT == _CELL else agg._days
            store[local & mask] = self._registers[slot].copy()
        agg.latest_day, agg.rejected = state.latest_day, state.rejected
        return agg

    def partial(self, partition: int) -> bytes:
        """A partition's :meth:`RetentionAggregate.snapshot` (kept until the partition changes)."""
        cached = self._cache.get(partition)
        if cached is None:
            cached = self._cache[partition] = self.aggregate(partition).snapshot()
        return cached

    def export(self, partition: int) -> dict[str, Any]:
        """A partition's retention as plain data (see :meth:`insert`)."""
        state = self._parts.get(partition) or _Cohorts()
        keys = sorted(state.slots)
        slots = np.array([state.slots[k] for k in keys], dtype=np.int64)
        return {
            "keys": keys,
            "registers": self._registers[slots],
            "latest_day": state.latest_day,
            "rejected": state.rejected,
        }

    def insert(self, partition: int, data: dict[str, Any]) -> None:
        """Take over a partition exported by :meth:`export` (not held here)."""
        state = self._parts[partition] = _Cohorts()
        state.latest_day, state.rejected = data["latest_day"], int(data["rejected"])
        prefix = partition << (_KIND_SHIFT + 1)
        for key, registers in zip(data["keys"], data["registers"], strict=True):
            slot = self._slot(prefix | int(key))  # may grow the matrix: before indexing it
            self._registers[slot] = registers
        self._cache.pop(partition, None)

    def forget(self, partition: int) -> None:
        """Drop a partition."""
        state = self._parts.pop(partition, None)
        self._cache.pop(partition, None)
        if state is not None:
            for slot in state.slots.values():
                self._registers[slot] = 0
                self._free.append(slot)

    def nbytes(self) -> int:
        """Bytes of the register matrix."""
        return self._registers.nbytes
