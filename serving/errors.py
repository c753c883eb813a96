"""Exceptions to HTTP answers, in one place: clear 4xx/503, never a bare 500 for bad input."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError

from actors.errors import AudienceError, BackpressureError, ShardRecovering, UnavailableError

log = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI) -> None:
    """Register the project's exception -> status code mapping on ``app``."""

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

    @app.exception_handler(AudienceError)
    async def _bad_request(request: Request, exc: AudienceError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)
