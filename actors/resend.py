"""What a producer holds until the stream acknowledges it: bounded, ordered, resent as is.

A message is held from the moment it is built until JetStream acknowledges it.
It never changes: a resend goes out with the same bytes and the same
``Nats-Msg-Id``, so a copy that did land the first time is dropped by the
stream's duplicate window. The buffer only keeps the books (what may go out
now, what is in flight since when, what waits for a retry) and leaves the
sending to its owner, so it is plain logic with a clock passed in.

Life of a message::

    add -> take -> sent -> acked                     (held until here)
                     \\-> failed -> (backoff) -> take -> sent -> ...
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Outgoing:
    """One message as it will be (re)sent: its bytes never change.

    Attributes:
        seq: the producer's sequence number; orders messages and keys the buffer.
        subject: NATS subject.
        body: the payload.
        headers: NATS headers, the ``Nats-Msg-Id`` among them.
        events: events it carries (0 for a dead letter).
        attempts: transmissions started so far.
        due_at: earliest time (monotonic seconds) of its next transmission.
        sent_at: when its latest transmission started.
        token: the owner's handle on the latest transmission (an ack future).
    """

    seq: int
    subject: str
    body: bytes
    headers: dict[str, str]
    events: int = 0
    attempts: int = 0
    due_at: float = 0.0
    sent_at: float = 0.0
    token: Any = field(default=None, repr=False)

    @property
    def size(self) -> int:
        """Bytes this message holds in memory (payload and headers)."""
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers.items())


class ResendBuffer:
    """Unacknowledged messages, in sequence order, within a bound the owner enforces.

    Args:
        max_bytes: held bytes at which :attr:`full` turns true.
        max_messages: held messages at which :attr:`full` turns true.
        backoff_s: wait before the first retry; doubles with each further attempt.
        max_backoff_s: the longest wait between two attempts.
    """

    def __init__(
        self,
        max_bytes: int,
        max_messages: int,
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
    ) -> None:
        if max_bytes < 1 or max_messages < 1:
            raise ValueError("max_bytes and max_messages must be positive")
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._held: dict[int, Outgoing] = {}  # by seq; insertion order is seq order
        self._fresh: deque[Outgoing] = deque()  # never sent, in seq order
        self._retry: list[tuple[float, int, Outgoing]] = []  # heap of (due_at, seq, message)
        self._in_flight: dict[int, Outgoing] = {}  # by seq; insertion order is send order
        self.held_bytes = 0  # of the held messages, headers included
        self.held_events = 0  # in the held messages

    @property
    def held_messages(self) -> int:
        """Messages not yet acknowledged (waiting, in flight or due for a retry)."""
        return len(self._held)

    @property
    def full(self) -> bool:
        """Whether the bound is reached: the owner must not accept more."""
        return self.held_bytes >= self.max_bytes or len(self._held) >= self.max_messages

    @property
    def in_flight(self) -> int:
        """Messages sent and awaiting their acknowledgement."""
        return len(self._in_flight)

    @property
    def oldest_seq(self) -> int | None:
        """Sequence number of the oldest held message; None when nothing is held."""
        return next(iter(self._held), None)

    def add(self, out: Outgoing) -> None:
        """Hold a new message; it may go out at once."""
        if out.seq in self._held:
            raise ValueError(f"sequence {out.seq} is already held")
        self._held[out.seq] = out
        self._fresh.append(out)
        self.held_bytes += out.size
        self.held_events += out.events

    def take(self, now: float) -> Outgoing | None:
        """The next message to transmit, or None: due retries first (oldest first), then new ones.

        The caller must report the outcome with :meth:`sent` or :meth:`failed`.
        """
        if self._retry and self._retry[0][0] <= now:
            out = heapq.heappop(self._retry)[2]
        elif self._fresh:
            out = self._fresh.popleft()
        else:
            return None
        out.attempts += 1
        return out

    def sent(self, out: Outgoing, now: float, token: Any = None) -> None:
        """``out`` is on its way; its acknowledgement is awaited from ``now``."""
        out.sent_at = now
        out.token = token
        self._in_flight[out.seq] = out

    def acked(self, out: Outgoing) -> bool:
        """The stream has ``out``: let it go. False if it was not held (a late second ack)."""
        if self._held.get(out.seq) is not out:
            return False
        del self._held[out.seq]
        self._in_flight.pop(out.seq, None)
        self.held_bytes -= out.size
        self.held_events -= out.events
        out.token = None
        return True

    def failed(self, out: Outgoing, now: float, backoff: bool = True) -> None:
        """``out``'s transmission failed (or its ack never came): retry it later, unchanged.

        Without ``backoff`` it is due at once (e.g. when the connection came back).
        """
        self._in_flight.pop(out.seq, None)
        out.token = None
        if self._held.get(out.seq) is not out:
            return
        out.due_at = now + self.delay(out.attempts) if backoff else now
        heapq.heappush(self._retry, (out.due_at, out.seq, out))

    def drop(self, out: Outgoing) -> None:
        """Give ``out`` up (the stream refused it for good)."""
        self._in_flight.pop(out.seq, None)
        if self._held.pop(out.seq, None) is out:
            self.held_bytes -= out.size
            self.held_events -= out.events
        self._retry = [entry for entry in self._retry if entry[2] is not out]
        heapq.heapify(self._retry)
        out.token = None

    def delay(self, attempts: int) -> float:
        """Wait before the next attempt after ``attempts`` failed ones (exponential, capped)."""
        return float(min(self.max_backoff_s, self.backoff_s * 2 ** max(0, attempts - 1)))

    def expired(self, now: float, ack_timeout_s: float) -> list[Outgoing]:
        """In-flight messages whose acknowledgement is overdue, oldest first.

        They stay in flight; the caller cancels their transmission and calls
        :meth:`failed`.
        """
        overdue = []
        for out in self._in_flight.values():  # send order: stop at the first one on time
            if out.sent_at + ack_timeout_s > now:
                break
            overdue.append(out)
        return overdue

    def flying(self) -> list[Outgoing]:
        """Every in-flight message, oldest first."""
        return list(self._in_flight.values())

    def retry_now(self, now: float) -> None:
        """Make every waiting retry due at ``now`` (e.g. the connection is back)."""
        for _, _, out in self._retry:
            out.due_at = now
        self._retry = [(now, out.seq, out) for _, _, out in self._retry]
        heapq.heapify(self._retry)  # now in sequence order
