"""A believable, deterministic audience: the traffic behind ``audience simulate`` and benchmarks.

Throughput and realism are separate knobs. ``rate`` fixes how many events each
wall-clock chunk holds (exactly ``round(rate * t)`` events by wall offset ``t``);
the :class:`AudienceModel` decides what those events are: heavy-tailed users,
some of them fading away (future churners), sessions of Zipf-popular items with
a purchase funnel, and a daily cycle.

How the pieces fit, so the numbers can be read:

* **Event clock.** Event time runs ``time_scale`` times faster than wall time
  on average, but it is warped by the daily cycle: an hour with intensity
  ``1 + daily_amplitude * cos(hour - peak)`` receives that many times the mean
  share of events, so quiet hours pass faster in wall time. Over each whole
  simulated day the clock agrees with the linear one; within the day it leads or
  lags by at most ``daily_amplitude * 86400 / pi`` seconds of event time
  (``daily_amplitude=0`` gives the exact linear clock).
* **Lanes.** Event times are slots spread over a chunk's event-time window;
  each slot goes to one of ``L`` lanes at random, and a lane plays sessions one
  after another, one user at a time. ``L`` is chosen so that consecutive
  events of a session are about ``event_gap_s`` event seconds apart (at mean
  intensity; quiet hours stretch the gaps), capped at an eighth of the users: a
  busy simulation compresses sessions (rather than overlapping a user's sessions
  or leaving most of them unfinished), and the first ``L`` sessions start at once.
* **Users.** A session goes to a user drawn by (possibly fading) activity weight
  among the users not in a session and idle for ``session_gap_s``. No user is
  ever in two sessions at once, and every batch is sorted by ``ts``, so event
  time never goes backwards for a user, within or across batches. A user's first
  session opens with ``signup`` and ``identify`` (with traits).

Everything random comes from one seed; identical arguments (including the
sequence of :meth:`Simulator.batches` calls and ``chunk_s``) give identical events.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np

from actors.batch import EventBatch
from actors.events import SOURCE_CODE, TYPE_CODE, EventType, Scalar, Source

__all__ = ["AudienceModel", "SimChunk", "Simulator"]

DAY_S = 86_400.0
_T = {t: np.uint8(c) for t, c in TYPE_CODE.items()}
_VIEW_ACTIONS = (EventType.CLICK, EventType.LIKE, EventType.SHARE, EventType.COMMENT)
_PLANS = ("free", "pro", "team")
_PLAN_P = (0.72, 0.23, 0.05)
_COUNTRIES = ("US", "GB", "DE", "FR", "IN", "BR", "JP")
_COUNTRY_P = (0.34, 0.1, 0.1, 0.08, 0.18, 0.12, 0.08)
_DEVICES = ("web", "ios", "android", "tv")
_DEVICE_P = (0.45, 0.25, 0.25, 0.05)
_DEVICE_SOURCE = np.array(
    [SOURCE_CODE[s] for s in (Source.WEB, Source.MOBILE, Source.MOBILE, Source.IOT)], np.uint8
)
_SOCIAL = np.uint8(SOURCE_CODE[Source.SOCIAL])
_ROW = np.dtype(
    [("user", np.int64), ("item", np.int32), ("value", np.float64), ("type", np.uint8),
     ("source", np.uint8)]
)  # fmt: skip


@dataclass(frozen=True)
class AudienceModel:
    """How the simulated audience behaves; defaults resemble a mid-size shop/media site."""

    items: int = 5000  # catalogue size
    categories: int = 20  # each item belongs to one, fixed by the seed
    zipf_exponent: float = 1.1  # item popularity ~ 1 / rank**exponent
    activity_sigma: float = 1.0  # lognormal sigma of per-user activity weights
    fading_share: float = 0.2  # share of users whose activity fades (future churners)
    fade_half_life_s: float = 2 * DAY_S  # event time for a fading user's weight to halve
    views_per_session: float = 5.0  # mean of the geometric number of page views
    event_gap_s: float = 8.0  # mean event time between events of a session
    session_gap_s: float = 1800.0  # a user rests this long (event time) between sessions
    category_affinity: float = 0.7  # share of views from the user's 1-3 preferred categories
    p_click: float = 0.15  # per view
    p_like: float = 0.04  # per view
    p_share: float = 0.01  # per view
    p_comment: float = 0.01  # per view
    p_add_to_cart: float = 0.08  # per view
    p_purchase_given_cart: float = 0.3  # the carted item is bought before the session ends
    p_social: float = 0.1  # share of sessions arriving from a social link (source social)
    dwell_median_s: float = 20.0  # dwell seconds are lognormal around this
    dwell_sigma: float = 0.9
    price_median: float = 25.0  # item prices are lognormal around this, fixed per item
    price_sigma: float = 0.8
    daily_amplitude: float = 0.5  # daily cycle of activity in event time, 0 = flat
    peak_hour_utc: float = 20.0  # the busiest hour of the day (evening UTC)

    def __post_init__(self) -> None:
        for f in fields(self):
            share = f.name.startswith("p_") or f.name in ("fading_share", "category_affinity")
            if share and not 0.0 <= getattr(self, f.name) <= 1.0:
                raise ValueError(f"{f.name} must be within [0, 1]")
        if self.items < 1 or self.categories < 1:
            raise ValueError("items and categories must be at least 1")
        if not 0.0 <= self.daily_amplitude < 1.0:
            raise ValueError("daily_amplitude must be within [0, 1)")
        if self.views_per_session < 1.0:
            raise ValueError("views_per_session must be at least 1")
        if min(self.fade_half_life_s, self.event_gap_s, self.dwell_median_s) <= 0:
            raise ValueError("fade_half_life_s, event_gap_s and dwell_median_s must be positive")

    @property
    def mean_session_events(self) -> float:
        """Expected events per session (without the one-off signup and identify)."""
        per_view = 2 + self.p_click + self.p_like + self.p_share + self.p_comment
        per_view += self.p_add_to_cart * (1 + self.p_purchase_given_cart)
        return 2 + self.views_per_session * per_view


class SimChunk(NamedTuple):
    """One chunk of a run: publish ``batch`` at ``wall_offset_s`` after the run started."""

    wall_offset_s: float
    batch: EventBatch


class Simulator:
    """A stream of simulated audience events, generated chunk by chunk.

    The simulator is stateful: a second :meth:`batches` call continues the same
    audience (event time, sessions in flight, event ids) where the first stopped.
    """

    def __init__(
        self,
        users: int,
        seed: int,
        start_ms: int,
        model: AudienceModel = AudienceModel(),  # frozen: sharing the default is safe
        time_scale: float = 1.0,
    ) -> None:
        if users < 1:
            raise ValueError("users must be at least 1")
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.users, self.seed, self.start_ms = users, seed, start_ms
        self.model, self.time_scale = model, time_scale
        m = model
        catalogue, people, run = (
            np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
        )
        self._rng = run
        # Catalogue: popularity by a random rank, a category and a price per item.
        rank = catalogue.permutation(m.items) + 1
        pop = rank.astype(np.float64) ** -m.zipf_exponent
        self._item_cat = catalogue.integers(m.categories, size=m.items)
        self._price = np.maximum(
            np.round(catalogue.lognormal(math.log(m.price_median), m.price_sigma, m.items), 2),
            0.5,
        )
        self._cdf = np.cumsum(pop)
        self._cdf /= self._cdf[-1]
        # Per-category cdfs shifted by the category number, so one searchsorted serves all.
        self._by_cat = np.argsort(self._item_cat, kind="stable")
        sorted_cat = self._item_cat[self._by_cat]
        within = np.cumsum(pop[self._by_cat])
        starts = np.searchsorted(sorted_cat, sorted_cat)
        base = np.concatenate([[0.0], within])[starts]
        totals = np.bincount(sorted_cat, weights=pop[self._by_cat], minlength=m.categories)
        self._cat_keys = sorted_cat + (within - base) / totals[sorted_cat]
        last = np.r_[sorted_cat[1:] != sorted_cat[:-1], True]
        self._cat_keys[last] = sorted_cat[last] + 1.0
        width = max(5, len(str(m.items - 1)))
        self._item_names: list[str | None] = [f"item-{i:0{width}d}" for i in range(m.items)]
        self._item_names.append(None)  # item -1 means "no item"
        cat_names = [f"cat-{c:02d}" for c in range(m.categories)]
        self._cat_names: list[str | None] = [cat_names[c] for c in self._item_cat.tolist()]
        self._cat_names.append(None)
        # Users: activity, fading, preferred categories, traits.
        self._weight = people.lognormal(0.0, m.activity_sigma, users)
        self._fading = people.random(users) < m.fading_share
        used_cats = np.unique(self._item_cat)
        self._prefs = used_cats[people.integers(len(used_cats), size=(users, 3))]
        self._n_prefs = people.integers(1, 4, users)
        self._plan = people.choice(len(_PLANS), users, p=_PLAN_P)
        self._country = people.choice(len(_COUNTRIES), users, p=_COUNTRY_P)
        self._device = people.choice(len(_DEVICES), users, p=_DEVICE_P)
        self._user_names = [f"user-{i:07d}" for i in range(1, users + 1)]
        # Run state.
        self._introduced = np.zeros(users, bool)
        self._busy = np.zeros(users, bool)
        self._free_at = np.full(users, -np.inf)
        self._user_lane = np.full(users, -1, np.int64)
        self._lanes = 0
        self._pos, self._end, self._last_user = (np.zeros(0, np.int64) for _ in range(3))
        self._open_user, self._open_lane, self._open_end = (np.zeros(0, np.int64) for _ in range(3))
        self._store = np.empty(1024, _ROW)
        self._size = 0
        self._wall_s = 0.0  # wall seconds generated by earlier batches() calls
        self._tau_s = 0.0  # event seconds since start_ms at the end of the last chunk
        self._next_id = 0
        self._weights_at = -np.inf
        self._user_cdf = np.zeros(users)
        peak = 2 * math.pi * m.peak_hour_utc / 24
        self._phase0 = 2 * math.pi * ((start_ms / 1000.0) % DAY_S) / DAY_S - peak

    @property
    def fading_user_ids(self) -> list[str]:
        """The users whose activity fades: ground truth for evaluating churn models."""
        return [self._user_names[i] for i in np.flatnonzero(self._fading).tolist()]

    def batches(self, rate: float, duration_s: float, chunk_s: float = 0.1) -> Iterator[SimChunk]:
        """Yield ``duration_s`` of traffic at ``rate`` events per wall second, chunk by chunk.

        Chunk ``k`` covers wall interval ``[k * chunk_s, (k + 1) * chunk_s)`` of this
        call (the last one may be shorter) and holds ``round(rate * end) -
        round(rate * start)`` events, so the total is ``round(rate * duration_s)``;
        at low rates some chunks are empty (still yielded, to keep the pacing
        regular). Events are sorted by ``ts`` and lie in the chunk's event-time
        window, which follows the warped clock described in the module docstring.
        """
        if rate < 0 or duration_s < 0 or chunk_s <= 0:
            raise ValueError("rate and duration_s must be >= 0 and chunk_s > 0")
        self._set_lanes(rate)
        sub = max(256, self.users)  # events between user releases; bounds users held at once
        n_chunks, wall_before = math.ceil(duration_s / chunk_s - 1e-9), self._wall_s
        for k in range(n_chunks):
            w0, w1 = k * chunk_s, min((k + 1) * chunk_s, duration_s)
            n = round(rate * w1) - round(rate * w0)
            tau0, self._wall_s = self._tau_s, wall_before + w1  # kept if the caller stops early
            self._tau_s = self._event_seconds(self._wall_s * self.time_scale)
            if n == 0:
                yield SimChunk(w0, EventBatch.empty())
                continue
            gaps = np.cumsum(self._rng.exponential(size=n + 1))
            tau = tau0 + (self._tau_s - tau0) * (gaps[:n] / gaps[n])
            rows = [self._fill(tau[i : i + sub]) for i in range(0, n, sub)]
            ts = self.start_ms + np.floor(tau * 1000.0).astype(np.int64)
            yield SimChunk(w0, self._to_batch(np.concatenate(rows), ts))

    # -- the event clock -------------------------------------------------------------

    def _event_seconds(self, u: float) -> float:
        """Event seconds since start at activity time ``u``: solves ``∫ intensity = u``."""
        a = self.model.daily_amplitude
        if a == 0:
            return u
        k, w, p0 = a * DAY_S / (2 * math.pi), 2 * math.pi / DAY_S, self._phase0
        lo, hi = u - 2 * k, u + 2 * k  # the integral differs from t by at most 2k
        t = min(max(self._tau_s, lo), hi)
        for _ in range(60):  # safeguarded Newton: fast, and bisection if it overshoots
            f = t + k * (math.sin(p0 + w * t) - math.sin(p0)) - u
            if abs(f) < 1e-6:
                break
            lo, hi = (lo, t) if f > 0 else (t, hi)
            t_new = t - f / (1 + a * math.cos(p0 + w * t))
            t = t_new if lo < t_new < hi else (lo + hi) / 2
        return t

    # -- lanes, users and sessions ---------------------------------------------------

    def _set_lanes(self, rate: float) -> None:
        """Size the lanes so in-session gaps are ~event_gap_s; drop surplus lanes' sessions."""
        want = round(rate / self.time_scale * self.model.event_gap_s)
        lanes = int(min(max(want, 1), max(1, self.users // 8)))
        if lanes < self._lanes:  # sessions on dropped lanes end abruptly
            keep = self._open_lane < lanes
            self._busy[self._open_user[~keep]] = False
            self._open_user, self._open_lane, self._open_end = (
                a[keep] for a in (self._open_user, self._open_lane, self._open_end)
            )
        grow = max(0, lanes - self._lanes)
        self._pos = np.r_[self._pos[:lanes], np.zeros(grow, np.int64)]
        self._end = np.r_[self._end[:lanes], np.zeros(grow, np.int64)]
        self._last_user = np.r_[self._last_user[:lanes], np.full(grow, -1, np.int64)]
        self._lanes = lanes

    def _fill(self, tau: np.ndarray) -> np.ndarray:
        """Rows for slots at event times ``tau`` (sorted): each lane plays its sessions."""
        n, now = len(tau), float(tau[0])
        self._refresh_weights(now)
        small = self._lanes <= 1 << 16  # 16-bit keys get numpy's linear-time radix sort
        lane = self._rng.integers(self._lanes, size=n, dtype=np.uint16 if small else np.uint32)
        order = np.argsort(lane, kind="stable")
        need = np.bincount(lane, minlength=self._lanes).astype(np.int64)
        got, keys = [], []
        while True:
            take = np.minimum(need, self._end - self._pos)
            nz = np.flatnonzero(take)
            if nz.size:
                got.append(self._store[_ranges(self._pos[nz], take[nz])])
                keys.append(np.repeat(nz, take[nz]))
                self._pos[nz] += take[nz]
                need[nz] -= take[nz]
            short = np.flatnonzero(need)
            if not short.size:
                break
            self._start_sessions(short, need[short], now)
        rows = np.concatenate(got)
        if len(got) > 1:  # lane-major, then in play order, as ``order`` expects
            rows = rows[np.argsort(np.concatenate(keys), kind="stable")]
        out = np.empty(n, _ROW)
        out[order] = rows
        self._release(float(tau[-1]))
        return out

    def _start_sessions(self, lanes: np.ndarray, deficit: np.ndarray, now: float) -> None:
        """Queue enough new sessions on ``lanes`` (whose sessions ran out) to cover ``deficit``."""
        per = 1 + (deficit - 1) // max(1, int(self.model.mean_session_events))
        users = self._pick(int(per.sum()), now)
        if len(users) < per.sum():  # few idle users: one session each, own user as last resort
            per = np.ones(len(lanes), np.int64)
            prev = self._last_user[lanes]
            own = (prev >= 0) & (self._user_lane[np.maximum(prev, 0)] == lanes)
            first_fresh = np.argsort(own, kind="stable")  # lanes without a user first
            lanes, own = lanes[first_fresh], own[first_fresh]
            users = self._pick(len(lanes), now)
            if not own[len(users) :].all():  # excluded by lanes <= users / 8
                raise RuntimeError("no idle user for a lane that has none")
            users = np.concatenate([users, self._last_user[lanes[len(users) :]]])
        starts, lengths = self._append_sessions(users)
        last = np.cumsum(per) - 1
        first = last - per + 1
        self._pos[lanes] = starts[first]
        self._end[lanes] = starts[last] + lengths[last]
        self._last_user[lanes] = users[last]
        session_lane = np.repeat(lanes, per)
        self._user_lane[users] = session_lane
        self._busy[users] = True
        self._open_user = np.concatenate([self._open_user, users])
        self._open_lane = np.concatenate([self._open_lane, session_lane])
        self._open_end = np.concatenate([self._open_end, starts + lengths])

    def _release(self, now: float) -> None:
        """Free the users whose sessions were fully played; they rest for session_gap_s."""
        done = self._open_end <= self._pos[self._open_lane]
        if not done.any():
            return
        users = self._open_user[done]
        self._open_user, self._open_lane, self._open_end = (
            a[~done] for a in (self._open_user, self._open_lane, self._open_end)
        )
        self._busy[users] = False
        self._busy[self._open_user] = True  # a user may still have a later session queued
        self._free_at[users] = now + self.model.session_gap_s

    def _refresh_weights(self, now: float) -> None:
        """Recompute the user-choice cdf when fading weights moved by about 1%."""
        half = self.model.fade_half_life_s
        if abs(now - self._weights_at) < 0.0144 * half:
            return
        self._weights_at = now
        fade = np.where(self._fading, 0.5 ** min(max(now, 0.0) / half, 60.0), 1.0)
        self._user_cdf = np.cumsum(self._weight * fade)

    def _pick(self, k: int, now: float) -> np.ndarray:
        """Up to ``k`` distinct idle users, by activity weight, preferring rested ones."""
        got = np.zeros(0, np.int64)
        for rested in (True, False):
            for _ in range(3):
                want = k - len(got)
                if want <= 0:
                    return got
                r = self._rng.random(2 * want + 8) * self._user_cdf[-1]
                cand = np.minimum(np.searchsorted(self._user_cdf, r, side="right"), self.users - 1)
                ok = ~self._busy[cand]
                if rested:
                    ok &= self._free_at[cand] <= now
                got = _unique_in_order(np.concatenate([got, cand[ok]]))[:k]
        if len(got) < k:  # weights concentrated on busy users: any idle user will do
            idle = np.setdiff1d(np.flatnonzero(~self._busy), got, assume_unique=True)
            got = np.concatenate([got, self._rng.permutation(idle)[: k - len(got)]])
        return got

    def _draw_items(self, users: np.ndarray) -> np.ndarray:
        """Items viewed by ``users``: Zipf overall or Zipf within a preferred category."""
        n, m, rng = len(users), self.model, self._rng
        r = rng.random(n)
        items = np.searchsorted(self._cdf, r, side="right")
        pref = np.flatnonzero(rng.random(n) < m.category_affinity)
        pick = (rng.random(len(pref)) * self._n_prefs[users[pref]]).astype(np.int64)
        cat = self._prefs[users[pref], pick]
        within = np.searchsorted(self._cat_keys, cat + r[pref], side="right")
        items[pref] = self._by_cat[np.minimum(within, m.items - 1)]
        return np.minimum(items, m.items - 1)

    def _append_sessions(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write one session script per user into the store; return their starts and lengths.

        A script is session_start, [signup, identify]?, per view (page_view,
        click?, like?, share?, comment?, add_to_cart?, dwell), purchases of carted
        items, session_end.
        """
        m, rng, k = self.model, self._rng, len(users)
        new = np.zeros(k, bool)
        _, first_seen = np.unique(users, return_index=True)
        new[first_seen] = ~self._introduced[users[first_seen]]
        self._introduced[users] = True
        views = rng.geometric(1.0 / m.views_per_session, size=k)
        session = np.repeat(np.arange(k), views)
        items = self._draw_items(users[session])
        p = [m.p_click, m.p_like, m.p_share, m.p_comment, m.p_add_to_cart]
        flags = rng.random((len(session), 5)) < np.array(p)
        bought = flags[:, 4] & (rng.random(len(session)) < m.p_purchase_given_cart)
        block = 2 + flags.sum(axis=1)
        head = 1 + 2 * new
        body = np.bincount(session, weights=block, minlength=k).astype(np.int64)
        n_bought = np.bincount(session[bought], minlength=k)
        length = head + body + n_bought + 1
        total = int(length.sum())
        start = self._reserve(total)
        rows = self._store[start : start + total]
        self._size = start + total
        base = _exclusive_cumsum(length)  # positions within ``rows``
        rows["user"] = np.repeat(users, length)
        social = rng.random(k) < m.p_social
        rows["source"] = np.repeat(
            np.where(social, _SOCIAL, _DEVICE_SOURCE[self._device[users]]), length
        )
        rows["item"] = -1
        rows["value"] = np.nan
        typ, item, value = rows["type"], rows["item"], rows["value"]
        typ[base] = _T[EventType.SESSION_START]
        typ[base[new] + 1], typ[base[new] + 2] = _T[EventType.SIGNUP], _T[EventType.IDENTIFY]
        cum = _exclusive_cumsum(block)
        at = (base + head - cum[_exclusive_cumsum(views)])[session] + cum
        typ[at], item[at] = _T[EventType.PAGE_VIEW], items
        ones = flags.astype(np.int64)
        offset = at[:, None] + np.cumsum(ones, axis=1) - ones + 1  # row of each action
        for f, kind in enumerate((*_VIEW_ACTIONS, EventType.ADD_TO_CART)):
            sel = flags[:, f]
            typ[offset[sel, f]], item[offset[sel, f]] = _T[kind], items[sel]
        dwell = at + block - 1
        typ[dwell], item[dwell] = _T[EventType.DWELL], items
        value[dwell] = np.round(
            rng.lognormal(math.log(m.dwell_median_s), m.dwell_sigma, len(at)), 1
        )
        buys = np.flatnonzero(bought)
        owner = session[buys]
        rank = np.arange(len(buys)) - _exclusive_cumsum(n_bought)[owner]
        spot = base[owner] + head[owner] + body[owner] + rank
        typ[spot], item[spot] = _T[EventType.PURCHASE], items[buys]
        value[spot] = self._price[items[buys]]
        typ[base + length - 1] = _T[EventType.SESSION_END]
        return start + base, length

    def _reserve(self, rows: int) -> int:
        """Room for ``rows`` more store rows, compacting away played ones; returns the size."""
        if self._size + rows > len(self._store):
            live = self._end - self._pos
            keep = _ranges(self._pos, live)
            store = np.empty(max(1024, 2 * (len(keep) + rows)), _ROW)
            store[: len(keep)] = self._store[keep]
            shift = _exclusive_cumsum(live) - self._pos
            self._open_end = self._open_end + shift[self._open_lane]
            self._pos, self._end = self._pos + shift, self._end + shift
            self._store, self._size = store, len(keep)
        return self._size

    # -- output ----------------------------------------------------------------------

    def _to_batch(self, rows: np.ndarray, ts: np.ndarray) -> EventBatch:
        """Columns and strings for the rows of one chunk."""
        n = len(rows)
        users, items = rows["user"].tolist(), rows["item"].tolist()
        typ = np.ascontiguousarray(rows["type"])
        traits: list[dict[str, Scalar] | None] = [None] * n
        for i in np.flatnonzero(typ == _T[EventType.IDENTIFY]).tolist():
            u = users[i]
            traits[i] = {
                "plan": _PLANS[self._plan[u]],
                "country": _COUNTRIES[self._country[u]],
                "device": _DEVICES[self._device[u]],
            }
        prefix = f"sim{self.seed}-"
        ids = list(map(prefix.__add__, map(str, range(self._next_id, self._next_id + n))))
        self._next_id += n
        return EventBatch(
            event_id=ids,
            user_id=list(map(self._user_names.__getitem__, users)),
            type=typ,
            ts=ts,
            item_id=list(map(self._item_names.__getitem__, items)),
            category=list(map(self._cat_names.__getitem__, items)),
            value=np.ascontiguousarray(rows["value"]),
            source=np.ascontiguousarray(rows["source"]),
            traits=traits,
        )


def _exclusive_cumsum(a: np.ndarray) -> np.ndarray:
    return np.cumsum(a) - a


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for each start and length, without a Python loop."""
    return np.repeat(starts - _exclusive_cumsum(lengths), lengths) + np.arange(lengths.sum())


def _unique_in_order(a: np.ndarray) -> np.ndarray:
    _, first = np.unique(a, return_index=True)
    return a[np.sort(first)]
