"""The HTTP plumbing every API app shares: keys checked before any body is read, body limits,
timing and error answers.

Routes declare the scope they need with :func:`require`, a FastAPI dependency, so
OpenAPI documents the key schemes and tests can list who needs what. FastAPI reads
and parses a body before it solves dependencies, so :class:`KeyCheck`, a pure ASGI
middleware, does the check first: it finds the :class:`RequireScope` of the route a
request matches and asks the replica's :class:`~serving.guard.Guard`; the dependency
then only hands over the admitted key. The gateway and each model's own Serve
application are made by :func:`api_app`, so keys, scopes, limits and error answers
are the same on every route, whichever replica answers it.
"""

import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, cast

from fastapi import Depends, FastAPI, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.latency import LatencyRing
from serving.auth import KeyRecord
from serving.auth import Scope as KeyScope
from serving.errors import access_refusal, install_error_handlers
from serving.guard import AccessError, Guard, Unauthenticated
from serving.limits import BodyLimit

ADMITTED = "audience.key"  # request state: the key record KeyCheck admitted


class ServingReplica(Protocol):
    """What the shared plumbing needs of the replica object behind an app."""

    guard: Guard
    api_latency: LatencyRing

    def body_limit(self, path: str) -> int:
        """Most bytes a request body to ``path`` may have."""
        ...


def serving_replica() -> ServingReplica:
    """This replica's deployment instance (dependencies and middleware cannot take ``self``).

    Not a module global: Serve pickles an ingress class by value, so a global read
    there would be a copy of the one this module sees.
    """
    return cast(ServingReplica, serve.get_replica_context().servable_object)


_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer aud_...`")
_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")


def _one_key(keys: Iterable[str | None]) -> str | None:
    sent = {k for k in keys if k}
    if len(sent) > 1:
        raise Unauthenticated("ambiguous_key", "two different API keys sent; send one")
    return sent.pop() if sent else None


class RequireScope:
    """The dependency :func:`require` makes; keeps its scope, so tests can list who needs what."""

    def __init__(self, scope: KeyScope, dashboard: bool = False) -> None:
        self.scope = scope
        self.dashboard = dashboard

    async def __call__(
        self,
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
        header: Annotated[str | None, Security(_key_header)],
    ) -> KeyRecord | None:
        state = request.scope.get("state") or {}
        if ADMITTED in state:  # KeyCheck did it before the body was read
            record: KeyRecord | None = state[ADMITTED]
            return record
        key = _one_key((header, bearer.credentials if bearer is not None else None))
        return serving_replica().guard.admit(key, self.scope, public=self.dashboard)


def require(scope: KeyScope, *, dashboard: bool = False) -> Any:
    """A route dependency: the caller's key must grant ``scope`` (admin grants all).

    Use as ``@app.post(..., dependencies=[require(Scope.INGEST)])`` (or the
    lists below); the key comes from ``Authorization: Bearer`` or ``X-API-Key``.
    ``dashboard`` marks the data calls of the dashboard, open when the
    dashboard is public. Refusals are 401 (no or bad key), 403 (scope) and 429
    (rate), in :mod:`serving.errors`.
    """
    return Depends(RequireScope(scope, dashboard))


INGEST = [require(KeyScope.INGEST)]
READ = [require(KeyScope.READ)]
DASHBOARD_READ = [require(KeyScope.READ, dashboard=True)]
ADMIN = [require(KeyScope.ADMIN)]


def api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    """Every :class:`APIRoute` of an app, also inside included routers, in matching order."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        inner = getattr(route, "original_router", None) or getattr(route, "router", None)
        if inner is not None:
            yield from api_routes(inner.routes)


@dataclass(frozen=True)
class _Guarded:
    methods: frozenset[str]
    path: re.Pattern[str]
    check: RequireScope | None


def _guarded(route: APIRoute) -> _Guarded:
    methods = set(route.methods or ())
    if "GET" in methods:
        methods.add("HEAD")
    checks = (d.call for d in route.dependant.dependencies if isinstance(d.call, RequireScope))
    return _Guarded(frozenset(methods), route.path_regex, next(checks, None))


def _presented_key(scope: Scope) -> str | None:
    """The key in ``Authorization: Bearer`` or ``X-API-Key``, as the dependency reads them."""
    bearer = header = None
    for name, value in scope.get("headers") or ():
        if name == b"x-api-key":
            header = value.decode("latin-1")
        elif name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials:
                bearer = credentials
    return _one_key((header, bearer))


class KeyCheck:
    """ASGI middleware: the route's key check before the route (and FastAPI) reads the body.

    Args:
        app: the wrapped ASGI app.
        routes: the FastAPI app's routes (read at the first request, when all are added).
    """

    def __init__(self, app: ASGIApp, routes: list[Any]) -> None:
        self.app = app
        self.routes = routes
        self._table: list[_Guarded] | None = None

    def _check_of(self, method: str, path: str) -> RequireScope | None:
        if self._table is None:
            self._table = [_guarded(route) for route in api_routes(self.routes)]
        for guarded in self._table:
            if method in guarded.methods and guarded.path.match(path):
                return guarded.check
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        check = self._check_of(scope["method"], scope["path"])
        if check is not None:
            try:
                key = _presented_key(scope)
                record = serving_replica().guard.admit(key, check.scope, public=check.dashboard)
            except AccessError as exc:
                await access_refusal(exc)(scope, receive, send)
                return
            scope.setdefault("state", {})[ADMITTED] = record
        await self.app(scope, receive, send)


class Timed:
    """ASGI middleware: each response's latency into the replica's ring (``/v1/status``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                serving_replica().api_latency.add((time.perf_counter() - started) * 1000)

        await self.app(scope, receive, timed)


class FullPath:
    """ASGI middleware: route on the whole path, for an app Serve mounts under a prefix.

    Serve passes the route prefix as ``root_path`` and Starlette then matches the
    rest; the model apps' routes keep their whole paths (``/v1/churn/{user_id}``)
    so that the same routes serve in the gateway (at ``/``) and in their own app.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("root_path"):
            scope = {**scope, "root_path": ""}
        await self.app(scope, receive, send)


def api_app(*, mounted_under_prefix: bool = False, **kw: Any) -> FastAPI:
    """A FastAPI app with the shared plumbing: error answers, timing, body limits, key checks.

    Middleware runs outermost first: the key check, then the body limit (the replica's
    :meth:`ServingReplica.body_limit`), then the timer. ``mounted_under_prefix``: the
    app is a Serve application with a route prefix (:class:`FullPath`).
    """
    app = FastAPI(**kw)
    install_error_handlers(app)

    def limit_for(scope: dict[str, Any]) -> int:
        return serving_replica().body_limit(scope.get("path", ""))

    app.add_middleware(Timed)
    app.add_middleware(BodyLimit, limit_for=limit_for)
    app.add_middleware(KeyCheck, routes=app.router.routes)
    if mounted_under_prefix:
        app.add_middleware(FullPath)
    return app
