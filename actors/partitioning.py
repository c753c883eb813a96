"""Users to partitions, partitions to subjects, partitions to shards.

The partition of a user must be the same in every process and every run, so it
comes from CRC-32 of the UTF-8 user id (Python's ``hash()`` is salted per
process). ``P`` is fixed for the life of a stream; shards own disjoint sets of
partitions.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterable

import numpy as np

EVENTS_SUBJECT_PREFIX = "audience.events"
DLQ_SUBJECT_PREFIX = "audience.dlq"
ALERTS_SUBJECT_PREFIX = "audience.alerts"


def partition_of(user_id: str, partitions: int) -> int:
    """The partition that owns ``user_id``."""
    return zlib.crc32(user_id.encode()) % partitions


def partitions_of(user_ids: Iterable[str], partitions: int) -> np.ndarray:
    """Partitions of many users at once, as an int64 array."""
    crc = zlib.crc32
    return np.fromiter((crc(u.encode()) % partitions for u in user_ids), np.int64)


def events_subject(partition: int) -> str:
    """The subject that carries the events of one partition."""
    return f"{EVENTS_SUBJECT_PREFIX}.{partition}"


def partition_of_subject(subject: str) -> int:
    """Inverse of :func:`events_subject`."""
    return int(subject.rsplit(".", 1)[1])


def dlq_subject(reason: str) -> str:
    """The dead-letter subject for one rejection reason."""
    return f"{DLQ_SUBJECT_PREFIX}.{reason}"


def alerts_subject(kind: str) -> str:
    """The subject alerts of one kind are published on (core NATS, not a stream)."""
    return f"{ALERTS_SUBJECT_PREFIX}.{kind}"


def assign_partitions(partitions: int, shards: int) -> list[list[int]]:
    """Split ``range(partitions)`` into ``shards`` contiguous, near-equal ranges.

    Raises:
        ValueError: if there are no shards or more shards than partitions.
    """
    if not 0 < shards <= partitions:
        raise ValueError(f"need 1..{partitions} shards for {partitions} partitions, got {shards}")
    bounds = np.linspace(0, partitions, shards + 1).round().astype(int)
    return [list(range(int(lo), int(hi))) for lo, hi in itertools.pairwise(bounds.tolist())]
