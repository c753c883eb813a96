"""The resend buffer holds every message until acked and resends it unchanged, within a bound."""

from __future__ import annotations

import pytest

from actors.resend import Outgoing, ResendBuffer


def taken(buffer: ResendBuffer, now: float) -> Outgoing:
    """The next message to send, which the test expects there to be."""
    out = buffer.take(now)
    assert out is not None
    return out


def message(seq: int, body: bytes = b"x" * 100, events: int = 10) -> Outgoing:
    return Outgoing(seq, f"audience.events.{seq % 4}", body, {"Nats-Msg-Id": f"p-{seq}"}, events)


def test_a_failed_message_comes_back_with_the_same_bytes_and_message_id_after_its_backoff() -> None:
    buffer = ResendBuffer(max_bytes=10_000, max_messages=10, backoff_s=0.1)
    original = message(1, body=b"payload")
    buffer.add(original)
    first = buffer.take(now=0.0)
    assert first is original
    buffer.sent(first, now=0.0)
    buffer.failed(first, now=1.0)
    assert buffer.take(now=1.05) is None  # still backing off
    again = buffer.take(now=1.1)
    assert again is not None
    assert (again.subject, again.body, again.headers) == (
        "audience.events.1",
        b"payload",
        {"Nats-Msg-Id": "p-1"},
    )
    assert again.attempts == 2
    assert buffer.held_messages == 1


def test_backoff_doubles_per_attempt_up_to_its_cap() -> None:
    buffer = ResendBuffer(max_bytes=1, max_messages=1, backoff_s=0.1, max_backoff_s=1.0)
    assert [buffer.delay(n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_retries_go_before_new_messages_and_in_sequence_order_once_due() -> None:
    buffer = ResendBuffer(max_bytes=10_000, max_messages=10, backoff_s=1.0)
    for seq in (1, 2, 3):
        buffer.add(message(seq))
    sent = [taken(buffer, 0.0) for _ in range(2)]
    for out in sent:
        buffer.sent(out, 0.0)
    for out in reversed(sent):
        buffer.failed(out, 0.0)
    buffer.add(message(4))
    assert taken(buffer, 0.5).seq == 3  # retries not due yet
    buffer.retry_now(0.6)  # the connection came back
    assert [taken(buffer, 0.6).seq for _ in range(3)] == [1, 2, 4]


def test_an_ack_releases_the_message_and_a_second_ack_is_ignored() -> None:
    buffer = ResendBuffer(max_bytes=10_000, max_messages=10)
    out = message(1)
    buffer.add(out)
    buffer.sent(taken(buffer, 0.0), 0.0)
    assert buffer.acked(out)
    assert not buffer.acked(out)
    assert (buffer.held_messages, buffer.held_bytes, buffer.held_events) == (0, 0, 0)
    assert buffer.oldest_seq is None


def test_overdue_acks_are_reported_oldest_first_and_stop_at_the_first_on_time() -> None:
    buffer = ResendBuffer(max_bytes=10_000, max_messages=10)
    for seq, at in ((1, 0.0), (2, 1.0), (3, 5.0)):
        buffer.add(message(seq))
        buffer.sent(taken(buffer, at), at)
    assert [o.seq for o in buffer.expired(now=4.0, ack_timeout_s=2.0)] == [1, 2]
    assert buffer.in_flight == 3  # expiring does not decide; the owner calls failed()


def test_the_bound_counts_bytes_and_messages_until_they_are_acked() -> None:
    buffer = ResendBuffer(max_bytes=1_000, max_messages=3)
    messages = [message(seq, body=b"x" * 300) for seq in (1, 2, 3)]
    buffer.add(messages[0])
    buffer.add(messages[1])
    assert not buffer.full
    buffer.add(messages[2])
    assert buffer.full  # three messages
    assert buffer.held_bytes == sum(m.size for m in messages) <= 1_000
    for _ in messages:
        buffer.sent(taken(buffer, 0.0), 0.0)
    buffer.acked(messages[1])
    assert not buffer.full
    assert buffer.oldest_seq == 1
    buffer.add(message(4, body=b"x" * 700))
    assert buffer.full  # bytes


def test_a_dropped_message_leaves_the_books_and_the_retry_queue() -> None:
    buffer = ResendBuffer(max_bytes=10_000, max_messages=10)
    out = message(1)
    buffer.add(out)
    buffer.sent(taken(buffer, 0.0), 0.0)
    buffer.failed(out, 0.0)
    buffer.drop(out)
    assert buffer.take(100.0) is None
    assert buffer.held_messages == 0


def test_a_sequence_number_is_held_once() -> None:
    buffer = ResendBuffer(max_bytes=10_000, max_messages=10)
    buffer.add(message(1))
    with pytest.raises(ValueError, match="already held"):
        buffer.add(message(1))
