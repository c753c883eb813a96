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
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
from ray import serve
from ray.actor import ActorHandle

from actors.checkpoint_store import CheckpointConfig, ObjectStoreCheckpoints
from actors.conversion import FunnelSpec
from actors.errors import AudienceError, UnavailableError
from actors.jetstream import StreamNames, ensure_streams
from actors.layout_store import LayoutStore
from actors.nats_auth import NatsAuthError, NatsCredentials, redact_url
from actors.nats_auth import connect as nats_connect
from actors.pool import NAMESPACE, PoolSpec, ShardPool
from actors.validation import ValidationPolicy
from actors.windows import WindowConfig
from cluster.autoscaling import ScalingPolicy
from cluster.nats_server import EmbeddedNats, free_port
from cluster.nats_users import AccessNames, NatsUsers
from cluster.scaling_controller import ScalingController
from cluster.serve_fast_path import ServeFastPath
from cluster.settings import Settings
from serving.alerts import AlertsConfig
from serving.app import AUTOSCALER_NAME, GatewayConfig, ServeApp, build_apps
from serving.auth import KeyStore, Scope, new_key, write_private
from serving.guard import AuthConfig
from serving.inbound_config import InboundSources, load_sources
from serving.models import ModelsConfig
from serving.replicas import ReplicaScaling

log = logging.getLogger(__name__)

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


def embedded_users_of(settings: Settings) -> NatsUsers:
    """The embedded nats-server's role users (files under ``<data_dir>/nats/auth``)."""
    return NatsUsers(
        settings.data_dir / "nats" / "auth",
        AccessNames(settings.stream, settings.dlq_stream, settings.checkpoint_bucket),
    )


def nats_credentials_of(settings: Settings, role: str) -> NatsCredentials | None:
    """How a component of ``role`` (admin, api, shard, producer) signs in to NATS.

    The settings' login (an external NATS: one identity for every role) when
    one is given; else, with the embedded server's auth on, the role's file
    that ``audience up`` generated (None while there is none); else none.
    """
    s = settings
    creds = NatsCredentials(
        user=s.nats_user,
        password=s.nats_password.get_secret_value() if s.nats_password else None,
        token=s.nats_token.get_secret_value() if s.nats_token else None,
        nkey_seed_file=str(s.nats_nkey_seed_file) if s.nats_nkey_seed_file else None,
        creds_file=str(s.nats_creds_file) if s.nats_creds_file else None,
        tls_ca=str(s.nats_tls_ca) if s.nats_tls_ca else None,
        tls_cert=str(s.nats_tls_cert) if s.nats_tls_cert else None,
        tls_key=str(s.nats_tls_key) if s.nats_tls_key else None,
        inbox_prefix=s.nats_inbox_prefix,
    )
    if creds.identity == "no credentials" and s.embedded_nats and s.nats_embedded_auth:
        try:
            return embedded_users_of(s).credentials(role)
        except (OSError, ValueError, TypeError):
            return None
    return None if creds == NatsCredentials() else creds


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


def auth_of(settings: Settings) -> AuthConfig:
    """How the API checks keys: the store's records (hashes only) and the file to follow.

    Raises:
        AudienceError: the key store cannot be read.
    """
    store = KeyStore(settings.api_keys_path)
    try:
        records = tuple(store.load()) if settings.api_auth else ()
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise AudienceError(f"cannot read the API key store {store.path}: {exc}") from None
    if settings.api_auth and not records:
        log.warning("no API key in %s: every API call will be refused", store.path)
    return AuthConfig(
        enabled=settings.api_auth,
        keys=records,
        keys_file=str(store.path.resolve()),
        dashboard_public=settings.dashboard_public,
        rate_per_s=settings.rate_limit_per_s,
        burst=settings.rate_limit_burst,
    )


def ensure_admin_key(settings: Settings) -> Path | None:
    """An admin key when the key store holds none (a first start, or the last one was revoked).

    The new key goes to ``admin_key_path`` (mode 0600) before its record goes
    to the store, so a crash in between leaves no key nobody holds. Returns that
    file when it exists (None with keys off). The key itself is never logged or printed.

    Raises:
        AudienceError: the key store cannot be read.
    """
    if not settings.api_auth:
        return None
    store = KeyStore(settings.api_keys_path)
    try:
        records = store.load()
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise AudienceError(f"cannot read the API key store {store.path}: {exc}") from None
    if not any(Scope.ADMIN.value in r.scopes for r in records):
        key, record = new_key([Scope.ADMIN], name="admin (made by audience up)")
        write_private(settings.admin_key_path, key + "\n")
        store.add(record)
        log.info("made an admin API key; it is in %s", settings.admin_key_path)
    return settings.admin_key_path if settings.admin_key_path.exists() else None


def webhooks_of(settings: Settings) -> InboundSources:
    """The inbound webhook sources, secrets resolved from this process's environment."""
    if settings.webhook_sources is None:
        return InboundSources()
    try:
        return load_sources(settings.webhook_sources)
    except ValueError as exc:
        raise AudienceError(str(exc)) from None


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


def serve_apps_of(
    settings: Settings,
    spec: PoolSpec,
    replicas: ReplicaScaling | None = None,
    nats_credentials: NatsCredentials | None = None,
) -> list[ServeApp]:
    """The Serve applications the settings describe: the API, and each model's if served.

    ``nats_credentials``: the API's NATS login; by default the settings' (api role).
    """
    registry = str(settings.registry_path.resolve())
    config = GatewayConfig(
        pool=spec,
        nats_credentials=nats_credentials or nats_credentials_of(settings, "api"),
        streams=streams_of(settings),
        policy=policy_of(settings),
        windows=windows_of(settings),
        alerts=alerts_of(settings),
        registry=registry if settings.serve_models else None,
        webhooks=webhooks_of(settings),
        auth=auth_of(settings),
        max_body_bytes=settings.max_body_bytes,
        max_json_body_bytes=settings.max_json_body_bytes,
        max_events_per_request=settings.max_events_per_request,
        insights=settings.insights,
    )
    models = (
        ModelsConfig(
            pool=spec,
            registry=registry,
            poll_s=settings.model_poll_s,
            item_refresh_s=settings.item_index_refresh_s,
            auth=config.auth,
            max_json_body_bytes=settings.max_json_body_bytes,
            nats_credentials=config.nats_credentials,
            reads_over_nats=settings.shard_reads_over_nats,
        )
        if settings.serve_models
        else None
    )
    return build_apps(config, models, replicas, access_logs=settings.access_logs)


def funnel_of(settings: Settings) -> FunnelSpec:
    """The conversion funnel (steps and window) as plain values."""
    return FunnelSpec.parse(settings.funnel_steps, settings.conversion_window_s)


async def prepare_streams(
    nats_url: str,
    names: StreamNames,
    max_age_s: float,
    replicas: int = 1,
    checkpoints: CheckpointConfig | None = None,
    credentials: NatsCredentials | None = None,
) -> None:
    """Create the streams (and the snapshot bucket) at ``nats_url`` if missing.

    The bucket is made here, once, rather than by the first shards to need it:
    shards creating a replicated bucket at the same moment time each other out.
    ``credentials`` must allow creating streams (the admin role).

    Raises:
        NatsAuthError: the server refused the credentials.
        UnavailableError: NATS could not be reached.
    """
    try:
        # nats-py retries a refused first connect for ever unless attempts are > 0.
        connecting = nats_connect(
            nats_url,
            credentials,
            connect_timeout=5,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.2,
            error_cb=_quiet,
        )
        nc = await asyncio.wait_for(connecting, timeout=15)
    except NatsAuthError:
        raise
    except Exception as exc:  # nats-py raises several unrelated types here
        detail = f"cannot connect to {redact_url(nats_url)}: {exc!r}"
        raise UnavailableError("nats", detail) from None
    try:
        await ensure_streams(nc.jetstream(), names, max_age_s=max_age_s, replicas=replicas)
        if checkpoints is not None and not checkpoints.folder:
            await ObjectStoreCheckpoints(nc.jetstream(), checkpoints.bucket, replicas).ensure()
        await LayoutStore(nc.jetstream(), "", replicas).ensure()
    finally:
        await nc.close()


async def prepare_streams_of(
    settings: Settings, nats_url: str, credentials: NatsCredentials | None = None
) -> None:
    """The streams and snapshot bucket the settings describe, on the server at ``nats_url``
    (signed in as ``credentials``, by default the settings' admin role)."""
    await prepare_streams(
        nats_url,
        streams_of(settings),
        settings.stream_max_age_s,
        settings.stream_replicas,
        checkpoints_of(settings),
        credentials or nats_credentials_of(settings, "admin"),
    )


def pool_spec_of(
    settings: Settings, nats_url: str, credentials: NatsCredentials | None = None
) -> PoolSpec:
    """The shard pool the settings describe, on the NATS at ``nats_url`` (signed in as
    ``credentials``, by default the settings' shard role)."""
    return PoolSpec(
        settings.partitions,
        settings.shards,
        nats_url,
        settings.stream,
        checkpoints=checkpoints_of(settings),
        nats_credentials=credentials or nats_credentials_of(settings, "shard"),
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
        insights=settings.insights,
    )
    lifetime = {"lifetime": "detached", "get_if_exists": True} if detached else {}
    controller = ScalingController.options(  # type: ignore[attr-defined]
        name=AUTOSCALER_NAME, namespace=NAMESPACE, **lifetime
    ).remote(
        spec,
        scaling_policy_of(settings),
        settings.autoscale_every_s,
        apply=settings.autoscale_apply,
    )
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

    def __init__(
        self, settings: Settings, nats_users: Mapping[str, NatsCredentials | None] | None = None
    ) -> None:
        """Args:
        nats_users: each role's NATS login (admin, api, shard, producer), for a NATS
            whose users the caller made; by default the embedded server's, or the
            settings' login for every role.
        """
        self.settings = settings
        self._nats_users = dict(nats_users) if nats_users is not None else None
        self.nats: EmbeddedNats | None = None
        self.pool: ShardPool | None = None
        self.controller: ActorHandle | None = None
        self.nats_url = settings.nats_url
        self._owns_ray = False
        self.metrics_port: int | None = None
        self.info: RuntimeInfo | None = None
        self.admin_key_file: Path | None = None
        self.fast_path = ServeFastPath()

    def start(self) -> RuntimeInfo:
        """Start every part; on failure, stop what already started and re-raise."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> RuntimeInfo:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # new: owner-only
        self.admin_key_file = ensure_admin_key(s)
        if s.embedded_nats:
            users = embedded_users_of(s)
            self.nats = EmbeddedNats(
                s.data_dir / "nats",
                port=s.nats_port,
                auth=s.nats_embedded_auth,
                names=users.names,
                auth_dir=users.folder,
            ).start()
            self.nats_url = self.nats.url
        asyncio.run(prepare_streams_of(s, self.nats_url, self.credentials("admin")))
        if not ray.is_initialized():
            self._init_ray()
        spec = pool_spec_of(s, self.nats_url, self.credentials("shard"))
        self.pool, self.controller = start_shards(s, spec)
        serve.start(http_options={"host": s.http_host, "port": s.http_port})
        for one in serve_apps_of(s, spec, replicas_of(s), self.credentials("api")):
            serve.run(one.app, name=one.name, route_prefix=one.route_prefix, blocking=False)
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

    def credentials(self, role: str) -> NatsCredentials | None:
        """The NATS login of ``role`` (admin, api, shard, producer) on this platform's NATS."""
        if self._nats_users is not None:
            return self._nats_users.get(role)
        if self.nats is not None:
            return self.nats.credentials(role)
        return nats_credentials_of(self.settings, role)

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
        if s.serve_fast_path:
            self.fast_path.apply()
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
                self.fast_path.undo()
        if self.nats is not None:
            self.nats.stop()
            self.nats = None
        if self.info is not None:
            with contextlib.suppress(OSError):
                RuntimeInfo.path(self.settings.data_dir).unlink()
            self.info = None
