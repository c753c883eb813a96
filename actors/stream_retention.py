"""Is what a restore needs still in the stream? Warnings for ``audience status``.

A shard restores its newest snapshot and replays each partition from the
snapshot's position, so the stream must still hold every message after that
position. The event stream drops messages by age (``max_age``); snapshots are
taken every minute by default, far inside a week's retention, but a shard that
cannot snapshot (its store is down, dead letters wait for NATS) drifts towards
the edge. :func:`retention_warnings` says which partitions are near it, or past.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from actors.partitioning import events_subject

WARN_FRACTION = 0.8  # warn once the oldest message a restore needs is this far into max_age


@dataclass(frozen=True)
class RetentionWarning:
    """One partition whose restore point is near the stream's retention edge, or past it."""

    partition: int
    position: int
    level: str  # "warning" (near the edge) or "error" (needed messages may be gone)
    detail: str

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "partition": self.partition,
            "position": self.position,
            "level": self.level,
            "detail": self.detail,
        }


def classify(
    partition: int,
    position: int,
    first_seq: int,
    oldest_needed_age_s: float | None,
    max_age_s: float | None,
    warn_fraction: float = WARN_FRACTION,
) -> RetentionWarning | None:
    """The warning for one partition, if any (pure: the facts are gathered elsewhere).

    Args:
        position: the partition's position in its newest snapshot (0: no snapshot).
        first_seq: the stream's first sequence still held.
        oldest_needed_age_s: age of the partition's first message after ``position``
            (None: nothing after it, the restore needs nothing from the stream).
        max_age_s: the stream's ``max_age`` (None or 0: kept for ever).
    """
    if first_seq > position + 1 and (position > 0 or first_seq > 1):
        what = f"its snapshot at {position}" if position else "a rebuild without snapshot"
        return RetentionWarning(
            partition,
            position,
            "error",
            f"{what} needs messages from sequence {position + 1}, but the stream now starts "
            f"at {first_seq}: a restore may miss events",
        )
    if oldest_needed_age_s is None or not max_age_s:
        return None
    if oldest_needed_age_s >= warn_fraction * max_age_s:
        return RetentionWarning(
            partition,
            position,
            "warning",
            f"a restore needs messages {oldest_needed_age_s / 3600:.1f} h old; the stream "
            f"drops them at {max_age_s / 3600:.1f} h (is checkpointing failing?)",
        )
    return None


async def retention_warnings(
    js: JetStreamContext, stream: str, needed: dict[int, int], now_s: float | None = None
) -> list[RetentionWarning]:
    """Warnings for the partitions in ``needed`` (partition -> snapshot position)."""
    info = await js.stream_info(stream)
    first_seq = int(info.state.first_seq or 0)
    max_age_s = info.config.max_age
    now_s = time.time() if now_s is None else now_s
    warnings = []
    for partition, position in sorted(needed.items()):
        try:
            oldest = await js.get_msg(
                stream, seq=position + 1, subject=events_subject(partition), next=True
            )
        except NotFoundError:
            age_s = None
        else:
            age_s = now_s - oldest.time.timestamp() if oldest.time else None
        found = classify(partition, position, first_seq, age_s, max_age_s)
        if found is not None:
            warnings.append(found)
    return warnings
