"""Users map to partitions the same way in every process; partitions split evenly."""

import subprocess
import sys

import numpy as np
import pytest

from actors.partitioning import (
    assign_partitions,
    events_subject,
    partition_of,
    partition_of_subject,
    partitions_of,
)


def test_the_partition_of_a_user_does_not_depend_on_the_process() -> None:
    code = "from actors.partitioning import partition_of; print(partition_of('user-42', 64))"
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }
    assert runs == {str(partition_of("user-42", 64))}


def test_batch_and_single_partitioning_agree() -> None:
    users = [f"user-{i}" for i in range(1000)]
    assert partitions_of(users, 64).tolist() == [partition_of(u, 64) for u in users]


def test_users_spread_over_all_partitions() -> None:
    counts = np.bincount(partitions_of((f"user-{i}" for i in range(64_000)), 64), minlength=64)
    assert counts.min() > 800 and counts.max() < 1200


def test_subjects_name_their_partition() -> None:
    assert partition_of_subject(events_subject(17)) == 17


@pytest.mark.parametrize(("partitions", "shards"), [(64, 1), (64, 2), (64, 5), (8, 8), (7, 3)])
def test_assignment_covers_every_partition_once_with_near_equal_shares(
    partitions: int, shards: int
) -> None:
    assignment = assign_partitions(partitions, shards)
    assert sorted(p for parts in assignment for p in parts) == list(range(partitions))
    sizes = [len(parts) for parts in assignment]
    assert len(sizes) == shards and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(("partitions", "shards"), [(8, 0), (8, 9)])
def test_impossible_assignments_are_refused(partitions: int, shards: int) -> None:
    with pytest.raises(ValueError, match="shards"):
        assign_partitions(partitions, shards)
