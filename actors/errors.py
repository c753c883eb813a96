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
