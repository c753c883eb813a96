"""Answers of the model endpoints from live rows: scores, reasons, cold starts."""

from __future__ import annotations

import numpy as np
import pytest

from actors.items import ItemGraph
from actors.state import UserStateTable
from models.candidates import PAIR_FEATURES, ItemIndex, pair_columns
from models.churn import ChurnModel
from models.features import BEHAVIOUR_FEATURES, TraitEncoder, user_schema
from models.ranker import Ranker
from models.scoring import (
    CandidateLimits,
    churn_answers,
    propose,
    rank_items,
    recommend,
    scores_many,
)
from tests.support.events import random_batch


@pytest.fixture(scope="module")
def live() -> tuple[UserStateTable, ItemIndex]:
    table, graph = UserStateTable(), ItemGraph()
    batch = random_batch(5000, users=50, seed=11)
    table.apply(batch)
    graph.observe(table, batch)
    return table, ItemIndex.merge([graph.partial(table, 1000)])


def tiny_ranker() -> Ranker:
    rng = np.random.default_rng(0)
    n = 200
    cols = {name: rng.random(n) for name in PAIR_FEATURES}
    relevance = (cols["covis_weighted"] > 0.7).astype(float)
    return Ranker.train(cols, relevance, [20] * 10, rounds=20)


def test_churn_answers_score_known_users_and_leave_unknown_ones_out(
    live: tuple[UserStateTable, ItemIndex],
) -> None:
    table, _ = live
    rng = np.random.default_rng(0)
    cols = {name: rng.random(300) for name in BEHAVIOUR_FEATURES}
    model = ChurnModel.train(
        cols, (cols["recency_days"] > 0.5).astype(int), user_schema(TraitEncoder((), {})), rounds=10
    )
    user = table.users(1)[0]
    rows = table.user_rows([user, "ghost"])
    answers = churn_answers(model, "v0003", rows)
    assert answers[1] is None
    assert answers[0] is not None and answers[0]["model_version"] == "v0003"
    assert 0 < answers[0]["churn_probability"] < 1
    assert len(answers[0]["reasons"]) <= 3


def test_candidates_skip_the_users_recent_items_and_say_why(
    live: tuple[UserStateTable, ItemIndex],
) -> None:
    table, index = live
    user = table.users(1)[0]
    rows = table.user_rows([user])
    found = propose(index, rows, 0, CandidateLimits(per_recent_item=5, popular=10))
    assert found and not set(found) & set(rows.recent[0])
    kinds = {why.split(" with ")[0].split(" in ")[0] for why in found.values()}
    assert "viewed" in kinds and kinds <= {"viewed", "popular", "trending"}
    assert any(why.startswith("popular in cat-") for why in found.values())
    top = recommend(tiny_ranker(), index, rows, 0, found, k=4)
    assert len(top) == 4
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)


def test_a_cold_user_gets_the_popular_items(live: tuple[UserStateTable, ItemIndex]) -> None:
    table, index = live
    rows = table.user_rows(["ghost"])
    found = propose(index, rows, 0, CandidateLimits(popular=3))
    top = recommend(tiny_ranker(), index, rows, 0, found, k=3)
    assert [t["item_id"] for t in top] == [index.items[i] for i in index.popular[:3]]
    assert {t["reason"] for t in top} <= {"popular", "trending"}


def test_reranking_returns_every_item_ordered_by_the_models_score(
    live: tuple[UserStateTable, ItemIndex],
) -> None:
    table, index = live
    ranker = tiny_ranker()
    user = table.users(1)[0]
    rows = table.user_rows([user])
    items = [*index.items[:6], "never-seen-item"]
    ranked = rank_items(ranker, index, rows, 0, items)
    assert sorted(r["item_id"] for r in ranked) == sorted(items)
    want = ranker.score(pair_columns(index, rows, 0, index.positions(items)))
    assert [r["score"] for r in ranked] == sorted(want.tolist(), reverse=True)
    assert [r["known_item"] for r in ranked if r["item_id"] == "never-seen-item"] == [False]


def test_neighbours_are_the_heaviest_partners_first(live: tuple[UserStateTable, ItemIndex]) -> None:
    _, index = live
    a = int(index.popular[0])
    partners, weights = index.neighbours(a, 5)
    all_weights = index.covis(np.full(len(index), a), np.arange(len(index)))
    assert weights.tolist() == sorted(all_weights[all_weights > 0], reverse=True)[:5]
    assert np.allclose(index.covis(np.full(5, a), partners), weights)


def test_the_ranker_sees_at_most_the_scored_limit_of_candidates(
    live: tuple[UserStateTable, ItemIndex],
) -> None:
    table, index = live
    rows = table.user_rows([table.users(1)[0]])
    found = propose(index, rows, 0, CandidateLimits(per_recent_item=20, popular=50, scored=7))
    assert len(found) == 7


def test_reranking_before_the_first_index_merge_keeps_the_order_instead_of_failing(
    live: tuple[UserStateTable, ItemIndex],
) -> None:
    # Found by the schema fuzzer: POST /v1/personalize/{user}/rank answered 500 on a
    # fresh platform, where the item index is still empty.
    table, _ = live
    empty = ItemIndex.empty()
    for user, ranker in (("ghost", None), (table.users(1)[0], tiny_ranker())):
        rows = table.user_rows([user])
        ranked = rank_items(ranker, empty, rows, 0, ["a", "b"])
        assert [(r["item_id"], r["score"], r["known_item"]) for r in ranked] == [
            ("a", 0.0, False),
            ("b", 0.0, False),
        ]


def test_a_batch_scored_in_one_model_call_answers_as_each_user_alone(
    live: tuple[UserStateTable, ItemIndex],
) -> None:
    table, index = live
    ranker = tiny_ranker()
    users = [*table.users(4), "ghost"]  # a cold user is scored by popularity, not the model
    rows = table.user_rows(users)
    found = [propose(index, rows, i, CandidateLimits()) for i in range(len(users))]
    items = [list(f) for f in found]
    items[1] = []  # a user without candidates
    scores = scores_many(ranker, index, rows, items)
    assert [len(s) for s in scores] == [len(i) for i in items]
    for i in range(len(users)):
        alone = recommend(ranker, index, rows, i, dict.fromkeys(items[i], "x"), k=10)
        batched = recommend(ranker, index, rows, i, dict.fromkeys(items[i], "x"), 10, scores[i])
        assert batched == alone
        assert rank_items(ranker, index, rows, i, items[i], scores[i]) == rank_items(
            ranker, index, rows, i, items[i]
        )


def test_each_top_item_names_the_recent_item_it_was_most_viewed_with(
    live: tuple[UserStateTable, ItemIndex],
) -> None:
    table, index = live
    for user in table.users(5):
        recent = table.user_rows([user]).recent[0]
        candidates = np.arange(len(index.items))
        at = index.positions(recent)
        want = []  # one candidate at a time, as the reason text asks
        for c in candidates.tolist():
            weights = index.covis(at, np.full(at.size, c))
            best = int(np.argmax(weights)) if at.size else 0
            want.append(recent[best] if at.size and weights[best] > 0 else None)
        assert index.top_partners(recent, candidates) == want
        assert any(want)
    assert index.top_partners([], candidates[:3]) == [None, None, None]
