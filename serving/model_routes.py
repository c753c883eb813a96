"""The model routes, ``/v1/churn`` and ``/v1/personalize``: one definition, two hosts.

Each model deployment is the HTTP ingress of its own Serve application (route
prefixes ``/v1/churn`` and ``/v1/personalize``; Serve sends a request to the longest
prefix that matches), so a scoring request crosses no gateway replica. The gateway
includes the same routes, which document them in its OpenAPI schema and answer 503
when the platform serves no models. The routes call the replica they run in
(:class:`ModelAnswers`); keys, scopes, limits and error answers come from
:func:`serving.access.api_app`, as for every other route.
"""

from typing import Annotated, Any, Protocol, cast

import orjson
from fastapi import APIRouter, FastAPI, Path, Query
from fastapi.responses import JSONResponse, Response

from actors.events import MAX_ID_LENGTH
from serving.access import READ, api_app, serving_replica
from serving.schemas import (
    ChurnAnswer,
    ChurnBatchRequest,
    PersonalizeAnswer,
    PersonalizeBatchRequest,
    RankAnswer,
    RankRequest,
)

CHURN_PREFIX = "/v1/churn"
PERSONALIZE_PREFIX = "/v1/personalize"
UserId = Annotated[str, Path(max_length=MAX_ID_LENGTH)]


class ModelAnswers(Protocol):
    """What the replica behind the model routes answers (the gateway: "no models")."""

    async def churn_answers(self, user_ids: list[str]) -> list[dict[str, Any]]:
        """One churn answer per user, in order (``{"error": ...}`` for none)."""
        ...

    async def top_items(self, user_ids: list[str], k: int) -> list[dict[str, Any]]:
        """Top-``k`` items per user, in order."""
        ...

    async def ranked_items(self, user_id: str, items: list[str]) -> dict[str, Any]:
        """``items`` ordered by the model's score for ``user_id``."""
        ...


def _models() -> ModelAnswers:
    return cast(ModelAnswers, serving_replica())


def _json(document: Any) -> Response:
    """``document`` as JSON (orjson: answers carry many floats)."""
    return Response(orjson.dumps(document), media_type="application/json")


def model_answer(answer: dict[str, Any]) -> Response:
    """A model's answer as HTTP: the result, 404 for unknown users, 503 for no model."""
    error = answer.get("error")
    if error == "unknown_user":
        return JSONResponse({"detail": answer["detail"]}, status_code=404)
    if error is not None:
        return JSONResponse(
            {"detail": answer.get("detail")}, status_code=503, headers={"Retry-After": "5"}
        )
    return _json(answer)


churn_routes = APIRouter()
personalize_routes = APIRouter()


@churn_routes.get(
    CHURN_PREFIX + "/{user_id}",
    dependencies=READ,
    response_model=ChurnAnswer,
    responses={
        404: {"description": "No event of this user has been applied."},
        503: {"description": "No churn model is loaded yet; retry after the given seconds."},
    },
    summary="How likely this user is to leave, and why",
)
async def churn_one(user_id: UserId) -> Response:
    """Calibrated churn probability on the user's live features, with the top reasons."""
    (answer,) = await _models().churn_answers([user_id])
    return model_answer(answer)


@churn_routes.post(
    CHURN_PREFIX, dependencies=READ, summary="Churn scores for many users (unknown ones say so)"
)
async def churn_many(body: ChurnBatchRequest) -> Any:
    """One result per user id, in order; an unknown user gets ``{"error": "unknown_user"}``."""
    answers = await _models().churn_answers(list(body.user_ids))
    unavailable = next((a for a in answers if a.get("error") == "unavailable"), None)
    if unavailable is not None:
        return model_answer(unavailable)
    return _json({"results": answers})


@personalize_routes.get(
    PERSONALIZE_PREFIX + "/{user_id}",
    dependencies=READ,
    response_model=PersonalizeAnswer,
    summary="What this user should see next, with reasons",
)
async def personalize_one(
    user_id: UserId,
    k: Annotated[int, Query(ge=1, le=100, description="Items to return.")] = 10,
) -> Response:
    """Top-k items the user has not touched; unknown users get popular items (cold start)."""
    (answer,) = await _models().top_items([user_id], k)
    return model_answer(answer)


@personalize_routes.post(
    PERSONALIZE_PREFIX, dependencies=READ, summary="Top-k items for many users"
)
async def personalize_many(body: PersonalizeBatchRequest) -> Any:
    """One answer per user id, in order (see the single-user endpoint)."""
    return _json({"results": await _models().top_items(list(body.user_ids), body.k)})


@personalize_routes.post(
    PERSONALIZE_PREFIX + "/{user_id}/rank",
    dependencies=READ,
    response_model=RankAnswer,
    summary="Re-rank the given items for this user, with scores",
)
async def personalize_rank(user_id: UserId, body: RankRequest) -> Response:
    """The items, best first, each with the model's score (items unknown to the shards too)."""
    return model_answer(await _models().ranked_items(user_id, list(body.items)))


def model_app(routes: APIRouter) -> FastAPI:
    """The Serve ingress app of one model deployment: its routes, no docs (the gateway has them)."""
    app = api_app(mounted_under_prefix=True, docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(routes)
    return app


churn_api = model_app(churn_routes)
personalize_api = model_app(personalize_routes)
