"""Wait on a condition with a deadline, instead of sleeping and hoping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout_s: float = 120.0, every_s: float = 0.1) -> T:
    """Call ``check`` until it returns something truthy; return it, or fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: T = check()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s (last: {last!r})")
        time.sleep(every_s)
        last = check()
    return last


async def async_wait_until(
    check: Callable[[], Awaitable[T]], timeout_s: float = 120.0, every_s: float = 0.1
) -> T:
    """:func:`wait_until` for coroutine checks."""
    deadline = time.monotonic() + timeout_s
    last = await check()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s (last: {last!r})")
        await asyncio.sleep(every_s)
        last = await check()
    return last
