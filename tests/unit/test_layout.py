"""The partition layout: balanced, versioned, and rescaled with few moves."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.errors import AudienceError
from actors.layout import Layout


def test_initial_layout_is_the_contiguous_assignment() -> None:
    layout = Layout.initial(8, 2)
    assert layout.version == 1
    assert layout.partitions_of(0) == [0, 1, 2, 3] and layout.partitions_of(1) == [4, 5, 6, 7]


def test_rescale_two_to_four_moves_only_what_the_new_shards_take() -> None:
    old = Layout.initial(8, 2)
    new = old.rescaled(4)
    assert new.version == 2 and new.shards == 4
    assert sorted(len(new.partitions_of(s)) for s in range(4)) == [2, 2, 2, 2]
    moves = old.moves_to(new)
    assert len(moves) == 4  # half: each old shard keeps two of its four
    assert {m.target for m in moves} == {2, 3}


def test_rescale_to_one_gathers_everything_on_shard_zero() -> None:
    new = Layout.initial(8, 4).rescaled(1)
    assert new.owners == (0,) * 8
    assert {m.source for m in Layout.initial(8, 4).moves_to(new)} == {1, 2, 3}


@given(
    partitions=st.integers(1, 64),
    start=st.integers(1, 64),
    steps=st.lists(st.integers(1, 64), min_size=1, max_size=5),
)
def test_every_rescale_is_balanced_and_moves_no_more_than_needed(
    partitions: int, start: int, steps: list[int]
) -> None:
    layout = Layout.initial(partitions, min(start, partitions))
    for wanted in steps:
        shards = min(wanted, partitions)
        new = layout.rescaled(shards)
        sizes = [len(new.partitions_of(s)) for s in range(shards)]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == partitions
        # The most a balanced layout can keep: the larger shares to the larger owners.
        base, extra = divmod(partitions, shards)
        shares = [base + 1] * extra + [base] * (shards - extra)
        held = sorted((len(layout.partitions_of(s)) for s in range(shards)), reverse=True)
        most_kept = sum(min(h, share) for h, share in zip(held, shares, strict=True))
        assert len(layout.moves_to(new)) == partitions - most_kept
        assert new.version == layout.version + 1
        layout = new


def test_layout_round_trips_and_refuses_nonsense() -> None:
    layout = Layout.initial(6, 3).rescaled(2)
    assert Layout.from_json(layout.to_json()) == layout
    with pytest.raises(AudienceError, match="not a partition layout"):
        Layout.from_json({"version": 1})
    with pytest.raises(AudienceError, match="every shard"):
        Layout(1, (0, 0, 2), 3)  # shard 1 owns nothing
    with pytest.raises(AudienceError, match=r"1\.\.4"):
        Layout.initial(4, 2).rescaled(5)
