"""Training examples by replaying history through the live state code.

Point in time by construction: a user's events are applied, in order, to a
:class:`~actors.state.UserStateTable` (the table the shard actors run) only
up to each cutoff, and the features are read right there. Item statistics and
co-visitation come from the same :class:`~actors.items.ItemGraph` the shards
keep. These functions are plain Python over one user's events (what a Ray Data
``map_groups`` hands over) or over a whole frame; :mod:`models.training` runs
them at scale.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from actors.batch import EventBatch
from actors.items import ItemGraph
from actors.state import StateRules, UserRows, UserStateTable
from models.candidates import ItemIndex
from models.features import behaviour_columns
from models.history import frame_to_batch

ITEM_TOP_N = 1000  # neighbours per item a shard exports (serving uses the same)


def replay_until(
    events: pd.DataFrame, cutoffs: Sequence[int], rules: StateRules | None = None
) -> Iterator[tuple[int, UserRows]]:
    """One user's state just before each cutoff (ascending), from its events in order.

    Events at exactly a cutoff are not applied before it: a label at time t
    sees only what happened before t.
    """
    table = UserStateTable(rules or StateRules(), capacity=4)
    batch = frame_to_batch(events)
    user = str(events["user_id"].iloc[0])
    done = 0
    for cutoff in cutoffs:
        upto = int(np.searchsorted(batch.ts, cutoff, side="left"))
        if upto > done:
            table.apply(batch.slice(done, upto))
            done = upto
        yield cutoff, table.user_rows([user])


def churn_examples(
    events: pd.DataFrame, cutoffs: Sequence[int], horizon_ms: int, rules: StateRules | None = None
) -> pd.DataFrame:
    """Churn examples of one user: one per cutoff the user was active before.

    Label 1 (churned) when the user has no event in ``[cutoff, cutoff + horizon)``.
    Columns: ``user_id``, ``cutoff``, ``churned``, ``traits`` (JSON-ready dict
    as of the cutoff) and the behaviour features.
    """
    events = events.sort_values("ts", kind="stable")
    ts = events["ts"].to_numpy(dtype=np.int64)
    records = []
    for cutoff, rows in replay_until(events, sorted(cutoffs), rules):
        if not rows.held[0]:
            continue
        later = np.count_nonzero((ts >= cutoff) & (ts < cutoff + horizon_ms))
        features = behaviour_columns(rows, cutoff)
        records.append(
            {
                "user_id": rows.user_ids[0],
                "cutoff": cutoff,
                "churned": int(later == 0),
                "traits": rows.traits[0],
                **{name: float(values[0]) for name, values in features.items()},
            }
        )
    return pd.DataFrame.from_records(records)


def ranking_states(events: pd.DataFrame, labels: int) -> pd.DataFrame:
    """One user's state just before each of its last ``labels`` item interactions.

    Columns: ``user_id``, ``label_item``, ``cutoff``, ``rows`` (a pickled
    one-user :class:`UserRows`, the state the ranker's features need).
    """
    with_item = events[events["item_id"].notna()]
    if len(with_item) < 2:
        return pd.DataFrame(columns=["user_id", "label_item", "cutoff", "rows"])
    picked = with_item.iloc[-labels:] if len(with_item) > labels else with_item.iloc[1:]
    out = []
    positions = [events.index.get_loc(i) for i in picked.index]
    batch = frame_to_batch(events)
    table = UserStateTable(capacity=4)
    user = str(events["user_id"].iloc[0])
    done = 0
    for at, (_, label) in zip(positions, picked.iterrows(), strict=True):
        if at > done:
            table.apply(batch.slice(done, at))
            done = at
        rows = table.user_rows([user])
        if rows.held[0]:
            out.append(
                {
                    "user_id": user,
                    "label_item": str(label["item_id"]),
                    "cutoff": int(label["ts"]),
                    "rows": pickle.dumps(rows),
                }
            )
    return pd.DataFrame.from_records(out, columns=["user_id", "label_item", "cutoff", "rows"])


def item_index(frame: pd.DataFrame, chunk: int = 5_000, top_n: int = ITEM_TOP_N) -> ItemIndex:
    """Item stats and co-visitation of a whole history, as the shards would build them."""
    table, graph = UserStateTable(capacity=1024), ItemGraph()
    batch = frame_to_batch(frame)
    for start in range(0, len(batch), chunk):
        part: EventBatch = batch.slice(start, start + chunk)
        table.apply(part)
        graph.observe(table, part)
    return ItemIndex.merge([graph.partial(table, top_n)])


def interacted(frame: pd.DataFrame) -> dict[str, set[str]]:
    """Per user, the items it ever touched (the negatives must avoid them)."""
    with_item = frame[frame["item_id"].notna()]
    return {str(u): set(map(str, g)) for u, g in with_item.groupby("user_id")["item_id"]}


def sample_negatives(
    users: Sequence[str],
    items: Sequence[str],
    touched: dict[str, set[str]],
    n: int,
    seed: int,
) -> list[list[str]]:
    """Per user, ``n`` distinct items drawn uniformly from those it never touched."""
    rng = np.random.default_rng(seed)
    pool = np.asarray(sorted(items), dtype=object)
    out = []
    for user in users:
        seen = touched.get(user, set())
        picked: list[str] = []
        chosen: set[str] = set()
        while len(picked) < n and len(chosen) + len(seen) < len(pool):
            item = str(pool[int(rng.integers(len(pool)))])
            if item not in seen and item not in chosen:
                chosen.add(item)
                picked.append(item)
        out.append(picked)
    return out


def final_state(events: pd.DataFrame) -> pd.DataFrame:
    """One user's state after all its events, in the shape of :func:`ranking_states`."""
    end = int(events["ts"].max()) + 1
    ((_, rows),) = replay_until(events, [end])
    user = rows.user_ids[0]
    return pd.DataFrame.from_records(
        [{"user_id": user, "label_item": None, "cutoff": end, "rows": pickle.dumps(rows)}]
    )
