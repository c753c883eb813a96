"""Request limits of the HTTP API: a token bucket per key, and a body size cap per request.

Both are plain (no Ray): the rate limiter takes a clock, the body limit is an
ASGI middleware that asks a function for the limit of each request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import Message, Receive, Send


@dataclass
class TokenBucket:
    """``burst`` requests at once, then ``rate_per_s`` on average; refilled lazily."""

    tokens: float
    at: float

    def take(self, now: float, rate_per_s: float, burst: float) -> float:
        """Spend one token: 0.0 when there was one, else the seconds until there is."""
        self.tokens = min(burst, self.tokens + max(0.0, now - self.at) * rate_per_s)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / rate_per_s


class RateLimiter:
    """One token bucket per key id (per API replica: N replicas allow N times the rate)."""

    def __init__(
        self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: str, rate_per_s: float | None = None, burst: float | None = None) -> float:
        """Admit one request of ``key``: 0.0, or the seconds to wait (nothing was spent).

        ``rate_per_s`` and ``burst`` override the defaults for this key.
        """
        rate = rate_per_s or self.rate_per_s
        most = burst or self.burst
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(tokens=most, at=now)
        return bucket.take(now, rate, most)


def retry_after(seconds: float) -> str:
    """A Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


AsgiScope = dict[str, Any]


class BodyLimit:
    """ASGI middleware: 413 for a request body over its limit, declared or streamed.

    A ``Content-Length`` over the limit is refused before anything is read. A
    body without one (chunked) is counted as it arrives: past the limit, the
    app is told the client went away, whatever it answers is dropped and the
    caller gets the 413 instead.

    Args:
        app: the wrapped ASGI app.
        limit_for: the byte limit of a request, from its ASGI scope.
    """

    def __init__(self, app: Any, limit_for: Callable[[AsgiScope], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            detail = f"body of {int(declared)} bytes exceeds the limit of {limit} bytes"
            await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
            return
        seen = 0
        over = False

        async def counted() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def unless_over(message: Message) -> None:
            if not over:
                await send(message)

        try:
            await self.app(scope, counted, unless_over)
        except Exception:
            if not over:
                raise
        if over:
            detail = f"body of more than {limit} bytes"
            await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
