"""Per-request reads of a shard over NATS request/reply: the model replicas' fast path.

A Ray actor call from a Serve replica to a shard costs 1.5-2.5 ms on a 2-core
machine (a gRPC task push, a streamed result, thread hand-offs on both sides);
a NATS request/reply between the same processes costs about 0.3 ms. A top-k
makes two reads (the users' rows, then the seen-items check of the candidates
proposed from them), so the model replicas ask over NATS, and fall back to the
Ray call when NATS cannot answer (no connection, a refused login, no shard
subscribed yet): the answers are the same either way, the fallback is slower.

- Subject: ``audience.query.<scope>.<shard>`` (``scope`` is the pool's stream and
  name, so pools sharing a server never answer each other). Only the shard role
  subscribes to it and only the api role publishes to it (``cluster.nats_users``).
- Requests and answers are data, never code: JSON, and :class:`UserRows` as a JSON
  header and raw numeric arrays whose dtypes are checked before use (no pickle).
- Errors travel as ``{"error": ...}`` answers and are raised again on the caller's
  side as the same types (:class:`NotOwner` makes the pool re-read the layout,
  :class:`ShardRecovering` is a 503), exactly as a Ray call raises them.
- An answer reflects every event the shard applied before the request reached it:
  the request runs on the shard's event loop, between two apply steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from actors.errors import AudienceError, NotOwner, ShardRecovering
from actors.nats_auth import NatsCredentials
from actors.nats_auth import connect as nats_connect
from actors.state import _ROW_ARRAYS, UserRows

log = logging.getLogger(__name__)

QUERY_SUBJECT_PREFIX = "audience.query"
# The reads a shard answers over NATS (the per-request ones of the model replicas).
METHODS = ("user_rows", "seen")
# A shard busy with a long step still answers within this; past it the Ray call is tried.
QUERY_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0  # the first connection's bound (it then reconnects on its own)
# After NATS could not answer, the Ray calls are used for this long before NATS is tried again.
FALLBACK_S = 10.0
_NUMERIC = "biuf"  # dtype kinds an answer may carry: bool, int, uint, float
_HEADER = struct.Struct(">I")


class QueryError(AudienceError):
    """A shard could not answer a query (a bug or bad input on its side), with its reason."""


def query_subject(scope: str, shard: int) -> str:
    """The subject shard ``shard`` of the pool ``scope`` answers queries on."""
    return f"{QUERY_SUBJECT_PREFIX}.{scope}.{shard}"


# -- codec --------------------------------------------------------------------------


def encode_request(method: str, arg: Sequence[Any]) -> bytes:
    """A query: the method and its one argument (user ids, or (user, items) pairs)."""
    return orjson.dumps({"method": method, "arg": arg})


def decode_request(data: bytes) -> tuple[str, list[Any]]:
    """The method and argument of a query.

    Raises:
        QueryError: not a query of a known method with a list argument.
    """
    try:
        body = orjson.loads(data)
        method, arg = body["method"], body["arg"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise QueryError("not a query: a JSON object with method and arg") from None
    if method not in METHODS or not isinstance(arg, list):
        raise QueryError(f"unknown query {method!r} or its argument is not a list")
    return method, arg


def encode_rows(rows: UserRows) -> bytes:
    """``rows`` as a length-prefixed JSON header and the raw bytes of its arrays."""
    arrays = [np.ascontiguousarray(getattr(rows, name)) for name in _ROW_ARRAYS]
    header = orjson.dumps(
        {
            "arrays": [[a.dtype.str, list(a.shape)] for a in arrays],
            "user_ids": rows.user_ids,
            "recent": rows.recent,
            "affinity": rows.affinity,
            "traits": rows.traits,
            "half_life_ms": rows.half_life_ms,
        }
    )
    return b"".join([_HEADER.pack(len(header)), header, *(a.tobytes() for a in arrays)])


def decode_rows(data: bytes) -> UserRows:
    """The :class:`UserRows` of :func:`encode_rows` (numeric arrays only, sizes checked).

    Raises:
        QueryError: the bytes are not such an answer.
    """
    try:
        (size,) = _HEADER.unpack_from(data)
        header = orjson.loads(data[_HEADER.size : _HEADER.size + size])
        at = _HEADER.size + size
        arrays: dict[str, np.ndarray] = {}
        for name, (dtype_str, shape) in zip(_ROW_ARRAYS, header["arrays"], strict=True):
            dtype = np.dtype(dtype_str)
            if dtype.kind not in _NUMERIC:
                raise QueryError(f"{name}: dtype {dtype_str!r} is not numeric")
            count = int(np.prod(shape, dtype=np.int64))
            end = at + count * dtype.itemsize
            if end > len(data):
                raise QueryError(f"{name}: the answer is shorter than its header says")
            arrays[name] = np.frombuffer(data, dtype, count, at).reshape(shape).copy()
            at = end
        if at != len(data):
            raise QueryError("the answer is longer than its header says")
        return UserRows(
            user_ids=list(header["user_ids"]),
            recent=list(header["recent"]),
            affinity=list(header["affinity"]),
            traits=list(header["traits"]),
            half_life_ms=float(header["half_life_ms"]),
            **arrays,
        )
    except (struct.error, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise QueryError(f"not a rows answer: {exc}") from None


def encode_answer(method: str, value: Any) -> bytes:
    """A shard's answer to ``method``: rows in their binary form, anything else as JSON."""
    return encode_rows(value) if method == "user_rows" else orjson.dumps(value)


def encode_error(exc: BaseException) -> bytes:
    """An error answer that :func:`decode_answer` raises again as its type."""
    if isinstance(exc, NotOwner):
        body: dict[str, Any] = {
            "error": "not_owner",
            "shard": exc.shard,
            "partitions": exc.partitions,
        }
    elif isinstance(exc, ShardRecovering):
        body = {"error": "recovering", "shard": exc.shard, "detail": exc._detail}
    else:
        body = {"error": "failed", "detail": f"{type(exc).__name__}: {exc}"}
    return orjson.dumps(body)


def decode_answer(method: str, data: bytes) -> Any:
    """The value of an answer to ``method``, or its error raised.

    Raises:
        NotOwner: the shard does not hold some of the users' partitions.
        ShardRecovering: the shard is restoring or replaying.
        QueryError: the shard failed, or the answer is not one.
    """
    if data[:1] == b"{":  # an error: rows start with their header length, seen with "["
        try:
            body = orjson.loads(data)
            kind = body["error"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise QueryError("an unreadable error answer") from None
        if kind == "not_owner":
            raise NotOwner(int(body["shard"]), [int(p) for p in body["partitions"]])
        if kind == "recovering":
            raise ShardRecovering(int(body["shard"]), str(body["detail"]))
        raise QueryError(str(body.get("detail", kind)))
    if method == "user_rows":
        return decode_rows(data)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise QueryError(f"an unreadable {method} answer") from None


def answer(data: bytes, ask: Callable[[str, list[Any]], Any]) -> bytes:
    """The shard side: decode a query, run it with ``ask(method, arg)``, encode the outcome."""
    try:
        method, arg = decode_request(data)
        if method == "seen":
            arg = [(str(user), [str(i) for i in items]) for user, items in arg]
        return encode_answer(method, ask(method, arg))
    except (NotOwner, ShardRecovering, QueryError) as exc:
        return encode_error(exc)
    except Exception as exc:  # a bug must reach the caller as an error, not a timeout
        log.exception("a shard query failed")
        return encode_error(exc)


# -- the asking side ----------------------------------------------------------------


class QueryClient:
    """Asks shards over NATS; says when it cannot, so the caller uses the Ray call.

    Connects on first use, on the caller's event loop. After NATS could not
    answer (no server, a refused login, no shard subscribed, no answer in
    :data:`QUERY_TIMEOUT_S`), :meth:`ask` says "not answered" for :data:`FALLBACK_S`
    without trying (that shard, or every shard when the connection failed), so an
    outage costs one timeout, not one per request.
    """

    def __init__(self, nats_url: str, credentials: NatsCredentials | None, scope: str) -> None:
        self.nats_url = nats_url
        self.credentials = credentials
        self.scope = scope
        self.answered = 0  # queries answered over NATS (errors included)
        self.fell_back = 0  # queries NATS could not answer
        self._nc: Client | None = None
        self._connecting: asyncio.Lock | None = None
        self._resting_until: dict[int, float] = {}  # shard (-1: all) -> loop time

    async def ask(self, shard: int, method: str, arg: Sequence[Any]) -> tuple[bool, Any]:
        """``(True, value)`` answered by the shard over NATS, ``(False, None)`` if NATS could not.

        Raises what the shard raised (:func:`decode_answer`).
        """
        now = asyncio.get_running_loop().time()
        if now < max(self._resting_until.get(shard, 0.0), self._resting_until.get(-1, 0.0)):
            self.fell_back += 1
            return False, None
        who = -1  # a connection that fails rests every shard's queries
        try:
            nc = await self._connected()
            who = shard
            msg = await nc.request(
                query_subject(self.scope, shard), encode_request(method, arg), QUERY_TIMEOUT_S
            )
        except (NatsError, OSError, TimeoutError, AudienceError) as exc:
            self.fell_back += 1
            self._resting_until[who] = now + FALLBACK_S
            log.warning(
                "shard %s: no answer over NATS (%r); Ray calls for %g s", shard, exc, FALLBACK_S
            )
            return False, None
        self.answered += 1
        return True, decode_answer(method, msg.data)

    def counts(self) -> dict[str, int]:
        """Reads answered over NATS and reads left to the Ray call (for the status)."""
        return {"over_nats": self.answered, "fell_back": self.fell_back}

    async def _connected(self) -> Client:
        """The connection, made on first use within :data:`CONNECT_TIMEOUT_S` (then reconnecting
        for ever on its own).

        Raises:
            QueryError: NATS is reconnecting, or failed a moment ago (the caller falls
                back to Ray).
            Exception: the first connection failed (idem; the next use tries again).
        """
        if self._nc is not None and self._nc.is_connected:
            return self._nc
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if asyncio.get_running_loop().time() < self._resting_until.get(-1, 0.0):
                raise QueryError("NATS could not be reached a moment ago")
            if self._nc is None:
                nc = Client()
                try:
                    await asyncio.wait_for(
                        nats_connect(
                            self.nats_url,
                            self.credentials,
                            client=nc,
                            name="audience-shard-queries",
                            max_reconnect_attempts=-1,
                            connect_timeout=CONNECT_TIMEOUT_S,
                        ),
                        CONNECT_TIMEOUT_S,
                    )
                except BaseException:
                    with contextlib.suppress(Exception):
                        await nc.close()
                    raise
                self._nc = nc
            if not self._nc.is_connected:
                raise QueryError("NATS is reconnecting")
            return self._nc

    async def close(self) -> None:
        """Close the connection, if one was made."""
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()
        self._nc = None


async def respond(msg: Msg, ask: Callable[[str, list[Any]], Any]) -> None:
    """Answer one query message (the shard's subscription callback body)."""
    await msg.respond(answer(msg.data, ask))
