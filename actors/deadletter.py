"""Dead letters: a refused event, its original bytes and the reason, on ``audience.dlq.<reason>``.

Refusing is data, not an exception: whoever refuses an event hands the
:class:`~actors.validation.Rejection` here and carries on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from nats.js import JetStreamContext

from actors.partitioning import dlq_subject
from actors.validation import Rejection

REASON_HEADER = "Audience-Reason"
DETAIL_HEADER = "Audience-Detail"
ORIGIN_HEADER = "Audience-Origin"


class DeadLetters:
    """Publishes rejections to the dead-letter stream and counts them by reason."""

    def __init__(self, js: JetStreamContext, origin: str) -> None:
        self._js = js
        self._origin = origin
        self.counts: Counter[str] = Counter()

    async def publish(self, rejections: Iterable[Rejection]) -> int:
        """Dead-letter each rejection (awaiting the stream's ack); returns how many."""
        futures = []
        for r in rejections:
            headers = {
                REASON_HEADER: r.reason.value,
                DETAIL_HEADER: _header_safe(r.detail),
                ORIGIN_HEADER: self._origin,
            }
            futures.append(
                await self._js.publish_async(dlq_subject(r.reason.value), r.raw, headers=headers)
            )
            self.counts[r.reason.value] += 1
        for future in futures:
            await future
        return len(futures)


def _header_safe(text: str, limit: int = 512) -> str:
    """Header values may not hold line breaks or non-ASCII; keep them readable."""
    flat = " ".join(text.split())
    return flat.encode("ascii", "backslashreplace").decode("ascii")[:limit]
