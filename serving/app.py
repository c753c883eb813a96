"""The HTTP API: a Ray Serve deployment with a FastAPI ingress (no postponed annotations:
FastAPI reads them at import time).

``POST /v1/events`` validates and publishes, ``GET /v1/users/{id}`` reads the
live profile from the owning shard, ``GET /v1/insights/engagement``,
``/conversion``, ``/retention`` and ``/trends`` read a snapshot that a timer merges from every
shard's partials (never per request), ``GET /v1/status`` gathers what an operator
needs, ``GET /healthz`` answers probes. Errors map to status codes in
:mod:`serving.errors`, in one place.

Every route but the probe, the docs and the dashboard's static files needs an
API key with a scope (:func:`require`, checked by the replica's
:class:`~serving.guard.Guard`); every request body has a size limit (:class:`BodyLimit`).
"""

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path as PathLib
from typing import Annotated, Any

import nats
import orjson
import ray
from fastapi import Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from nats.aio.client import Client
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from actors.conversion import PURCHASERS_RELATIVE_ERROR
from actors.engagement import ACTIVE_USERS_RELATIVE_ERROR, report
from actors.errors import UnavailableError
from actors.events import MAX_ID_LENGTH, TYPE_CODE, EventType, to_epoch_ms
from actors.funnel_report import conversion_answer
from actors.insights import (
    Insights,
    merge_insights,
    retention_answer,
    retention_problem,
    segments_report,
    trends_answer,
)
from actors.jetstream import StreamNames, dead_letter_counts
from actors.latency import LatencyRing
from actors.nats_auth import NatsCredentials, redact_url
from actors.nats_auth import connect as nats_connect
from actors.pool import NAMESPACE, PoolSpec, ShardPool
from actors.producer import Producer
from actors.state import iso_ms
from actors.stream_retention import retention_warnings
from actors.validation import ValidationPolicy, parse_events
from actors.windows import Granularity, WindowConfig
from models.booster import ArtifactError
from models.churn import KIND as CHURN
from models.ranker import KIND as PERSONALIZATION
from models.registry import ModelRegistry
from serving import dashboard
from serving.access import ADMIN, DASHBOARD_READ, READ, RequireScope, api_app
from serving.alerts import AlertCenter, AlertsConfig
from serving.auth import KeyRecord, Scope
from serving.errors import InsightsOff, ModelsOff
from serving.guard import AuthConfig, Forbidden, Guard
from serving.inbound_config import InboundSources
from serving.inbound_webhooks import InboundWebhooks
from serving.model_routes import (
    CHURN_PREFIX,
    PERSONALIZE_PREFIX,
    churn_routes,
    personalize_routes,
)
from serving.models import (
    CHURN_APP,
    MODEL_APPS,
    PERSONALIZE_APP,
    ChurnScorer,
    ModelsConfig,
    Personalizer,
)
from serving.replicas import ReplicaScaling
from serving.schemas import (
    ConversionAnswer,
    EngagementAnswer,
    IngestResult,
    Profile,
    PromoteRequest,
    RejectedEvent,
    RescaleRequest,
    RetentionAnswer,
    SegmentsAnswer,
    TrendsAnswer,
    WebhookResult,
)

log = logging.getLogger(__name__)

RETENTION_CHECK_S = 30.0  # how long a retention check is reused by /v1/status
AUTOSCALER_NAME = "audience-autoscaler"  # the cluster layer's controller actor, by name
GATEWAY_APP = "audience"  # the Serve application of the gateway, at /

app = api_app(
    title="audience-insights",
    version="0.1.0",
    description="Real-time audience insights: ingest events, read live per-user state.",
)
# Served by the model deployments' own apps; here for the schema, and 503 without models.
app.include_router(churn_routes)
app.include_router(personalize_routes)


def _worst(rings: Any) -> dict[str, float | None]:
    """The largest of each percentile over shards' rings (the shard furthest behind)."""
    out: dict[str, float | None] = {"p50": None, "p99": None, "max": None}
    for ring in rings:
        for key, value in (ring or {}).items():
            if value is not None and key in out:
                out[key] = max(value, out[key] or 0.0)
    return out


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the API replicas need, handed down by the launcher."""

    pool: PoolSpec
    streams: StreamNames = field(default_factory=StreamNames)
    policy: ValidationPolicy = field(default_factory=ValidationPolicy)
    max_batch: int = 1000
    max_body_bytes: int = 8 * 1024 * 1024
    max_events_per_request: int = 10_000
    windows: WindowConfig = field(default_factory=WindowConfig)
    insights_merge_every_s: float = 1.0
    insights: bool = True  # off: the shards keep no insight aggregates (profile-only mode)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    registry: str | None = None
    webhooks: InboundSources = field(default_factory=InboundSources)  # inbound sources
    auth: AuthConfig = field(default_factory=AuthConfig)
    max_json_body_bytes: int = 1024 * 1024  # every body but POST /v1/events
    nats_credentials: NatsCredentials | None = None  # the API's NATS login (api role)


def _unwrap_events(raw: bytes) -> bytes:
    """Accept ``{"events": [...]}`` as well as a bare array."""
    if raw.lstrip()[:1] == b"{":
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw
        if isinstance(doc, dict) and set(doc) == {"events"}:
            events = doc["events"]
            try:
                return orjson.dumps(events)
            except TypeError:  # orjson reads 1024 levels of nesting but writes only 254
                if not isinstance(events, list):
                    return raw  # no array: refused whole either way
            items = []  # each item on its own, so the good ones keep their verdict
            for item in events:
                try:
                    items.append(orjson.dumps(item))
                except TypeError:
                    items.append(b'"<nested too deeply>"')  # no object: a schema rejection
            return b"[" + b",".join(items) + b"]"
    return raw


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


# Query parameters shared by the bucketed insights endpoints.
GranularityParam = Annotated[Granularity, Query(description="Bucket width.")]
StartParam = Annotated[datetime | None, Query(description="RFC 3339, inclusive.")]
EndParam = Annotated[datetime | None, Query(description="RFC 3339, exclusive.")]
IncludeLateParam = Annotated[bool, Query(description="Add late-event corrections.")]


def _epoch_ms(value: datetime | None) -> int | None:
    return None if value is None else to_epoch_ms(value)


def _window_header(
    granularity: Granularity, start_ms: int | None, end_ms: int | None, as_of: float
) -> dict[str, Any]:
    """The part every bucketed insights answer starts with."""
    return {
        "granularity": granularity.value,
        "start": None if start_ms is None else iso_ms(start_ms),
        "end": None if end_ms is None else iso_ms(end_ms),
        "as_of": iso_ms(int(as_of * 1000)),
    }


def _range_problem(
    granularity: Granularity, start: datetime | None, end: datetime | None, windows: WindowConfig
) -> str | None:
    """Why a requested time range cannot be answered, or None when it can."""
    for name, value in (("start", start), ("end", end)):
        if value is not None and value.utcoffset() is None:
            return f"{name} must be RFC 3339 with a timezone, e.g. 2024-03-01T00:00:00Z"
    if start is None or end is None:
        return None
    if end <= start:
        return "end must be after start"
    most = windows.retention[granularity]
    buckets = -(-(to_epoch_ms(end) - to_epoch_ms(start)) // granularity.width_ms)
    if buckets > most:
        return (
            f"range covers {buckets} {granularity.value} buckets; at most {most} are kept, "
            "use a coarser granularity"
        )
    return None


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress(app)
class ApiGateway:
    """One API replica: a NATS connection, a producer, handles to the shard pool."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.guard = Guard(config.auth)
        self.api_latency = LatencyRing()
        self._model_handles: dict[str, DeploymentHandle] = {}
        self.pool = ShardPool.connect(config.pool)
        self._nc: Client | None = None
        self._producer: Producer | None = None
        self._lock = asyncio.Lock()
        self._merged: tuple[float, Insights] | None = None
        self._merged_ready = asyncio.Event()
        self._merge_task: asyncio.Task[None] | None = None
        self._retention_cache: tuple[float, list[dict[str, Any]]] = (-RETENTION_CHECK_S, [])
        self.alerts = AlertCenter(config.alerts)
        self.inbound = InboundWebhooks(config.webhooks)
        if config.alerts.webhook_urls:  # deliveries must not wait for a first reader
            with contextlib.suppress(RuntimeError):  # no loop: the first request starts it
                self._merge_task = asyncio.get_running_loop().create_task(self._merge_forever())

    def body_limit(self, path: str) -> int:
        """Bytes a request's body may have: ingest's limit for events, a smaller one elsewhere."""
        if path == "/v1/events":
            return self.config.max_body_bytes
        return self.config.max_json_body_bytes

    # The model routes' entries (serving.model_routes): the model deployments answer
    # them in their own Serve applications; a request reaches these only when the
    # platform serves no models.

    async def churn_answers(self, user_ids: list[str]) -> list[dict[str, Any]]:
        raise ModelsOff()

    async def top_items(self, user_ids: list[str], k: int) -> list[dict[str, Any]]:
        raise ModelsOff()

    async def ranked_items(self, user_id: str, items: list[str]) -> dict[str, Any]:
        raise ModelsOff()

    def _model_handle(self, kind: str) -> DeploymentHandle | None:
        """The deployment serving ``kind``, in its own application; None without models."""
        if self.config.registry is None:
            return None
        if kind not in self._model_handles:
            deployment, app_name = MODEL_APPS[kind]
            self._model_handles[kind] = serve.get_deployment_handle(deployment, app_name)
        return self._model_handles[kind]

    async def _connected(self) -> Producer:
        """This replica's producer, on a NATS connection that reconnects for ever.

        The first connection is bounded in time, so that requests arriving while
        NATS is down answer 503 instead of queueing behind the attempt.

        Raises:
            UnavailableError: NATS could not be reached in time (the next call tries again).
        """
        if self._producer is not None:
            return self._producer
        timeout_s = 5.0
        try:
            await asyncio.wait_for(self._lock.acquire(), timeout_s)
        except asyncio.TimeoutError:
            raise UnavailableError("nats", "still connecting", retry_after_s=2.0) from None
        try:
            if self._producer is None:
                nc = Client()
                try:
                    await asyncio.wait_for(
                        nats_connect(
                            self.config.pool.nats_url,
                            self.config.nats_credentials,
                            client=nc,
                            name="audience-api",
                            max_reconnect_attempts=-1,
                            connect_timeout=2,
                        ),
                        timeout_s,
                    )
                except (asyncio.TimeoutError, OSError, nats.errors.Error) as exc:
                    with contextlib.suppress(Exception):
                        await nc.close()
                    detail = f"cannot connect to {redact_url(self.config.pool.nats_url)}: {exc!r}"
                    raise UnavailableError("nats", detail, retry_after_s=2.0) from None
                self._nc = nc
                self._producer = await Producer(
                    nc.jetstream(),
                    self.config.pool.partitions,
                    policy=self.config.policy,
                    max_batch=self.config.max_batch,
                    linger_ms=0,
                    max_block_s=0,  # a full producer answers 429 at once
                ).start()
            return self._producer
        finally:
            self._lock.release()

    async def _sending(self) -> Producer:
        """The producer, if its connection is up now (else 503 at once, nothing accepted)."""
        producer = await self._connected()
        if not producer.connected:
            raise UnavailableError("nats", "connection lost; reconnecting", retry_after_s=2.0)
        return producer

    @app.post(
        "/v1/events",
        status_code=202,
        response_model=IngestResult,
        responses={
            422: {"model": IngestResult, "description": "Some events were rejected."},
            413: {"description": "Body or batch too large."},
            429: {
                "description": "This replica holds as much unacknowledged data as it may; "
                "nothing was accepted. Retry after the seconds in Retry-After."
            },
            503: {
                "description": "NATS is unreachable (nothing was accepted), or the stream did "
                "not acknowledge in time (the events are kept and resent). Retry after the "
                "seconds in Retry-After; a retried event counts once (shards de-duplicate "
                "event_id)."
            },
        },
        summary="Ingest a batch of events (a JSON array, or an object with an 'events' array)",
    )
    async def ingest(
        self,
        request: Request,
        caller: Annotated[KeyRecord | None, Depends(RequireScope(Scope.INGEST))],
    ) -> Response:
        """Validate each event; publish the good ones; report the bad ones with reasons.

        The answer is 202 when every event was accepted and 422 when some were
        not (the good ones are published all the same). Either way, accepted
        events are durably in the stream when the answer arrives. Overload is
        refused early, before the body is parsed: 429 while the replica's
        producer is at its bound, 503 while NATS is unreachable.
        """
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return _error(413, f"body of {declared} bytes exceeds {limit}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():  # never more than the limit in memory
            size += len(chunk)
            if size > limit:
                return _error(413, f"body of more than {limit} bytes")
            chunks.append(chunk)
        producer = await self._sending()
        producer.check_room()
        checked = parse_events(_unwrap_events(b"".join(chunks)), self.config.policy)
        # Forgetting a user is DELETE /v1/users/{id}'s, with the admin scope: an ingest
        # key must not do it by sending the event that route sends.
        deletes = checked.batch.type == TYPE_CODE[EventType.USER_DELETED]
        if caller is not None and not caller.grants(Scope.ADMIN) and bool(deletes.any()):
            raise Forbidden(key_id=caller.id, needed=Scope.ADMIN.value, granted=caller.scopes)
        total = len(checked.batch) + len(checked.rejected)
        if total > self.config.max_events_per_request:
            limit = self.config.max_events_per_request
            return _error(413, f"{total} events in one request; the limit is {limit}")
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

    @app.get(
        "/v1/users", dependencies=READ, summary="Some user ids with live state, to explore with"
    )
    async def users(self, limit: int = Query(default=20, ge=1, le=1000)) -> dict[str, list[str]]:
        """A sample of user ids held by the shards (not a listing of all users)."""
        return {"users": await self.pool.users(limit)}

    @app.get(
        "/v1/users/{user_id}",
        dependencies=READ,
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

    @app.delete(
        "/v1/users/{user_id}",
        dependencies=ADMIN,
        responses={
            202: {"description": "Deletion published; the shard had not applied it in time."},
            429: {
                "description": "This replica holds as much unacknowledged data as it may; "
                "nothing was published. Retry after the seconds in Retry-After."
            },
            503: {
                "description": "NATS is unreachable, or the stream did not acknowledge in "
                "time (the deletion is kept and resent). Retry after the seconds in Retry-After."
            },
        },
        summary="Forget a user: publish user_deleted and wait until its shard has applied it",
    )
    async def delete_user(
        self,
        user_id: Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH)],
        wait_s: Annotated[
            float, Query(ge=0, le=60, description="How long to wait for the confirmation.")
        ] = 10.0,
    ) -> Response:
        """``user_deleted`` is an event like any other: it goes through the stream, so the
        deletion holds after a shard restarts and replays. 200 once the owning shard no
        longer holds the user, 202 if that did not happen within ``wait_s``.
        """
        (before,) = await self.pool.profiles([user_id])
        producer = await self._sending()
        event = {
            "event_id": f"delete-{uuid.uuid4().hex}",
            "user_id": user_id,
            "type": "user_deleted",
            "ts": iso_ms(int(time.time() * 1000)),
            "source": "server",
        }
        checked = parse_events(orjson.dumps([event]), self.config.policy)
        await producer.publish_checked(checked)
        await producer.flush()
        deadline = time.monotonic() + wait_s
        while True:
            (profile,) = await self.pool.profiles([user_id])
            if profile is None:
                body = {"user_id": user_id, "deleted": True, "was_known": before is not None}
                return Response(orjson.dumps(body), media_type="application/json")
            if time.monotonic() >= deadline:
                body = {
                    "user_id": user_id,
                    "deleted": False,
                    "detail": "published, not yet applied",
                }
                return Response(orjson.dumps(body), status_code=202, media_type="application/json")
            await asyncio.sleep(0.05)

    async def _merged_insights(self) -> tuple[float, Insights]:
        """The cached merge of the shards' partials; starts the merge timer on first use."""
        if not self.config.insights:
            raise InsightsOff()
        if self._merge_task is None:
            self._merge_task = asyncio.create_task(self._merge_forever())
        if self._merged is None:
            try:
                await asyncio.wait_for(self._merged_ready.wait(), timeout=10)
            except asyncio.TimeoutError:
                raise UnavailableError("insights", "no shard partials merged yet") from None
        assert self._merged is not None
        return self._merged

    async def _merge_forever(self) -> None:
        """Merge every shard's partials into the cached snapshot, on a timer, never per request."""
        while True:
            try:
                partials = await self.pool.insights_partials()
                self._merged = (time.time(), merge_insights(partials))
                self._merged_ready.set()
                self.alerts.dispatch(self.alerts.evaluate(self._merged[1]), self._publish_alert)
            except Exception:  # a restarting shard: keep the last snapshot, try again
                log.warning("could not merge insights partials", exc_info=True)
            await asyncio.sleep(self.config.insights_merge_every_s)

    @app.get(
        "/v1/insights/engagement",
        dependencies=DASHBOARD_READ,
        response_model=EngagementAnswer,
        responses={422: {"description": "Bad granularity, time or range, with the reason."}},
        summary="Engagement per event-time bucket: active users, rates, dwell, top items",
    )
    async def engagement(
        self,
        granularity: GranularityParam = Granularity.HOUR,
        start: StartParam = None,
        end: EndParam = None,
        include_late: IncludeLateParam = False,
        top: Annotated[int, Query(ge=1, le=50, description="Top items/categories shown.")] = 10,
    ) -> Any:
        """Buckets starting in ``[start, end)`` from the last merged snapshot (see ``as_of``).

        Numbers may trail the stream by the merge interval (1 s by default).
        """
        problem = _range_problem(granularity, start, end, self.config.windows)
        if problem:
            return _error(422, problem)
        start_ms, end_ms = _epoch_ms(start), _epoch_ms(end)
        as_of, insights = await self._merged_insights()
        merged = insights.engagement
        answer = report(merged, granularity, start_ms, end_ms, include_late=include_late, top=top)
        return {
            **_window_header(granularity, start_ms, end_ms, as_of),
            "active_users_relative_error": ACTIVE_USERS_RELATIVE_ERROR,
            **answer,
            "lateness": self._lateness(merged, include_late),
        }

    def _lateness(self, merged: dict[str, Any], include_late: bool) -> dict[str, Any]:
        windows = self.config.windows
        return {
            "allowed_lateness_s": windows.allowed_lateness_ms / 1000,
            "policy": windows.policy.value,
            "late_dropped": merged["late_dropped"],
            "late_corrected": merged["late_corrected"],
            "include_late": include_late,
        }

    @app.get(
        "/v1/insights/conversion",
        dependencies=DASHBOARD_READ,
        response_model=ConversionAnswer,
        responses={422: {"description": "Bad granularity, time or range, with the reason."}},
        summary="Conversion funnel per event-time bucket: step counts, rates, revenue",
    )
    async def conversion(
        self,
        granularity: GranularityParam = Granularity.HOUR,
        start: StartParam = None,
        end: EndParam = None,
        include_late: IncludeLateParam = False,
    ) -> Any:
        """Funnel buckets starting in ``[start, end)`` from the last merged snapshot."""
        problem = _range_problem(granularity, start, end, self.config.windows)
        if problem:
            return _error(422, problem)
        start_ms, end_ms = _epoch_ms(start), _epoch_ms(end)
        as_of, insights = await self._merged_insights()
        answer = conversion_answer(insights, granularity, start_ms, end_ms, include_late)
        return {
            **_window_header(granularity, start_ms, end_ms, as_of),
            "funnel": insights.conversion["funnel"],
            "users_relative_error": PURCHASERS_RELATIVE_ERROR,
            **answer,
            "lateness": self._lateness(insights.engagement, include_late),
        }

    @app.get(
        "/v1/insights/retention",
        dependencies=DASHBOARD_READ,
        response_model=RetentionAnswer,
        responses={422: {"description": "Bad day, day range or rolling offset, with the reason."}},
        summary="Cohort retention curves and DAU/WAU/MAU (HyperLogLog estimates)",
    )
    async def retention(
        self,
        start_day: Annotated[
            date | None, Query(description="First cohort day, YYYY-MM-DD (UTC).")
        ] = None,
        end_day: Annotated[date | None, Query(description="Last cohort day, inclusive.")] = None,
        rolling: Annotated[
            int | None, Query(description="Also give rolling retention from this day on.")
        ] = None,
    ) -> Any:
        """Cohorts by first-seen day from the last merged snapshot (see ``as_of``)."""
        problem = retention_problem(start_day, end_day, rolling)
        if problem:
            return _error(422, problem)
        as_of, insights = await self._merged_insights()
        answer = retention_answer(insights, start_day, end_day, rolling)
        return {"as_of": iso_ms(int(as_of * 1000)), **answer}

    @app.get(
        "/v1/insights/trends",
        dependencies=DASHBOARD_READ,
        response_model=TrendsAnswer,
        responses={422: {"description": "Bad n, with the reason."}},
        summary="Trending and emerging items and categories, and an events-per-minute forecast",
    )
    async def trends(
        self, n: Annotated[int, Query(ge=1, le=100, description="Entries per list.")] = 10
    ) -> Any:
        """Decayed trends and a 15-minute forecast from the last merged snapshot."""
        as_of, insights = await self._merged_insights()
        return {"as_of": iso_ms(int(as_of * 1000)), **trends_answer(insights, n)}

    @app.get(
        "/v1/insights/segments",
        dependencies=READ,
        response_model=SegmentsAnswer,
        summary="Rule-based segments: live sizes, entries and exits",
    )
    async def segments(self) -> Any:
        """Segment counters from the last merged snapshot: shards keep them, nothing scans users."""
        as_of, insights = await self._merged_insights()
        return {"as_of": iso_ms(int(as_of * 1000)), **segments_report(insights)}

    async def _publish_alert(self, subject: str, body: bytes) -> None:
        """Core-publish one alert on the replica's NATS connection."""
        await self._connected()
        assert self._nc is not None
        await self._nc.publish(subject, body)

    @app.get(
        "/v1/insights/alerts",
        dependencies=DASHBOARD_READ,
        summary="Recent alerts (metric outside its expected band), the rules, webhook counts",
    )
    async def alerts_list(
        self, limit: Annotated[int, Query(ge=1, le=1000, description="Alerts shown.")] = 50
    ) -> dict[str, Any]:
        """Newest first; alerts are raised on closed minute buckets by the merge timer."""
        await self._merged_insights()  # starts the merge timer that evaluates the rules
        return self.alerts.answer(limit)

    @app.get("/v1/models", dependencies=READ, summary="Model versions served and in the registry")
    async def models(self) -> dict[str, Any]:
        """What each model deployment serves (one replica's view) and the registry's versions."""
        out: dict[str, Any] = {}
        registry = ModelRegistry(PathLib(self.config.registry)) if self.config.registry else None
        for kind in (CHURN, PERSONALIZATION):
            handle = self._model_handle(kind)
            served = await handle.model_version.remote() if handle is not None else None
            out[kind] = {
                "served": served,
                "current": registry.current(kind) if registry else None,
                "versions": registry.versions(kind) if registry else [],
            }
        return out

    @app.post(
        "/v1/models/{kind}/promote",
        dependencies=ADMIN,
        responses={404: {"description": "No such kind or version."}},
        summary="Make a registered version current; replicas switch within seconds",
    )
    async def promote(self, kind: str, body: PromoteRequest) -> Any:
        """Point CURRENT at ``version``; replicas following "current" load it without downtime."""
        if kind not in (CHURN, PERSONALIZATION):
            return _error(404, f"unknown model kind {kind!r}; use {CHURN!r} or {PERSONALIZATION!r}")
        if self.config.registry is None:
            raise ModelsOff()
        registry = ModelRegistry(PathLib(self.config.registry))
        try:
            registry.promote(kind, body.version)
        except ArtifactError as exc:
            return _error(404, str(exc))
        return {"kind": kind, "current": body.version}

    @app.get(
        "/v1/status",
        dependencies=DASHBOARD_READ,
        summary="Shard counters, lag per partition, dead letters",
    )
    async def status(self, request: Request) -> dict[str, Any]:
        """What ``audience status`` prints."""
        shards = await self.pool.status()
        await self._connected()
        assert self._nc is not None
        dead = await dead_letter_counts(self._nc.jetstream(), self.config.streams)
        retention = await self._retention_warnings(shards)
        lag = {p: n for s in shards for p, n in s.get("lag", {}).items()}
        producer = self._producer
        models = {}
        for kind in (CHURN, PERSONALIZATION):
            handle = self._model_handle(kind)
            if handle is not None:
                models[kind] = await handle.model_version.remote()
        # The worst of this replica's and the model replicas' (their own HTTP apps).
        latencies = [self.api_latency.percentiles()]
        latencies += [m.pop("api_latency_ms", None) for m in models.values()]
        return {
            "models": models,
            "ingest": {
                "accepted": producer.published_events if producer else 0,
                "rejected": dict(producer.rejected) if producer else {},
            },
            "shards": shards,
            "lag": dict(sorted(lag.items(), key=lambda kv: int(kv[0]))),
            "dead_letters": dead,
            "recovering": [s["shard"] for s in shards if s.get("recovering")],
            "autoscaling": await self._autoscaling(),
            "retention_warnings": retention,
            "api_latency_ms": _worst(latencies),
            "insights_lag_ms": _worst(s.get("insights_lag_ms") for s in shards),
            "inbound_webhooks": self.inbound.answer(),
        }

    async def _autoscaling(self) -> dict[str, Any] | None:
        """The shard autoscaler's recent decisions, if a controller runs (found by name)."""
        try:
            controller = ray.get_actor(AUTOSCALER_NAME, namespace=NAMESPACE)
            answer: dict[str, Any] = await controller.decisions.remote()
        except (ValueError, RayActorError):  # none started (a bare API): nothing to show
            return None
        return answer

    async def _retention_warnings(self, shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Partitions whose restore point nears the stream's retention edge (cached a while:
        each check reads one message per partition)."""
        cached_at, cached = self._retention_cache
        if time.monotonic() - cached_at < RETENTION_CHECK_S:
            return cached
        needed: dict[int, int] = {}
        for shard in shards:
            if "partitions" not in shard:
                return cached  # a shard is restarting: keep the last answer
            saved = (shard.get("checkpoint") or {}).get("positions") or (
                shard.get("recovery", {}).get("restored_positions") or {}
            )
            for partition in shard["partitions"]:
                needed[int(partition)] = int(saved.get(partition, saved.get(str(partition), 0)))
        assert self._nc is not None
        found = await retention_warnings(self._nc.jetstream(), self.config.streams.events, needed)
        self._retention_cache = (time.monotonic(), [w.as_dict() for w in found])
        return self._retention_cache[1]

    @app.post(
        "/v1/checkpoints",
        dependencies=ADMIN,
        responses={503: {"description": "A shard is recovering or cannot snapshot now."}},
        summary="Snapshot every shard now (besides the timer); what each one stored",
    )
    async def checkpoint(self) -> dict[str, Any]:
        """Each shard's snapshot: name, positions, bytes and how long it took."""
        return {"checkpoints": await self.pool.checkpoint()}

    @app.post(
        "/v1/shards",
        dependencies=ADMIN,
        responses={
            400: {"description": "More shards than partitions, or another rescale ran."},
            503: {"description": "A shard is recovering or NATS is away; nothing moved."},
        },
        summary="Change the shard count live: partitions are handed over, the stream flows on",
    )
    async def rescale(self, body: RescaleRequest) -> dict[str, Any]:
        """What moved and each step's time (see ``ShardPool.rescale``)."""
        return await self.pool.rescale(body.shards)

    @app.post(
        "/v1/webhooks/{source}",
        status_code=202,
        response_model=WebhookResult,
        responses={
            401: {"description": "The signature or its timestamp is missing or wrong."},
            404: {"description": "No webhook source of that name is configured."},
            409: {
                "description": "Signed correctly, but sent outside the source's time window "
                "(reason stale_timestamp) or already received (reason replayed)."
            },
            413: {"description": "Body or item count too large."},
            422: {
                "model": WebhookResult,
                "description": "No items where the source's mapping says (the body is "
                "dead-lettered).",
            },
            429: {"description": "This replica's producer is full; retry after Retry-After."},
            503: {"description": "NATS is unreachable or did not acknowledge; retry later."},
        },
        summary="Receive a vendor's signed webhook delivery; its items become events",
    )
    async def webhook(
        self, source: Annotated[str, Path(max_length=64)], request: Request
    ) -> Response:
        """No API key: the source's HMAC signature authenticates the delivery
        (:mod:`serving.inbound_webhooks`). 202 once the mapped events are durably
        in the stream, with items that could not be mapped or validated
        dead-lettered and listed; the shards do the rest.
        """
        self.inbound.source(source)  # 404 before the body is read
        body = await request.body()  # bounded by BodyLimit
        delivery = self.inbound.verify(source, request.headers, body)
        producer = await self._sending()
        producer.check_room()
        with self.inbound.claimed(delivery):  # a failed publish leaves it unclaimed
            received = self.inbound.check(
                delivery, self.config.policy, self.config.max_events_per_request
            )
            await producer.publish_checked(received.checked)
            await producer.flush()
        result = WebhookResult(
            source=source,
            items=received.items,
            accepted=len(received.checked.batch),
            skipped=received.skipped,
            rejected=[
                RejectedEvent(index=r.index, reason=r.reason.value, detail=r.detail)
                for r in received.checked.rejected
            ],
        )
        return JSONResponse(result.model_dump(), status_code=202 if received.usable else 422)

    @app.get("/healthz", summary="Liveness probe")
    async def healthz(self) -> dict[str, str]:
        """Always open, cheap: the replica is up and serving."""
        return {"status": "ok"}

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard_page(self) -> HTMLResponse:
        """The live dashboard (it polls this API; Plotly is served from the package)."""
        return HTMLResponse(dashboard.page())

    @app.get("/dashboard/dashboard.js", include_in_schema=False)
    async def dashboard_script(self) -> Response:
        """The dashboard's script."""
        return Response(dashboard.script(), media_type="text/javascript")

    @app.get("/dashboard/plotly.min.js", include_in_schema=False)
    async def plotly_script(self) -> Response:
        """Plotly's browser bundle, from the installed plotly package: no CDN."""
        return Response(
            dashboard.plotly_js(),
            media_type="text/javascript",
            headers={"Cache-Control": "public, max-age=86400"},
        )


@dataclass(frozen=True)
class ServeApp:
    """One Serve application: what ``serve.run`` (or a Serve config entry) needs."""

    name: str
    route_prefix: str
    app: serve.Application


def build_apps(
    config: GatewayConfig,
    models: ModelsConfig | None = None,
    replicas: ReplicaScaling | None = None,
    access_logs: bool = True,
) -> list[ServeApp]:
    """The Serve applications: each model's own (if served), then the gateway at ``/``.

    Serve sends a request to the application with the longest matching route
    prefix, so ``/v1/churn`` and ``/v1/personalize`` reach the model replicas
    without crossing a gateway replica. ``replicas`` sizes every deployment;
    without it, Serve's defaults (one replica each) hold, and a Serve config file
    (KubeRay's ``serveConfigV2``) may size them. ``access_logs``: a log line per
    request from every replica.
    """
    options = replicas.options() if replicas is not None else {}
    options["logging_config"] = {"enable_access_log": access_logs}
    apps = [ServeApp(GATEWAY_APP, "/", ApiGateway.options(**options).bind(config))]  # type: ignore[attr-defined]
    if models is not None:
        apps[:0] = [
            ServeApp(CHURN_APP, CHURN_PREFIX, ChurnScorer.options(**options).bind(models)),  # type: ignore[attr-defined]
            ServeApp(
                PERSONALIZE_APP,
                PERSONALIZE_PREFIX,
                Personalizer.options(**options).bind(models),  # type: ignore[attr-defined]
            ),
        ]
    return apps
