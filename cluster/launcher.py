"""Bring the whole platform up on one machine, or attach it to existing NATS and Ray.

``Platform.start`` is ``audience up``: NATS (embedded or by URL), the streams, a
Ray instance, the shard pool and the Serve application, in that order;
``Platform.stop`` takes them down in reverse, so nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import nats
import ray
from ray import serve
from ray.actor import ActorHandle

from actors.checkpoint_store import CheckpointConfig, ObjectStoreCheckpoints
from actors.conversion import FunnelSpec
from actors.errors import AudienceError, UnavailableError
from actors.jetstream import StreamNames, ensure_streams, server_list
from actors.pool import NAMESPACE, PoolSpec, ShardPool
from actors.validation import ValidationPolicy
from actors.windows import WindowConfig
from cluster.autoscaling import ScalingPolicy
from cluster.nats_server import EmbeddedNats, free_port
from cluster.scaling_controller import ScalingController
from cluster.settings import Settings
from serving.alerts import AlertsConfig
from serving.app import AUTOSCALER_NAME, GatewayConfig, build_app
from serving.models import ModelsConfig
from serving.replicas import ReplicaScaling

log = logging.getLogger(__name__)

APP_NAME = "audience"
TRAINING_HEADROOM_CPUS = 2  # logical CPUs beyond the cores, for Ray Data training tasks


@dataclass(frozen=True)
class RuntimeInfo:
    """Where a running platform can be reached; written to the data folder for other commands."""

    nats_url: str
    http_url: str
    pid: int
    partitions: int
    shards: int
    metrics_url: str | None = None

    @staticmethod
    def path(data_dir: Path) -> Path:
        """The file a running ``audience up`` describes itself in."""
        return data_dir / "runtime.json"

    @classmethod
    def load(cls, data_dir: Path) -> RuntimeInfo | None:
        """The running platform's info, or None when none is running."""
        try:
            return cls(**json.loads(cls.path(data_dir).read_text()))
        except (OSError, ValueError, TypeError):
            return None


def find_nats(settings: Settings, nats_url: str | None = None) -> tuple[str, int]:
    """NATS URL and partition count: given, from the settings, or from the running ``up``.

    Raises:
        AudienceError: nothing given, embedded NATS, and no running platform found.
    """
    nats_url = nats_url or (None if settings.embedded_nats else settings.nats_url)
    if nats_url is not None:
        return nats_url, settings.partitions
    info = RuntimeInfo.load(settings.data_dir)
    if info is None:
        raise AudienceError("no running `audience up` found; start one or pass --nats-url")
    return info.nats_url, info.partitions


def streams_of(settings: Settings) -> StreamNames:
    """Stream names from settings."""
    return StreamNames(events=settings.stream, dlq=settings.dlq_stream)


def policy_of(settings: Settings) -> ValidationPolicy:
    """Validation limits from settings."""
    return ValidationPolicy(max_future_ms=int(settings.max_future_s * 1000))


def windows_of(settings: Settings) -> WindowConfig:
    """Event-time window settings (lateness and its policy) as plain values."""
    return WindowConfig(
        allowed_lateness_ms=int(settings.allowed_lateness_s * 1000), policy=settings.late_policy
    )


def alerts_of(settings: Settings) -> AlertsConfig:
    """Webhook targets and secret as plain values (the secret stays out of reprs)."""
    return AlertsConfig(
        webhook_urls=settings.webhook_targets,
        webhook_secret=settings.webhook_secret.get_secret_value(),
    )


def checkpoints_of(settings: Settings) -> CheckpointConfig:
    """Where and how often shards snapshot, as plain values."""
    folder = settings.checkpoint_folder
    return CheckpointConfig(
        bucket=settings.checkpoint_bucket,
        folder=str(folder.resolve()) if folder else None,
        interval_s=settings.checkpoint_interval_s,
        keep=settings.checkpoints_kept,
        replicas=settings.stream_replicas,
    )


def scaling_policy_of(settings: Settings) -> ScalingPolicy:
    """The shard autoscaling policy's bounds and target, as plain values."""
    return ScalingPolicy(
        min_shards=settings.autoscale_min_shards,
        max_shards=min(settings.autoscale_max_shards, settings.partitions),
        target_utilisation=settings.autoscale_target_utilisation,
    )


def replicas_of(settings: Settings) -> ReplicaScaling:
    """Replica bounds of the Serve deployments, as plain values."""
    return ReplicaScaling(
        min_replicas=settings.serve_min_replicas,
        max_replicas=settings.serve_max_replicas,
        target_ongoing_requests=settings.serve_target_ongoing_requests,
    )


def serve_app_of(
    settings: Settings, spec: PoolSpec, replicas: ReplicaScaling | None = None
) -> serve.Application:
    """The Serve application the settings describe: the API, and the models if served."""
    registry = str(settings.registry_path.resolve())
    config = GatewayConfig(
        pool=spec,
        streams=streams_of(settings),
        policy=policy_of(settings),
        windows=windows_of(settings),
        alerts=alerts_of(settings),
        registry=registry if settings.serve_models else None,
    )
    models = (
        ModelsConfig(
            pool=spec,
            registry=registry,
            poll_s=settings.model_poll_s,
            item_refresh_s=settings.item_index_refresh_s,
        )
        if settings.serve_models
        else None
    )
    return build_app(config, models, replicas)


def funnel_of(settings: Settings) -> FunnelSpec:
    """The conversion funnel (steps and window) as plain values."""
    return FunnelSpec.parse(settings.funnel_steps, settings.conversion_window_s)


async def prepare_streams(
    nats_url: str,
    names: StreamNames,
    max_age_s: float,
    replicas: int = 1,
    checkpoints: CheckpointConfig | None = None,
) -> None:
    """Create the streams (and the snapshot bucket) at ``nats_url`` if missing.

    The bucket is made here, once, rather than by the first shards to need it:
    shards creating a replicated bucket at the same moment time each other out.
    """
    try:
        # nats-py retries a refused first connect for ever unless attempts are > 0.
        connecting = nats.connect(
            server_list(nats_url),
            connect_timeout=5,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.2,
            error_cb=_quiet,
        )
        nc = await asyncio.wait_for(connecting, timeout=15)
    except Exception as exc:  # nats-py raises several unrelated types here
        raise UnavailableError("nats", f"cannot connect to {nats_url}: {exc!r}") from None
    try:
        await ensure_streams(nc.jetstream(), names, max_age_s=max_age_s, replicas=replicas)
        if checkpoints is not None and not checkpoints.folder:
            await ObjectStoreCheckpoints(nc.jetstream(), checkpoints.bucket, replicas).ensure()
    finally:
        await nc.close()


async def prepare_streams_of(settings: Settings, nats_url: str) -> None:
    """The streams and snapshot bucket the settings describe, on the server at ``nats_url``."""
    await prepare_streams(
        nats_url,
        streams_of(settings),
        settings.stream_max_age_s,
        settings.stream_replicas,
        checkpoints_of(settings),
    )


def pool_spec_of(settings: Settings, nats_url: str) -> PoolSpec:
    """The shard pool the settings describe, on the NATS at ``nats_url``."""
    return PoolSpec(
        settings.partitions,
        settings.shards,
        nats_url,
        settings.stream,
        checkpoints=checkpoints_of(settings),
    )


def start_shards(
    settings: Settings, spec: PoolSpec, detached: bool = False
) -> tuple[ShardPool, ActorHandle]:
    """The shard pool and its autoscaling controller (``detached``: outliving this process,
    and attached to if they already run)."""
    pool = ShardPool.create(
        spec,
        policy=policy_of(settings),
        windows=windows_of(settings),
        funnel=funnel_of(settings),
        detached=detached,
    )
    lifetime = {"lifetime": "detached", "get_if_exists": True} if detached else {}
    controller = ScalingController.options(  # type: ignore[attr-defined]
        name=AUTOSCALER_NAME, namespace=NAMESPACE, **lifetime
    ).remote(spec, scaling_policy_of(settings), settings.autoscale_every_s)
    return pool, controller


async def _quiet(exc: Exception) -> None:
    """nats-py logs every failed connect attempt; the caller reports the outcome once."""


@contextlib.contextmanager
def _children_ignore_ctrl_c() -> Iterator[None]:
    """Start child processes with SIGINT ignored (an inherited disposition).

    A terminal's Ctrl-C goes to the whole foreground process group; Ray's
    processes must not die from it before ``Platform.stop`` shuts them down in
    order. Only the main thread may change signal handlers; elsewhere, no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Platform:
    """NATS, Ray, the shard pool and the API, started and stopped together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.nats: EmbeddedNats | None = None
        self.pool: ShardPool | None = None
        self.controller: ActorHandle | None = None
        self.nats_url = settings.nats_url
        self._owns_ray = False
        self.metrics_port: int | None = None
        self.info: RuntimeInfo | None = None

    def start(self) -> RuntimeInfo:
        """Start every part; on failure, stop what already started and re-raise."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> RuntimeInfo:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        if s.embedded_nats:
            self.nats = EmbeddedNats(s.data_dir / "nats", port=s.nats_port).start()
            self.nats_url = self.nats.url
        asyncio.run(prepare_streams_of(s, self.nats_url))
        if not ray.is_initialized():
            self._init_ray()
        spec = pool_spec_of(s, self.nats_url)
        self.pool, self.controller = start_shards(s, spec)
        serve.start(http_options={"host": s.http_host, "port": s.http_port})
        app = serve_app_of(s, spec, replicas_of(s))
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        host = "127.0.0.1" if s.http_host in ("0.0.0.0", "::") else s.http_host
        self.info = RuntimeInfo(
            nats_url=self.nats_url,
            http_url=f"http://{host}:{s.http_port}",
            pid=os.getpid(),
            partitions=s.partitions,
            shards=s.shards,
            metrics_url=f"http://127.0.0.1:{self.metrics_port}/metrics"
            if self.metrics_port
            else None,
        )
        RuntimeInfo.path(s.data_dir).write_text(json.dumps(asdict(self.info)))
        return self.info

    def _init_ray(self) -> None:
        s = self.settings
        if s.ray_address == "local":
            with _children_ignore_ctrl_c():
                self._init_local_ray()
        else:
            ray.init(address=s.ray_address, namespace=NAMESPACE, logging_level=logging.WARNING)
        self._owns_ray = True

    def _init_local_ray(self) -> None:
        s = self.settings
        self.metrics_port = s.metrics_port or free_port()
        ray.init(
            address="local",  # a new instance, even if another Ray runs on this machine
            _metrics_export_port=self.metrics_port,
            num_cpus=s.num_cpus or (os.cpu_count() or 1) + TRAINING_HEADROOM_CPUS,
            include_dashboard=False,
            namespace=NAMESPACE,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )

    def stop(self) -> None:
        """Stop everything this platform started, in reverse order; idempotent."""
        if ray.is_initialized():
            with contextlib.suppress(Exception):
                serve.shutdown()
            if self.controller is not None:
                with contextlib.suppress(Exception):
                    ray.kill(self.controller, no_restart=True)
            self.controller = None
            if self.pool is not None:
                with contextlib.suppress(Exception):
                    self.pool.shutdown()
            self.pool = None
            if self._owns_ray:
                ray.shutdown()
                self._owns_ray = False
        if self.nats is not None:
            self.nats.stop()
            self.nats = None
        if self.info is not None:
            with contextlib.suppress(OSError):
                RuntimeInfo.path(self.settings.data_dir).unlink()
            self.info = None
