"""The HTTP API: a Ray Serve deployment with a FastAPI ingress (no postponed annotations:
FastAPI reads them at import time).

``POST /v1/events`` validates and publishes, ``GET /v1/users/{id}`` reads the
live profile from the owning shard, ``GET /v1/status`` gathers what an
operator needs, ``GET /healthz`` answers probes. Errors map to status codes in
:mod:`serving.errors`, in one place.
"""

import asyncio
from dataclasses import dataclass, field
from typing import Any

import nats
import orjson
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from nats.aio.client import Client
from ray import serve

from actors.jetstream import StreamNames, dead_letter_counts
from actors.pool import PoolSpec, ShardPool
from actors.producer import Producer
from actors.validation import ValidationPolicy, parse_events
from serving.errors import install_error_handlers
from serving.schemas import IngestResult, Profile, RejectedEvent

app = FastAPI(
    title="audience-insights",
    version="0.1.0",
    description="Real-time audience insights: ingest events, read live per-user state.",
)
install_error_handlers(app)

# Helpers stand above the deployment: Serve pickles the ingress class by value,
# with the module globals defined at that point.


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the API replicas need, handed down by the launcher."""

    pool: PoolSpec
    streams: StreamNames = field(default_factory=StreamNames)
    policy: ValidationPolicy = field(default_factory=ValidationPolicy)
    max_batch: int = 1000
    max_body_bytes: int = 8 * 1024 * 1024
    max_events_per_request: int = 10_000


def _unwrap_events(raw: bytes) -> bytes:
    """Accept ``{"events": [...]}`` as well as a bare array."""
    if raw.lstrip()[:1] == b"{":
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw
        if isinstance(doc, dict) and set(doc) == {"events"}:
            return orjson.dumps(doc["events"])
    return raw


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress(app)
class ApiGateway:
    """One API replica: a NATS connection, a producer, handles to the shard pool."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.pool = ShardPool.connect(config.pool)
        self._nc: Client | None = None
        self._producer: Producer | None = None
        self._lock = asyncio.Lock()

    async def _connected(self) -> Producer:
        async with self._lock:
            if self._producer is None:
                self._nc = await nats.connect(
                    self.config.pool.nats_url, name="audience-api", max_reconnect_attempts=-1
                )
                self._producer = await Producer(
                    self._nc.jetstream(),
                    self.config.pool.partitions,
                    policy=self.config.policy,
                    max_batch=self.config.max_batch,
                    linger_ms=0,
                ).start()
            return self._producer

    @app.post(
        "/v1/events",
        status_code=202,
        response_model=IngestResult,
        responses={
            422: {"model": IngestResult, "description": "Some events were rejected."},
            413: {"description": "Body or batch too large."},
            503: {"description": "NATS unavailable; retry after the given seconds."},
        },
        summary="Ingest a batch of events (a JSON array, or an object with an 'events' array)",
    )
    async def ingest(self, request: Request) -> Response:
        """Validate each event; publish the good ones; report the bad ones with reasons.

        The answer is 202 when every event was accepted and 422 when some were
        not (the good ones are published all the same). Either way, accepted
        events are durably in the stream when the answer arrives.
        """
        raw = await request.body()
        if len(raw) > self.config.max_body_bytes:
            return _error(413, f"body of {len(raw)} bytes exceeds {self.config.max_body_bytes}")
        checked = parse_events(_unwrap_events(raw), self.config.policy)
        total = len(checked.batch) + len(checked.rejected)
        if total > self.config.max_events_per_request:
            limit = self.config.max_events_per_request
            return _error(413, f"{total} events in one request; the limit is {limit}")
        producer = await self._connected()
        await producer.publish_checked(checked)
        await producer.flush()
        result = IngestResult(
            accepted=len(checked.batch),
            rejected=[
                RejectedEvent(index=r.index, reason=r.reason.value, detail=r.detail)
                for r in checked.rejected
            ],
        )
        return JSONResponse(result.model_dump(), status_code=422 if checked.rejected else 202)

    @app.get("/v1/users", summary="Some user ids with live state, to explore with")
    async def users(self, limit: int = Query(default=20, ge=1, le=1000)) -> dict[str, list[str]]:
        """A sample of user ids held by the shards (not a listing of all users)."""
        return {"users": await self.pool.users(limit)}

    @app.get(
        "/v1/users/{user_id}",
        response_model=Profile,
        responses={404: {"description": "No event of this user has been applied."}},
        summary="The live profile of one user",
    )
    async def user(self, user_id: str) -> Response:
        """Counts per event type, first/last seen and the rest of the user's live state."""
        (profile,) = await self.pool.profiles([user_id])
        if profile is None:
            return _error(404, f"unknown user {user_id!r}")
        return Response(orjson.dumps(profile), media_type="application/json")

    @app.get("/v1/status", summary="Shard counters, lag per partition, dead letters")
    async def status(self) -> dict[str, Any]:
        """What ``audience status`` prints."""
        shards = await self.pool.status()
        await self._connected()
        assert self._nc is not None
        dead = await dead_letter_counts(self._nc.jetstream(), self.config.streams)
        lag = {p: n for s in shards for p, n in s.get("lag", {}).items()}
        producer = self._producer
        return {
            "ingest": {
                "accepted": producer.published_events if producer else 0,
                "rejected": dict(producer.rejected) if producer else {},
            },
            "shards": shards,
            "lag": dict(sorted(lag.items(), key=lambda kv: int(kv[0]))),
            "dead_letters": dead,
        }

    @app.get("/healthz", summary="Liveness probe")
    async def healthz(self) -> dict[str, str]:
        """Always open, cheap: the replica is up and serving."""
        return {"status": "ok"}


def build_app(config: GatewayConfig) -> serve.Application:
    """The Serve application for ``serve.run``."""
    return ApiGateway.bind(config)  # type: ignore[attr-defined]
