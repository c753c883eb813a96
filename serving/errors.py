"""Exceptions to HTTP answers, in one place: clear 4xx/503, never a bare 500 for bad input."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError

from actors.errors import AudienceError, BackpressureError, ShardRecovering, UnavailableError
from serving.guard import AccessError, Forbidden, RateLimited, Unauthenticated
from serving.inbound_webhooks import (
    DeliveryTooLarge,
    ReplayRefused,
    SignatureRefused,
    UnknownSource,
    WebhookRefused,
)
from serving.limits import retry_after

log = logging.getLogger(__name__)


class InsightsOff(AudienceError):
    """The platform runs in profile-only mode: no insight aggregates to answer from."""

    def __init__(self) -> None:
        super().__init__(
            "insights are off (profile-only mode, AUDIENCE_INSIGHTS=false): the shards keep "
            "per-user state and features only"
        )


class ModelsOff(AudienceError):
    """This platform serves no models (``AUDIENCE_SERVE_MODELS=false``)."""

    def __init__(self) -> None:
        super().__init__("model serving is not enabled on this platform")


def access_refusal(exc: AccessError) -> JSONResponse:
    """The answer to a refused caller: 401 (no or bad key), 403 (scope), 429 (rate)."""
    body = {"detail": exc.detail, "reason": exc.reason}
    if isinstance(exc, Unauthenticated):
        return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
    if isinstance(exc, RateLimited):
        headers = {"Retry-After": retry_after(exc.retry_after_s)}
        return JSONResponse(body, status_code=429, headers=headers)
    status = 403 if isinstance(exc, Forbidden) else 400
    return JSONResponse(body, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    """Register the project's exception -> status code mapping on ``app``."""

    @app.exception_handler(InsightsOff)
    async def _insights_off(request: Request, exc: InsightsOff) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "reason": "insights_off"}, status_code=404)

    @app.exception_handler(UnavailableError)
    async def _unavailable(request: Request, exc: UnavailableError) -> JSONResponse:
        # From attributes, not str(): raised in another actor, the exception
        # arrives wrapped by Ray, whose str() carries the remote traceback.
        body: dict[str, object] = {"detail": f"{exc.what} unavailable: {exc.detail}"}
        if isinstance(exc, ShardRecovering):
            body.update(status="recovering", shard=exc.shard)
        return JSONResponse(
            body,
            status_code=503,
            headers={"Retry-After": str(max(1, round(exc.retry_after_s)))},
        )

    @app.exception_handler(BackpressureError)
    async def _backpressure(request: Request, exc: BackpressureError) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc)},
            status_code=429,
            headers={"Retry-After": str(max(1, round(exc.retry_after_s)))},
        )

    @app.exception_handler(RayActorError)
    async def _shard_down(request: Request, exc: RayActorError) -> JSONResponse:
        log.warning("shard unavailable: %s", exc)
        return JSONResponse(
            {"detail": "a shard is restarting; retry shortly"},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(AccessError)
    async def _refused(request: Request, exc: AccessError) -> JSONResponse:
        return access_refusal(exc)

    @app.exception_handler(ModelsOff)
    async def _models_off(request: Request, exc: ModelsOff) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "30"})

    @app.exception_handler(WebhookRefused)
    async def _webhook_refused(request: Request, exc: WebhookRefused) -> JSONResponse:
        status = 400
        for kind, code in _WEBHOOK_STATUS.items():
            if isinstance(exc, kind):
                status = code
                break
        return JSONResponse({"detail": exc.detail, "reason": exc.reason}, status_code=status)

    @app.exception_handler(AudienceError)
    async def _bad_request(request: Request, exc: AudienceError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)


_WEBHOOK_STATUS: dict[type[WebhookRefused], int] = {
    UnknownSource: 404,
    SignatureRefused: 401,
    ReplayRefused: 409,
    DeliveryTooLarge: 413,
}
