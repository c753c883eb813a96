"""Training examples are point in time: the live state code replayed up to each cutoff."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd

from actors.state import DAY_MS, UserStateTable
from models.examples import (
    churn_examples,
    interacted,
    item_index,
    ranking_states,
    replay_until,
    sample_negatives,
)
from models.features import behaviour_columns
from models.history import batch_to_frame, frame_to_batch
from tests.support.events import T0, random_batch


def one_user(seed: int = 0) -> pd.DataFrame:
    frame = batch_to_frame(random_batch(300, users=1, seed=seed))
    return frame.sort_values("ts", kind="stable", ignore_index=True)


def test_state_at_a_cutoff_equals_a_table_fed_only_what_came_before() -> None:
    events = one_user()
    cutoffs = [int(np.quantile(events["ts"], q)) for q in (0.2, 0.5, 0.9)]
    for cutoff, rows in replay_until(events, cutoffs):
        table = UserStateTable()
        before = events[events["ts"] < cutoff]
        table.apply(frame_to_batch(before))
        want = table.user_rows(rows.user_ids)
        assert np.array_equal(rows.counts, want.counts)
        assert rows.last[0] == before["ts"].max() < cutoff
        assert rows.recent == want.recent


def test_churn_labels_look_only_at_the_horizon_after_each_cutoff() -> None:
    events = one_user()
    last = int(events["ts"].max())
    cutoffs = [T0 + DAY_MS, last - DAY_MS // 2, last + 1]
    examples = churn_examples(events, cutoffs, horizon_ms=DAY_MS)
    assert examples["churned"].tolist() == [0, 0, 1]
    rows = dict(replay_until(events, [cutoffs[1]]))[cutoffs[1]]
    want = behaviour_columns(rows, cutoffs[1])["events"][0]
    assert examples["events"].iloc[1] == want < len(events)


def test_ranking_labels_are_not_in_the_state_they_are_predicted_from() -> None:
    events = one_user(3)
    states = ranking_states(events, labels=3)
    assert len(states) == 3
    with_item = events[events["item_id"].notna()]
    assert states["label_item"].tolist() == with_item["item_id"].iloc[-3:].tolist()
    for _, state in states.iterrows():
        rows = pickle.loads(state["rows"])
        assert rows.last[0] <= state["cutoff"]
        assert rows.counts.sum() < len(events)


def test_negatives_are_seeded_distinct_and_never_touched_by_the_user() -> None:
    frame = batch_to_frame(random_batch(2000, users=20, seed=1))
    touched = interacted(frame)
    items = sorted(set(frame["item_id"].dropna()))
    users = sorted(touched)
    a = sample_negatives(users, items, touched, 30, seed=5)
    assert a == sample_negatives(users, items, touched, 30, seed=5)
    assert a != sample_negatives(users, items, touched, 30, seed=6)
    for user, negs in zip(users, a, strict=True):
        assert len(set(negs)) == len(negs) and not set(negs) & touched[user]


def test_the_item_index_of_a_history_counts_every_item_event() -> None:
    frame = batch_to_frame(random_batch(1000, users=15, seed=2))
    index = item_index(frame, chunk=97)
    counts = frame["item_id"].value_counts()
    assert {i: int(index.count[index.position[i]]) for i in index.items} == counts.to_dict()
