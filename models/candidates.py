"""The merged item index and the user-item features personalization ranks on.

Shards each keep item stats and co-visitation for their own users
(:class:`~actors.items.ItemGraph`); :meth:`ItemIndex.merge` sums their partials
into one index that serving refreshes on a timer and training builds from a
replay. :func:`pair_columns` turns (user, candidate items) into ranking
features, and :meth:`ItemIndex.candidates` proposes items for a top-k answer,
each with the signal that proposed it, so every recommendation can say why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.state import DAY_MS, UserRows

PAIR_FEATURES: tuple[str, ...] = (
    "item_popularity",
    "covis_weighted",
    "covis_last",
    "covis_sum",
    "covis_per_popularity",
    "covis_cosine",
    "covis_cosine_max",
    "covis_cosine_last",
    "item_positive_share",
    "item_age_days",
    "item_mean_age_days",
    "item_mean_age_z",
    "item_popularity_then",
    "item_active_after_days",
    "category_affinity",
    "user_events",
    "user_span_days",
)
PAIR_FEATURES_VERSION = "pair-features/1"
_STD_FLOOR_DAYS = 30.0


@dataclass
class ItemIndex:
    """Item stats and symmetric co-visitation over all shards.

    ``keys`` holds ``a * n + b`` for each pair of item positions, sorted, with
    ``weights`` aligned; ``neighbours`` lists each item's heaviest partners.
    """

    items: list[str]
    category: list[str | None]
    count: np.ndarray
    heat: np.ndarray
    positive: np.ndarray
    first: np.ndarray
    last: np.ndarray
    mean_days: np.ndarray
    std_days: np.ndarray
    keys: np.ndarray
    weights: np.ndarray

    def __post_init__(self) -> None:
        self.position = {item: i for i, item in enumerate(self.items)}
        self.popular = np.argsort(-self.count, kind="stable")
        self.trending = np.argsort(-self.heat, kind="stable")
        n = len(self.items)
        partner_of = self.keys // max(n, 1)
        order = np.lexsort((-self.weights, partner_of))  # per item, heaviest partner first
        self._partners = (self.keys[order] - partner_of[order] * n).astype(np.int64)
        self._partner_weights = self.weights[order]
        self._offsets = np.searchsorted(partner_of[order], np.arange(n + 1))
        self.by_category: dict[str | None, list[int]] = {}
        for at in self.popular.tolist():  # each category's items, most popular first
            self.by_category.setdefault(self.category[at], []).append(at)

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def empty(cls) -> ItemIndex:
        """An index with no items (before the first merge; every user is cold)."""
        return cls.merge([])

    @classmethod
    def merge(cls, partials: Sequence[dict[str, Any]]) -> ItemIndex:
        """Sum shard partials (see ``ItemGraph.partial``) into one index."""
        names: dict[str, int] = {}
        category: dict[int, str | None] = {}
        parts = []
        for p in partials:
            ids = np.fromiter((names.setdefault(i, len(names)) for i in p["items"]), np.int64)
            for code, cat in zip(ids.tolist(), p["category"], strict=True):
                if cat is not None or code not in category:
                    category[code] = cat
            parts.append((ids, p))
        n = len(names)
        count = np.zeros(n, dtype=np.float64)
        heat = np.full(n, -np.inf)
        positive = np.zeros(n, dtype=np.float64)
        first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        last = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
        sum_days, sum_days2 = np.zeros(n), np.zeros(n)
        keys, weights = [], []
        for ids, p in parts:
            np.add.at(count, ids, p["count"])
            np.logaddexp2.at(heat, ids, p["heat"])
            np.add.at(positive, ids, p["positive"])
            np.minimum.at(first, ids, p["first"])
            np.maximum.at(last, ids, p["last"])
            np.add.at(sum_days, ids, p["sum_days"])
            np.add.at(sum_days2, ids, p["sum_days2"])
            keys.append(ids[p["pair_a"]] * n + ids[p["pair_b"]])
            weights.append(np.asarray(p["pair_w"], dtype=np.float64))
        all_keys = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
        unique, inverse = np.unique(all_keys, return_inverse=True)
        summed = np.bincount(inverse, weights=np.concatenate(weights) if weights else None)
        mean = sum_days / np.maximum(count, 1)
        std = np.sqrt(np.maximum(sum_days2 / np.maximum(count, 1) - mean**2, 0.0))
        return cls(
            items=list(names),
            category=[category.get(i) for i in range(n)],
            count=count,
            heat=heat,
            positive=positive,
            first=first,
            last=last,
            mean_days=mean,
            std_days=std,
            keys=unique,
            weights=summed.astype(np.float64),
        )

    def positions(self, item_ids: Sequence[str]) -> np.ndarray:
        """Position per item id, -1 for items the index does not know."""
        get = self.position.get
        return np.fromiter((get(i, -1) for i in item_ids), np.int64, len(item_ids))

    def covis(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Co-visitation weights of position pairs (0 where either is unknown or never paired)."""
        n = len(self.items)
        out = np.zeros(np.broadcast(a, b).shape, dtype=np.float64)
        if not len(self.keys):
            return out
        a, b = np.broadcast_arrays(a, b)
        ok = (a >= 0) & (b >= 0)
        query = a[ok] * n + b[ok]
        at = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
        out[ok] = np.where(self.keys[at] == query, self.weights[at], 0.0)
        return out

    def neighbours(self, a: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``limit`` heaviest co-visited partners of item position ``a`` and their weights."""
        lo = int(self._offsets[a])
        hi = min(int(self._offsets[a + 1]), lo + limit)
        return self._partners[lo:hi], self._partner_weights[lo:hi]

    def candidates(
        self,
        recent: Sequence[str],
        affinity: dict[str, float],
        per_item: int,
        popular: int,
    ) -> dict[int, str]:
        """Candidate positions for a user, each with the reason that proposed it.

        In order of precedence: co-visited partners of the recent items (newest
        item first), the most popular items of the user's two favourite
        categories, trending items, then the most popular items, so a cold user
        still gets an answer.
        """
        found: dict[int, str] = {}
        for item, at in zip(recent, self.positions(recent).tolist(), strict=True):
            if at < 0:
                continue
            partners, _ = self.neighbours(at, per_item)
            for p in partners.tolist():
                found.setdefault(p, f"viewed with {item}")
        favourite = sorted(affinity, key=lambda c: -affinity[c])[:2]
        for category in favourite:
            for p in self.by_category.get(category, [])[:per_item]:
                found.setdefault(p, f"popular in {category}")
        for p in self.trending[: popular // 2].tolist():
            found.setdefault(p, "trending")
        for p in self.popular[:popular].tolist():
            found.setdefault(p, "popular")
        return found

    def top_partners(self, recent: Sequence[str], candidates: np.ndarray) -> list[str | None]:
        """Per candidate position, the recent item most co-visited with it (for the reason
        text; the newest on ties), or None when none is; one lookup for all candidates."""
        at = self.positions(recent)
        if not at.size or not len(candidates):
            return [None] * len(candidates)
        weights = self.covis(at[:, None], np.asarray(candidates, dtype=np.int64)[None, :])
        best = np.argmax(weights, axis=0)
        found = weights[best, np.arange(len(candidates))] > 0
        return [
            recent[b] if f else None for b, f in zip(best.tolist(), found.tolist(), strict=True)
        ]


def pair_columns(
    index: ItemIndex, rows: UserRows, user: int, candidates: np.ndarray
) -> dict[str, np.ndarray]:
    """Ranking features of candidate item positions for user ``user`` of ``rows``.

    Time features compare the candidate's use over time with the user's
    last_seen, so history replayed from any era scores like live traffic.
    """
    c = np.asarray(candidates, dtype=np.int64)
    known = c >= 0
    at = np.where(known, c, 0)
    recent = index.positions(rows.recent[user])
    cv = index.covis(recent[:, None], c[None, :]) if recent.size else np.zeros((0, c.size))
    rank_weight = 1.0 / (1.0 + np.arange(recent.size))
    popularity = np.where(known, index.count[at], 0.0)
    recent_pop = index.count[np.where(recent >= 0, recent, 0)] * (recent >= 0)
    cosine = cv / np.sqrt(recent_pop[:, None] * popularity[None, :] + 1.0)
    last_ms = rows.last[user] if rows.held[user] else None
    last_day = np.nan if last_ms is None else last_ms / DAY_MS

    def when_known(values: np.ndarray) -> np.ndarray:
        return np.where(known & (popularity > 0), values, np.nan)

    mean_age = when_known(last_day - index.mean_days[at])
    spread = index.std_days[at] + _STD_FLOOR_DAYS
    affinity = rows.affinity[user]
    total = sum(affinity.values()) or 1.0
    category_affinity = np.array(
        [
            affinity.get(index.category[i] or "", 0.0) / total if k else 0.0
            for i, k in zip(at.tolist(), known.tolist(), strict=True)
        ]
    )
    span = (rows.last[user] - rows.first[user]) / DAY_MS if rows.held[user] else np.nan
    weighted = rank_weight @ cv if recent.size else np.zeros(c.size)
    out = {
        "item_popularity": np.log1p(popularity),
        "covis_weighted": weighted,
        "covis_last": cv[0] if recent.size else np.zeros(c.size),
        "covis_sum": cv.sum(axis=0),
        "covis_per_popularity": weighted / np.sqrt(popularity + 1.0),
        "covis_cosine": cosine.sum(axis=0),
        "covis_cosine_max": cosine.max(axis=0) if recent.size else np.zeros(c.size),
        "covis_cosine_last": cosine[0] if recent.size else np.zeros(c.size),
        "item_positive_share": when_known(index.positive[at] / np.maximum(popularity, 1.0)),
        "item_age_days": when_known(last_day - index.first[at] / DAY_MS),
        "item_mean_age_days": mean_age,
        "item_mean_age_z": mean_age / spread,
        "item_popularity_then": np.log1p(
            popularity * np.exp(-0.5 * (mean_age / spread) ** 2) / spread
        ),
        "item_active_after_days": when_known(index.last[at] / DAY_MS - last_day),
        "category_affinity": category_affinity,
        "user_events": np.full(c.size, np.log1p(float(rows.counts[user].sum()))),
        "user_span_days": np.full(c.size, span),
    }
    return {name: np.asarray(out[name], dtype=np.float64) for name in PAIR_FEATURES}
