"""The JetStream streams the platform needs, created idempotently.

``AUDIENCE_EVENTS`` holds ``audience.events.<partition>``; its duplicate window
makes a re-sent batch (same ``Nats-Msg-Id``) a no-op. ``AUDIENCE_DLQ`` keeps
dead letters on ``audience.dlq.<reason>`` so they can be counted and inspected.
On a NATS cluster both can be replicated (``replicas``), so that they outlive
the loss of a server.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from actors.partitioning import DLQ_SUBJECT_PREFIX, EVENTS_SUBJECT_PREFIX

MSG_ID_HEADER = "Nats-Msg-Id"  # JetStream drops a message whose id it stored within its window


@dataclass(frozen=True)
class StreamNames:
    """Names of the two streams, so every component agrees on them."""

    events: str = "AUDIENCE_EVENTS"
    dlq: str = "AUDIENCE_DLQ"


async def ensure_streams(
    js: JetStreamContext,
    names: StreamNames,
    duplicate_window_s: float = 120.0,
    max_age_s: float | None = None,
    dlq_max_age_s: float = 7 * 86_400,
    dlq_duplicate_window_s: float = 3600.0,
    replicas: int = 1,
) -> None:
    """Create the event and dead-letter streams if they do not exist yet.

    ``max_age_s`` bounds how long events are kept (None: for ever). The dead
    letter stream's duplicate window must outlast a shard's checkpoint
    interval: a restored shard re-rejects what it replays, under the same ids.
    ``replicas`` copies of each stream are kept on as many servers of a NATS
    cluster (3 survive the loss of one server; a single server takes only 1).
    Streams that already exist are left as they are, replica count included.
    """
    wanted = [
        StreamConfig(
            name=names.events,
            subjects=[f"{EVENTS_SUBJECT_PREFIX}.*"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=duplicate_window_s,
            max_age=max_age_s,
            num_replicas=replicas,
        ),
        StreamConfig(
            name=names.dlq,
            subjects=[f"{DLQ_SUBJECT_PREFIX}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=dlq_max_age_s,
            duplicate_window=dlq_duplicate_window_s,
            num_replicas=replicas,
        ),
    ]
    for config in wanted:
        try:
            await js.stream_info(str(config.name))
        except NotFoundError:
            await js.add_stream(config)


def server_list(nats_url: str) -> list[str]:
    """The servers of a NATS URL setting, which may be a comma-separated seed list.

    ``nats.connect`` takes one URL or a list, not a comma-separated string:
    pass it ``servers=server_list(url)``. Blanks are dropped.
    """
    return [url.strip() for url in nats_url.split(",") if url.strip()]


async def subject_counts(js: JetStreamContext, stream: str, subjects: str) -> dict[str, int]:
    """Messages currently held per subject matching ``subjects`` (a wildcard)."""
    info = await js.stream_info(stream, subjects_filter=subjects)
    return dict(info.state.subjects or {})


async def dead_letter_counts(js: JetStreamContext, names: StreamNames) -> dict[str, int]:
    """Dead-lettered events held, by reason."""
    counts = await subject_counts(js, names.dlq, f"{DLQ_SUBJECT_PREFIX}.>")
    return {subject.rsplit(".", 1)[1]: n for subject, n in counts.items()}
