"""The ranking metrics of the evaluation protocol."""

from __future__ import annotations

import numpy as np
import pytest

from models.evaluation import hit_and_ndcg, rank_of_positive


def test_rank_counts_better_negatives_and_half_the_ties() -> None:
    assert rank_of_positive(np.array([5.0, 1, 2, 3])) == 0
    assert rank_of_positive(np.array([2.0, 3, 1, 4])) == 2
    assert rank_of_positive(np.array([1.0, 1, 1, 0])) == 1


def test_hr_and_ndcg_at_10() -> None:
    first = np.array([9.0, *range(9)])  # rank 0
    fourth = np.array([5.0, 9, 8, 7, *range(4)])  # rank 3
    missed = np.array([0.0, *range(1, 12)])  # rank 11
    got = hit_and_ndcg([first, fourth, missed])
    assert got["hr_at_10"] == pytest.approx(2 / 3)
    assert got["ndcg_at_10"] == pytest.approx((1 + 1 / np.log2(5)) / 3)
    assert got["users"] == 3
