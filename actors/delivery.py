"""A message of one partition as a shard receives it, independent of NATS."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Delivery:
    """One message of one partition.

    Attributes:
        partition: the partition it came from.
        seq: its stream sequence, the partition's position once applied.
        stored_ns: when JetStream stored it (epoch nanoseconds).
        pending: messages of the partition still after it when it was sent.
        data: the message body (a wire batch).
    """

    partition: int
    seq: int
    stored_ns: int
    pending: int
    data: bytes
