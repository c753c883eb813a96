"""Who may call the API: a presented key, the scope a route needs, and the key's rate.

:class:`Guard` is what an API replica consults on every protected request. It
holds the accepted keys (hashes only), re-reads the key store file when it
changes (at most once per ``reload_every_s``), so ``audience keys create`` and
``revoke`` take effect without a restart, and keeps a token bucket per key.
Refusals are exceptions with data; :mod:`serving.errors` maps them to
401 / 403 / 429. Plain Python: no Ray, no FastAPI.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from actors.errors import AudienceError
from serving.auth import KeyRecord, KeyRing, KeyStore, Scope
from serving.limits import RateLimiter

log = logging.getLogger(__name__)

ANONYMOUS = "(anonymous)"  # the rate bucket of the public dashboard's callers (no key id)
MISSING_KEY = "send an API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"


@dataclass(frozen=True)
class AuthConfig:
    """How the API checks callers; handed to the replicas by the launcher.

    Attributes:
        enabled: require keys (off only for local experiments).
        keys: the accepted keys' records (hashes), as the store held them at deploy time.
        keys_file: the key store to follow for changes; when it cannot be read
            on a replica's node, ``keys`` hold.
        dashboard_public: the dashboard's data calls need no key.
        rate_per_s: default requests per second per key (per replica).
        burst: default requests a key may make at once.
        reload_every_s: how often the key store file is checked for changes.
    """

    enabled: bool = True
    keys: tuple[KeyRecord, ...] = ()
    keys_file: str | None = None
    dashboard_public: bool = False
    rate_per_s: float = 500.0
    burst: float = 1000.0
    reload_every_s: float = 1.0


class AccessError(AudienceError):
    """A request was refused before it reached its route.

    Attributes:
        reason: machine-readable reason (``missing_key``, ``invalid_key``,
            ``insufficient_scope``, ``rate_limited``).
        detail: what to do about it, for people; never holds a key.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Unauthenticated(AccessError):
    """No key, or not a valid one (HTTP 401)."""


class Forbidden(AccessError):
    """A valid key without the scope the route needs (HTTP 403).

    Attributes:
        key_id: the key's public id.
        needed: the scope the route needs.
        granted: the scopes the key has.
    """

    def __init__(self, *, key_id: str, needed: str, granted: tuple[str, ...]) -> None:
        super().__init__(
            "insufficient_scope",
            f"key {key_id} lacks the '{needed}' scope (it has: {', '.join(granted)})",
        )
        self.key_id = key_id
        self.needed = needed
        self.granted = granted


class RateLimited(AccessError):
    """A key made more requests than its rate allows (HTTP 429 with Retry-After).

    Attributes:
        key_id: the key's public id.
        rate_per_s: its rate.
        burst: its burst.
        retry_after_s: seconds until its next request is admitted.
    """

    def __init__(self, *, key_id: str, rate_per_s: float, burst: float, retry_after_s: float):
        super().__init__(
            "rate_limited",
            f"key {key_id} is limited to {rate_per_s:g} requests/s (bursts of {burst:g}) "
            f"per API replica; retry in {math.ceil(retry_after_s)} s",
        )
        self.key_id = key_id
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.retry_after_s = retry_after_s


class Guard:
    """One replica's key check and rate limiter."""

    def __init__(self, config: AuthConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._ring = KeyRing(config.keys)
        self._limiter = RateLimiter(config.rate_per_s, config.burst, clock)
        self._file_state: tuple[int, int, int] | None = None
        self._checked_at = -math.inf
        if not config.enabled:
            log.warning("API authentication is OFF: anyone who reaches the port may call it")

    def admit(
        self, presented: str | None, scope: Scope, *, public: bool = False
    ) -> KeyRecord | None:
        """The caller's key record if it may do what ``scope`` guards now.

        ``public`` marks the dashboard's data calls, which need no key when the
        dashboard is public (all such callers share one rate bucket, ``ANONYMOUS``,
        at the default rate). With authentication off, everything is admitted (None).

        Raises:
            Unauthenticated: no key, or an invalid one.
            Forbidden: the key lacks ``scope``.
            RateLimited: the key (or the public dashboard's callers) is over its rate.
        """
        if not self.config.enabled:
            return None
        if public and self.config.dashboard_public:
            # No key to limit by: every anonymous caller shares one bucket, so that an
            # open dashboard cannot be used to load the shards and NATS without bound.
            wait = self._limiter.take(ANONYMOUS)
            if wait > 0:
                raise RateLimited(
                    key_id=ANONYMOUS,
                    rate_per_s=self.config.rate_per_s,
                    burst=self.config.burst,
                    retry_after_s=wait,
                )
            return None
        if not presented:
            raise Unauthenticated("missing_key", f"missing API key: {MISSING_KEY}")
        record = self._keys().verify(presented.strip())
        if record is None:
            raise Unauthenticated("invalid_key", "invalid or revoked API key")
        if not record.grants(scope):
            raise Forbidden(key_id=record.id, needed=scope.value, granted=record.scopes)
        wait = self._limiter.take(record.id, record.rate_per_s, record.burst)
        if wait > 0:
            raise RateLimited(
                key_id=record.id,
                rate_per_s=record.rate_per_s or self.config.rate_per_s,
                burst=record.burst or self.config.burst,
                retry_after_s=wait,
            )
        return record

    def _keys(self) -> KeyRing:
        """The accepted keys, re-read from the store file when it changed."""
        path = self.config.keys_file
        now = self._clock()
        if path is None or now - self._checked_at < self.config.reload_every_s:
            return self._ring
        self._checked_at = now
        try:
            stat = os.stat(path)
        except OSError:  # not on this node (a cluster): the deploy-time keys hold
            return self._ring
        state = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if state != self._file_state:
            try:
                self._ring = KeyRing(KeyStore(Path(path)).load())
            except (OSError, ValueError, TypeError, KeyError):
                log.warning("cannot read the key store %s; keeping the keys held", path)
                return self._ring
            self._file_state = state
        return self._ring
