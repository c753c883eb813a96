"""Which shard owns which partition: a versioned layout, changed by small moves.

The partition count P is fixed for the life of a stream; the shard count N
changes at run time. A :class:`Layout` maps every partition to its owning
shard and carries a version that grows with every change, so that a process
holding an older layout can tell. :meth:`Layout.rescaled` gives the layout for
another N that moves as few partitions as a balanced layout allows: a
rescale from 2 to 4 shards moves half the partitions, not all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.errors import AudienceError
from actors.partitioning import assign_partitions


@dataclass(frozen=True)
class Move:
    """One partition handed from one shard to another."""

    partition: int
    source: int
    target: int


@dataclass(frozen=True)
class Layout:
    """Owners of the partitions (``owners[p]`` is the shard of partition ``p``).

    Attributes:
        version: grows by one with every change.
        owners: the owning shard of each partition; shards are ``0..shards-1``.
        shards: the shard count N (every shard owns at least one partition).
    """

    version: int
    owners: tuple[int, ...]
    shards: int

    def __post_init__(self) -> None:
        if not 0 < self.shards <= len(self.owners):
            raise AudienceError(f"a layout needs 1..{len(self.owners)} shards, got {self.shards}")
        if set(self.owners) != set(range(self.shards)):
            raise AudienceError(
                f"layout v{self.version}: every shard 0..{self.shards - 1} "
                "must own a partition, and no other shard may"
            )

    @classmethod
    def initial(cls, partitions: int, shards: int) -> Layout:
        """Version 1: contiguous, near-equal ranges (as the pool always started)."""
        owners = [0] * partitions
        for shard, parts in enumerate(assign_partitions(partitions, shards)):
            for p in parts:
                owners[p] = shard
        return cls(1, tuple(owners), shards)

    @property
    def partitions(self) -> int:
        """The partition count P."""
        return len(self.owners)

    def partitions_of(self, shard: int) -> list[int]:
        """The partitions ``shard`` owns (none for a shard past N)."""
        return [p for p, owner in enumerate(self.owners) if owner == shard]

    def rescaled(self, shards: int) -> Layout:
        """The next version with ``shards`` shards, moving as few partitions as it can.

        Every shard ends with ``P // N`` or ``P // N + 1`` partitions. A shard
        that stays keeps what it owns up to its new share; partitions of shards
        that go away, and the surplus of shards over their share, go to the
        shards under their share, lowest partition first.

        Raises:
            AudienceError: ``shards`` is not in ``1..P``.
        """
        if not 0 < shards <= self.partitions:
            raise AudienceError(f"need 1..{self.partitions} shards, got {shards}")
        base, extra = divmod(self.partitions, shards)
        # The shards that own most now keep the larger shares: fewer moves.
        by_size = sorted(range(shards), key=lambda s: (-len(self.partitions_of(s)), s))
        share = {s: base + (1 if rank < extra else 0) for rank, s in enumerate(by_size)}
        owners = list(self.owners)
        kept: dict[int, int] = dict.fromkeys(range(shards), 0)
        loose: list[int] = []
        for p, owner in enumerate(owners):
            if owner < shards and kept[owner] < share[owner]:
                kept[owner] += 1
            else:
                loose.append(p)
        for shard in range(shards):
            while kept[shard] < share[shard]:
                owners[loose.pop(0)] = shard
                kept[shard] += 1
        return Layout(self.version + 1, tuple(owners), shards)

    def moves_to(self, other: Layout) -> list[Move]:
        """The partitions whose owner differs in ``other``, with both owners."""
        return [
            Move(p, a, b)
            for p, (a, b) in enumerate(zip(self.owners, other.owners, strict=True))
            if a != b
        ]

    def to_json(self) -> dict[str, Any]:
        """Plain data, for the layout store and status answers."""
        return {"version": self.version, "shards": self.shards, "owners": list(self.owners)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Layout:
        """Inverse of :meth:`to_json`.

        Raises:
            AudienceError: the data is not a layout.
        """
        try:
            return cls(
                int(data["version"]), tuple(int(o) for o in data["owners"]), int(data["shards"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AudienceError(f"not a partition layout: {exc!r}") from None
