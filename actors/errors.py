"""The exceptions of the core, one root with a few data-carrying subclasses.

The HTTP layer and the CLI map these to status codes and messages in one place
each; nothing below them formats errors for people.
"""

from __future__ import annotations


class AudienceError(Exception):
    """Root of every error this project raises on purpose."""


class WireError(AudienceError):
    """A message body is not the batch wire format.

    Attributes:
        reason: short machine-readable reason, used in the dead-letter subject.
        detail: what exactly was wrong, for people.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class UnavailableError(AudienceError):
    """A dependency (NATS, a shard) cannot serve right now; retry later.

    Attributes:
        what: the component that is unavailable.
        retry_after_s: a hint for the caller, in seconds.
    """

    def __init__(self, what: str, detail: str, retry_after_s: float = 1.0) -> None:
        super().__init__(f"{what} unavailable: {detail}")
        self.what = what
        self.detail = detail
        self.retry_after_s = retry_after_s


class BackpressureError(AudienceError):
    """A producer holds as much unacknowledged data as it may; nothing was accepted.

    The caller should retry after ``retry_after_s`` (HTTP: 429 with Retry-After).

    Attributes:
        held_bytes: bytes of messages waiting for the stream's acknowledgement.
        max_bytes: the producer's bound on those bytes.
        held_messages: messages waiting for the stream's acknowledgement.
        max_messages: the producer's bound on those messages.
        retry_after_s: a hint for the caller, in seconds.
    """

    def __init__(
        self,
        *,
        held_bytes: int,
        max_bytes: int,
        held_messages: int,
        max_messages: int,
        retry_after_s: float = 1.0,
    ) -> None:
        super().__init__(
            f"producer is full: {held_messages} messages ({held_bytes} bytes) await the "
            f"stream's acknowledgement; the bound is {max_messages} messages or {max_bytes} bytes"
        )
        self.held_bytes = held_bytes
        self.max_bytes = max_bytes
        self.held_messages = held_messages
        self.max_messages = max_messages
        self.retry_after_s = retry_after_s


class PublishRefusedError(AudienceError):
    """The stream refused a message for good (resending the same bytes cannot help).

    Attributes:
        subject: where the message was going.
        detail: the server's or client's reason.
    """

    def __init__(self, subject: str, detail: str) -> None:
        super().__init__(f"publish to {subject} refused: {detail}")
        self.subject = subject
        self.detail = detail


class ShardRecovering(UnavailableError):
    """A shard is restarting or replaying after a restore; its answers would be stale.

    Attributes:
        shard: the shard that is recovering.
    """

    def __init__(self, shard: int, detail: str, retry_after_s: float = 1.0) -> None:
        super().__init__(f"shard {shard}", f"recovering: {detail}", retry_after_s)
        self.shard = shard
        self._detail = detail

    def __reduce__(self) -> tuple[type, tuple[int, str, float]]:
        # Raised inside a shard actor and re-raised in the caller: pickled by Ray.
        return (type(self), (self.shard, self._detail, self.retry_after_s))


class NotOwner(AudienceError):
    """A shard was asked about partitions it does not hold: the caller's layout is old.

    The pool re-reads the layout and asks the owner; no caller sees this.

    Attributes:
        shard: the shard that was asked.
        partitions: the partitions it does not hold.
    """

    def __init__(self, shard: int, partitions: list[int]) -> None:
        super().__init__(f"shard {shard} does not hold partitions {partitions}")
        self.shard = shard
        self.partitions = partitions

    def __reduce__(self) -> tuple[type, tuple[int, list[int]]]:
        return (type(self), (self.shard, self.partitions))
