"""The Serve application builders a KubeRay ``RayService`` deploys: ``cluster.k8s:app`` (the
API gateway, at ``/``), ``cluster.k8s:churn_app`` and ``cluster.k8s:personalize_app`` (each
model deployment as the ingress of its own application, at ``/v1/churn`` and
``/v1/personalize``; the config must use the names in :data:`serving.models.MODEL_APPS`).

On Kubernetes nobody runs ``audience up``. The RayService controller hands
``serveConfigV2`` to Ray Serve, and Serve calls :func:`app` in a short-lived
task on the cluster (a worker that exits after one call, retried on failure,
and run again whenever the application's config changes). So the builder:

* reads :class:`~cluster.settings.Settings` from the environment (the pods'
  ConfigMap and Secret, and the application's ``runtime_env``), with the
  config's ``args`` on top;
* makes sure the streams exist (``prepare_streams``, idempotent);
* creates the shard pool as *detached* named actors, or attaches to the one an
  earlier build created: the shards outlive the build task, and Ray restarts
  them on any node; the autoscaling controller likewise;
* returns the same applications ``audience up`` runs; only :func:`app` starts the
  backend (the model builders only build).

The Serve config decides where the API listens (``http_options``) and how many
replicas each deployment runs (``autoscaling_config``, over the code's default of
one): the local-only settings in :data:`LOCAL_ONLY` are ignored here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from ray import serve

from actors.errors import AudienceError
from cluster.launcher import pool_spec_of, prepare_streams_of, serve_apps_of, start_shards
from cluster.settings import Settings
from serving.app import GATEWAY_APP
from serving.models import CHURN_APP, PERSONALIZE_APP

log = logging.getLogger(__name__)

# Settings that only a local `audience up` uses: on a cluster the Serve config
# (http_options, each deployment's autoscaling_config) and the pods decide these.
LOCAL_ONLY = frozenset(
    {
        "nats_port",
        "num_cpus",
        "metrics_port",
        "http_host",
        "http_port",
        "serve_min_replicas",
        "serve_max_replicas",
        "serve_target_ongoing_requests",
        "serve_fast_path",  # the pods' environment (rayservice.yaml) sets it on a cluster
    }
)


def settings_from(args: Mapping[str, Any]) -> Settings:
    """Settings from the environment, with the Serve config's ``args`` (field names) on top.

    Raises:
        AudienceError: the settings ask for what a cluster does not have: an
            embedded nats-server, or a model registry that is not a shared folder.
        pydantic.ValidationError: a setting is invalid (the message names it).
    """
    settings = Settings(**args)
    if settings.embedded_nats:
        raise AudienceError(
            "AUDIENCE_NATS_URL must name the JetStream cluster (e.g. nats://nats:4222): "
            "a Ray cluster runs no embedded nats-server"
        )
    if settings.serve_models and settings.registry_dir is None:
        raise AudienceError(
            "set AUDIENCE_REGISTRY_DIR to a folder every Ray pod mounts (a ReadWriteMany "
            "volume), or AUDIENCE_SERVE_MODELS=false: each pod has its own data folder"
        )
    ignored = sorted(LOCAL_ONLY & settings.model_fields_set)
    if ignored:
        log.warning("ignored on a Ray cluster (Serve's config decides): %s", ", ".join(ignored))
    return settings


def application(settings: Settings, name: str = GATEWAY_APP) -> serve.Application:
    """The Serve application ``name`` for ``settings``; starts nothing (no Ray, no NATS needed).

    Replica counts come from the Serve config (``serveConfigV2``), not from settings.

    Raises:
        AudienceError: no such application (a model one while models are not served).
    """
    apps = {
        a.name: a.app for a in serve_apps_of(settings, pool_spec_of(settings, settings.nats_url))
    }
    if name not in apps:
        raise AudienceError(
            f"no Serve application {name!r} with these settings (AUDIENCE_SERVE_MODELS="
            f"{str(settings.serve_models).lower()}); there are: {', '.join(apps)}"
        )
    return apps[name]


def start_backend(settings: Settings) -> None:
    """Streams, the detached shard pool and the autoscaling controller; each kept if it exists.

    Raises:
        UnavailableError: NATS did not answer.
    """
    asyncio.run(prepare_streams_of(settings, settings.nats_url))
    pool, _ = start_shards(settings, pool_spec_of(settings, settings.nats_url), detached=True)
    log.info("shard pool: %d shards over %d partitions", len(pool.handles), settings.partitions)


def app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder (``import_path: cluster.k8s:app``).

    Args:
        args: the application's ``args`` from the Serve config: settings by
            field name (``{"shards": 4}``), over the environment's ``AUDIENCE_*``.
    """
    settings = settings_from(args)
    start_backend(settings)
    return application(settings)


def churn_app(args: dict[str, Any]) -> serve.Application:
    """Serve's builder of the churn model's application (``import_path: cluster.k8s:churn_app``)."""
    return application(settings_from(args), CHURN_APP)


def personalize_app(args: dict[str, Any]) -> serve.Application:
    """Serve's builder of the personalization model's application (its own, at /v1/personalize)."""
    return application(settings_from(args), PERSONALIZE_APP)
