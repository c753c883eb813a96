"""The serving benchmark's floor for Ray Serve: a deployment that does nothing.

A FastAPI ingress on one replica with the model deployments' resources
(``num_cpus`` 0.25), answering ``GET /trivial/{u}`` with a small JSON: no key
check, no shard calls, no model. Measured like the model endpoints, its latency
is what Serve's proxy and one replica hop cost on this machine, whatever the
platform does; ``/v1/personalize`` is judged against it (``p50 <= 2x``).

It is deployed by :mod:`tests.bench.serving` into the platform's running Ray and
Serve (same proxy, same HTTP options), beside the platform's applications.
"""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve

APP_NAME = "bench-trivial"
ROUTE_PREFIX = "/trivial"

app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress(app)
class Trivial:
    """Answers every user at once with the same small JSON."""

    @app.get("/{u}")
    async def one(self, u: str) -> dict[str, str | bool]:
        return {"user_id": u, "ok": True}


def deploy() -> None:
    """Run the application on the Serve instance the process is connected to (returns once
    its replica is up; Serve's proxy may take a moment more to route to it)."""
    serve.run(Trivial.bind(), name=APP_NAME, route_prefix=ROUTE_PREFIX, blocking=False)  # type: ignore[attr-defined]
