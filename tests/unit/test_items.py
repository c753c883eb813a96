"""The item graph the shards keep: counts, times and co-visitation pairs."""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
import pytest

from actors.batch import EventBatch
from actors.events import TYPE_CODE, EventType
from actors.items import ItemGraph, ItemGraphConfig
from actors.state import StateRules, UserStateTable
from models.candidates import ItemIndex
from tests.support.events import T0, random_batch


def reference_pairs(batch: EventBatch, window: int) -> dict[tuple[str, str], float]:
    """Co-visitation by a plain loop: each item with the ``window`` distinct pushes before it."""
    seqs: dict[str, list[str]] = defaultdict(list)
    weights: dict[tuple[str, str], float] = defaultdict(float)
    for user, item in zip(batch.user_id, batch.item_id, strict=True):
        seq = seqs[user]
        if item is None or (seq and seq[-1] == item):
            continue  # back-to-back repeats take one recent slot (the table's rule)
        for d, older in enumerate(reversed(seq[-window:]), start=1):
            if older != item:
                weights[(older, item)] += 1.0 / d
                weights[(item, older)] += 1.0 / d
        seq.append(item)
    return weights


def graph_of(
    parts: list[EventBatch], window: int, flush_every: int = 20_000
) -> tuple[ItemGraph, UserStateTable]:
    table = UserStateTable(StateRules(recent_items=window + 1))
    graph = ItemGraph(ItemGraphConfig(window=window, flush_every=flush_every))
    for part in parts:
        table.apply(part)
        graph.observe(table, part)
    return graph, table


def as_dict(graph: ItemGraph, table: UserStateTable) -> dict[tuple[str, str], float]:
    partial = graph.partial(table, top_n=10_000)
    items = partial["items"]
    return {
        (items[a], items[b]): float(w)
        for a, b, w in zip(partial["pair_a"], partial["pair_b"], partial["pair_w"], strict=True)
    }


def test_pairs_match_a_plain_loop_however_the_stream_is_batched() -> None:
    batch = random_batch(3000, users=40, seed=3)
    want = reference_pairs(batch, window=4)
    for cuts in ([3000], [1, 999, 1000, 1000], [7] * 428 + [4]):
        bounds = np.cumsum([0, *cuts])
        parts = [batch.slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
        for flush_every in (1, 20_000):  # folded at once, or deferred over many steps
            got = as_dict(*graph_of(parts, window=4, flush_every=flush_every))
            assert got.keys() == want.keys()
            for key, weight in want.items():
                assert got[key] == pytest.approx(weight, rel=1e-5)


def test_item_counts_times_and_categories_are_kept_per_item() -> None:
    batch = random_batch(500, users=10, seed=1)
    graph, table = graph_of([batch], window=3)
    partial = graph.partial(table)
    for i, item in enumerate(partial["items"]):
        hits = [j for j, x in enumerate(batch.item_id) if x == item]
        assert partial["count"][i] == len(hits)
        assert partial["first"][i] == batch.ts[hits].min()
        assert partial["last"][i] == batch.ts[hits].max()
        assert partial["category"][i] == batch.category[hits[-1]]


def test_pairs_beyond_the_bound_are_pruned_lightest_first() -> None:
    batch = random_batch(2000, users=30, seed=2)
    full = as_dict(*graph_of([batch], window=4))
    table = UserStateTable(StateRules(recent_items=5))
    graph = ItemGraph(ItemGraphConfig(window=4, max_pairs=100, compact_every=50))
    table.apply(batch)
    graph.observe(table, batch)
    graph.compact()
    assert graph.pairs <= 100 and graph.pruned_pairs > 0
    kept = as_dict(graph, table)
    lightest_kept = min(kept.values())
    dropped = [w for k, w in full.items() if k not in kept]
    assert max(dropped) <= lightest_kept + 1e-6


def test_merging_shard_partials_sums_what_one_shard_would_hold() -> None:
    batch = random_batch(3000, users=50, seed=4)
    graph, table = graph_of([batch], 4)
    whole = ItemIndex.merge([graph.partial(table, top_n=10_000)])
    by_user = [np.flatnonzero([hash(u) % 2 == s for u in batch.user_id]) for s in (0, 1)]
    partials = []
    for rows in by_user:
        graph, table = graph_of([batch.take(rows)], 4)
        partials.append(graph.partial(table, top_n=10_000))
    merged = ItemIndex.merge(partials)
    assert sorted(merged.items) == sorted(whole.items)
    at_whole, at_merged = whole.positions(whole.items), merged.positions(whole.items)
    assert np.array_equal(whole.count[at_whole], merged.count[at_merged])
    a, b = np.meshgrid(np.arange(len(whole.items)), np.arange(len(whole.items)))
    w1 = whole.covis(at_whole[a.ravel()], at_whole[b.ravel()])
    w2 = merged.covis(at_merged[a.ravel()], at_merged[b.ravel()])
    assert np.allclose(w1, w2, rtol=1e-5)


def test_seen_items_are_remembered_per_user_and_forgotten_with_the_user() -> None:
    batch = random_batch(400, users=5, seed=5)
    table = UserStateTable()
    table.apply(batch)
    for user in set(batch.user_id):
        mine = {i for u, i in zip(batch.user_id, batch.item_id, strict=True) if u == user}
        others = sorted({i for i in batch.item_id if i is not None} - mine)
        assert table.seen(user, sorted(mine)).all()
        assert table.seen(user, others).mean() < 0.05  # a Bloom filter: rare false "seen"
    assert not table.seen("nobody", ["item-1"]).any()
    user = batch.user_id[0]
    table.apply(_one(user, EventType.USER_DELETED, int(batch.ts.max())))
    table.apply(_one(user, EventType.PAGE_VIEW, int(batch.ts.max()) + 1, "item-fresh"))
    assert table.seen(user, ["item-fresh"]).all()
    old = sorted({i for u, i in zip(batch.user_id, batch.item_id, strict=True) if u == user})
    assert table.seen(user, old).mean() < 0.2  # the new user on the reused row starts clean


def _one(user: str, kind: EventType, ts: int, item: str | None = None) -> EventBatch:
    return EventBatch(
        event_id=[f"{user}-{ts}"],
        user_id=[user],
        type=np.array([TYPE_CODE[kind]], dtype=np.uint8),
        ts=np.array([ts], dtype=np.int64),
        item_id=[item],
        category=[None],
        value=np.array([np.nan]),
        source=np.zeros(1, dtype=np.uint8),
    )


def test_heat_ranks_items_by_recent_activity_and_merges_across_shards() -> None:
    day = 86_400_000
    old = [("u1", EventType.PAGE_VIEW, T0 + i, "old-hit") for i in range(10)]
    new = [("u2", EventType.PAGE_VIEW, T0 + 5 * day + i, "new-hit") for i in range(3)]
    partials = []
    for rows in (old, new):
        table, graph = UserStateTable(), ItemGraph()
        for user, kind, ts, item in rows:
            batch = _one(user, kind, ts, item)
            table.apply(batch)
            graph.observe(table, batch)
        partials.append(graph.partial(table))
    index = ItemIndex.merge(partials)
    assert index.items[index.popular[0]] == "old-hit"  # more events in all
    assert index.items[index.trending[0]] == "new-hit"  # 3 events 5 days later weigh more


def test_partials_of_several_partitions_at_once_equal_each_partition_on_its_own() -> None:
    from actors.shard import Shard
    from tests.unit.test_shard import deliveries_of

    shard = Shard(0, range(4))
    shard.apply(deliveries_of(random_batch(4000, 80, seed=5), 4))
    graph, table = shard.items, shard.table
    together = graph.partials(table, 7, [3, 0, 2, 1])
    assert list(together) == [3, 0, 2, 1]
    lo = (graph._keys >> 32).astype(np.int64)
    for p in range(4):  # the reference: this partition's pairs picked by a mask
        mine = graph.partition[lo] == p
        hi = graph._keys[mine] & 0xFFFFFFFF
        alone = graph._partial_of(table, 7, p, lo[mine], hi, graph._weights[mine])
        assert len(alone["pair_a"]) > 0 and alone["items"]
        assert together[p].keys() == alone.keys()
        for key, value in alone.items():
            assert np.array_equal(together[p][key], value), (p, key)
        assert np.array_equal(graph.partial(table, 7, p)["pair_w"], alone["pair_w"])
    assert len({len(together[p]["items"]) for p in range(4)}) > 1  # not one partition four times


@pytest.mark.parametrize("top_n", [1, 3, 50, 10_000])
def test_top_partners_keep_the_same_pairs_as_a_sort_of_them_all(top_n: int) -> None:
    from actors.items import _top_partners

    rng = np.random.default_rng(top_n)
    a = rng.integers(0, 30, 2000)
    b = rng.integers(0, 400, 2000)
    w = rng.integers(1, 5, 2000).astype(np.float32) / 2  # many ties: lower b wins them
    order = np.lexsort((b, -w, a))  # the plain way: sort all, keep each a's first top_n
    sa, sb, sw = a[order], b[order], w[order]
    rank = np.array([np.sum(sa[:i] == sa[i]) for i in range(sa.size)])
    want = sorted(
        zip(
            sa[rank < top_n].tolist(),
            sb[rank < top_n].tolist(),
            sw[rank < top_n].tolist(),
            strict=True,
        )
    )
    got_a, got_b, got_w = _top_partners(a, b, w, top_n)
    got = sorted(zip(got_a.tolist(), got_b.tolist(), got_w.tolist(), strict=True))
    assert got == want
    assert (top_n >= 2000) == (len(got) == 2000)
