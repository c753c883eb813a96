"""Dead letters: a refused event, its original bytes and the reason, on ``audience.dlq.<reason>``.

Refusing is data, not an exception: whoever refuses an event hands the
:class:`~actors.validation.Rejection` here and carries on.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence

from nats.js import JetStreamContext

from actors.jetstream import MSG_ID_HEADER
from actors.partitioning import dlq_subject
from actors.validation import Rejection

REASON_HEADER = "Audience-Reason"
DETAIL_HEADER = "Audience-Detail"
ORIGIN_HEADER = "Audience-Origin"


class DeadLetters:
    """Publishes rejections to the dead-letter stream (their owner counts them)."""

    def __init__(self, js: JetStreamContext, origin: str) -> None:
        self._js = js
        self._origin = origin

    async def publish(self, rejections: Sequence[Rejection], timeout_s: float = 10.0) -> int:
        """Dead-letter each rejection, awaiting the stream's acks; returns how many.

        Each dead letter carries a message id (see :func:`dead_letter`), so a
        publish retried after a failure, or repeated by a shard that replays
        after a restore, is kept once by the dead letter stream's duplicate window.

        Raises:
            TimeoutError: not all acknowledged within ``timeout_s`` (NATS away); the
                caller keeps the rejections and publishes them again.
        """
        futures = []
        for r in rejections:
            subject, body, headers = dead_letter(r, self._origin)
            futures.append(await self._js.publish_async(subject, body, headers=headers))
        if futures:
            # A connection lost mid-way can leave an ack future unresolved for ever.
            await asyncio.wait_for(asyncio.gather(*futures), timeout_s)
        return len(futures)


def dead_letter(rejection: Rejection, origin: str) -> tuple[str, bytes, dict[str, str]]:
    """Subject, body and headers of the dead letter of ``rejection`` (from ``origin``)."""
    headers = {
        MSG_ID_HEADER: _message_id(rejection),
        REASON_HEADER: rejection.reason.value,
        DETAIL_HEADER: _header_safe(rejection.detail),
        ORIGIN_HEADER: origin,
    }
    return dlq_subject(rejection.reason.value), rejection.raw, headers


def _message_id(rejection: Rejection) -> str:
    """The dead letter's ``Nats-Msg-Id``: its place in the event stream when it has one
    (``partition.seq.row``), else a digest of the reason and the bytes (a rejected
    ingest event: the same bad event sent again is the same dead letter)."""
    if rejection.key is not None:
        return f"dlq.{rejection.key}"
    digest = hashlib.blake2b(rejection.raw, digest_size=16, person=b"audience-dlq")
    digest.update(rejection.reason.value.encode())
    return f"dlq.h.{digest.hexdigest()}"


def _header_safe(text: str, limit: int = 512) -> str:
    """Header values may not hold line breaks or non-ASCII; keep them readable."""
    flat = " ".join(text.split())
    return flat.encode("ascii", "backslashreplace").decode("ascii")[:limit]
