"""All settings of a process, read once from the environment (prefix ``AUDIENCE_``).

Lower layers never read these: the launcher hands plain values down.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from actors.conversion import FunnelSpec
from actors.producer import DEFAULT_LINGER_MS
from actors.windows import LatenessPolicy


def _has_nkeys() -> bool:
    """Whether the ``nkeys`` package (nkey seeds and creds files in nats-py) imports.

    A dependency of the project, so only a broken install (or a missing ed25519
    backend, PyNaCl) makes this false.
    """
    try:
        import nkeys  # noqa: F401
    except ImportError:
        return False
    return True


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "audience"


class Settings(BaseSettings):
    """Configuration of ``audience up`` and the other commands.

    Every field can be set as ``AUDIENCE_<FIELD>`` (for example
    ``AUDIENCE_NATS_URL=nats://nats:4222``) or in a ``.env`` file.
    """

    model_config = SettingsConfigDict(
        env_prefix="AUDIENCE_", env_file=".env", extra="ignore", validate_default=True
    )

    nats_url: str = Field(
        default="embedded",
        description="NATS server URL (nats://host:port), or 'embedded' to start a local "
        "nats-server with JetStream in the data folder.",
    )
    nats_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Client port of the embedded nats-server; 0 picks a free port.",
    )
    nats_embedded_auth: bool = Field(
        default=True,
        description="Start the embedded nats-server with one user per role (admin, api, "
        "shard, producer) and least-privilege permissions; passwords are generated once into "
        "<data_dir>/nats/auth (owner-only). Turn off only for local experiments.",
    )
    nats_user: str | None = Field(
        default=None, description="User name on an external NATS (with nats_password)."
    )
    nats_password: SecretStr | None = Field(
        default=None, description="Password of nats_user on an external NATS."
    )
    nats_token: SecretStr | None = Field(
        default=None, description="Authentication token of an external NATS."
    )
    nats_nkey_seed_file: Path | None = Field(
        default=None,
        description="File holding an nkey seed (SU...) to sign in to an external NATS with.",
    )
    nats_creds_file: Path | None = Field(
        default=None,
        description="NATS creds file (user JWT and nkey seed, decentralised JWT auth).",
    )
    nats_tls_ca: Path | None = Field(
        default=None, description="CA bundle to verify the NATS server's TLS certificate."
    )
    nats_tls_cert: Path | None = Field(
        default=None, description="Client certificate for NATS TLS (with nats_tls_key)."
    )
    nats_tls_key: Path | None = Field(default=None, description="Private key of nats_tls_cert.")
    nats_inbox_prefix: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Inbox prefix of every NATS connection, for servers that allow each user "
        "only its own inboxes (e.g. _INBOX.producer with the embedded server's producer user).",
    )
    stream: str = Field(
        default="AUDIENCE_EVENTS",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="JetStream stream that holds the partitioned event subjects.",
    )
    dlq_stream: str = Field(
        default="AUDIENCE_DLQ",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="JetStream stream that keeps dead-lettered events with their reasons.",
    )
    stream_replicas: int = Field(
        default=1,
        ge=1,
        le=5,
        description="Copies of each stream (events, dead letters) and of the snapshot bucket "
        "kept on as many servers of a NATS cluster: 3 keep ingest and consumption going when "
        "one server is lost. Only 1 with the embedded (single) nats-server. Applies when the "
        "streams are created; existing streams keep theirs.",
    )
    stream_max_age_s: float = Field(
        default=7 * 86_400,
        gt=0,
        description="How long the event stream keeps messages. Shards restore a snapshot and "
        "replay the stream after it, so this must outlast the checkpoint interval many times "
        "over; without snapshots it bounds how far back a rebuilt state reaches.",
    )
    checkpoint_interval_s: float = Field(
        default=60.0,
        ge=0,
        description="Seconds between shard snapshots (0: only on demand and at stop). A "
        "restarted shard restores its newest snapshot and replays the stream from there.",
    )
    checkpoint_folder: Path | None = Field(
        default=None,
        description="Keep shard snapshots in this folder instead of the JetStream object store "
        "(a volume every shard can reach).",
    )
    checkpoint_bucket: str = Field(
        default="AUDIENCE_CHECKPOINTS",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="JetStream object store bucket for shard snapshots (the default store).",
    )
    checkpoints_kept: int = Field(
        default=3, ge=1, description="Snapshots kept per shard; older ones are deleted."
    )
    partitions: int = Field(
        default=16,
        ge=1,
        le=4096,
        description="Partition count P: fixed for the life of a stream, the unit of ownership "
        "and hand-off. P caps the shard count; more partitions mean smaller messages (a "
        "producer batches per partition), so more per-message cost at a given rate.",
    )
    shards: int = Field(
        default=2,
        ge=1,
        description="Shard actor count N; each owns a disjoint set of partitions (N <= P).",
    )
    autoscale_min_shards: int = Field(
        default=1, ge=1, description="Fewest shard actors the autoscaling policy recommends."
    )
    autoscale_max_shards: int = Field(
        default=8, ge=1, description="Most shard actors the autoscaling policy recommends."
    )
    autoscale_target_utilisation: float = Field(
        default=0.6,
        gt=0,
        le=1,
        description="Share of its time a shard should spend applying events; the policy "
        "recommends more shards above it and fewer below (with stabilisation windows).",
    )
    autoscale_apply: bool = Field(
        default=True,
        description="Rescale the shard pool live to what the autoscaling policy decides "
        "(partitions are handed over between shards while the stream flows); false: only "
        "show the decisions in `audience status` and the dashboard.",
    )
    autoscale_every_s: float = Field(
        default=10.0, gt=0, description="How often the autoscaling policy samples the shards."
    )
    serve_min_replicas: int = Field(
        default=1, ge=1, description="Fewest replicas of each Serve deployment (API, models)."
    )
    serve_max_replicas: int = Field(
        default=1,
        ge=1,
        description="Most replicas of each Serve deployment; above serve_min_replicas, Serve "
        "autoscales on ongoing requests per replica.",
    )
    serve_target_ongoing_requests: float = Field(
        default=16.0, gt=0, description="Ongoing requests per replica Serve's autoscaler aims at."
    )
    ray_address: str = Field(
        default="local",
        description="Ray cluster address (ray://host:10001 or auto), or 'local' to start one.",
    )
    num_cpus: int | None = Field(
        default=None,
        ge=1,
        description="Logical CPUs a local Ray schedules with; default: this machine's cores "
        "plus 2, so that Ray Data training fits beside the always-on shards and replicas "
        "(which mostly wait on I/O and reserve CPU fractions).",
    )
    serve_fast_path: bool = Field(
        default=True,
        description="Start a local Ray with Ray Serve's HAProxy ingress and throughput-optimized "
        "replicas (cluster/serve_fast_path.py); on a Ray cluster, set them in its pods instead.",
    )
    shard_reads_over_nats: bool = Field(
        default=True,
        description="The model replicas read users' state from the shards over NATS "
        "request/reply (~0.3 ms) instead of Ray actor calls (~2 ms on two cores); Ray calls "
        "stay the fallback when NATS cannot answer.",
    )
    access_logs: bool = Field(
        default=True,
        description="A log line per HTTP request from every Serve replica (Ray Serve's access "
        "log, buffered); off saves a little CPU per request.",
    )
    http_host: str = Field(default="127.0.0.1", description="Address the HTTP API binds to.")
    http_port: int = Field(default=8000, ge=0, le=65535, description="Port of the HTTP API.")
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Prometheus metrics port of a local Ray (ray_audience_* and Ray Serve's "
        "own); 0 picks a free port. Ignored when attaching to an existing Ray cluster.",
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Folder for the embedded NATS store and other local state.",
    )
    batch_max_events: int = Field(
        default=1000, ge=1, le=100_000, description="Most events a producer puts in one message."
    )
    linger_ms: float = Field(
        default=DEFAULT_LINGER_MS,
        ge=0,
        le=10_000,
        description="How long a producer waits to fill a partition's batch before sending it: "
        "longer makes fewer, larger messages (each costs the producer, nats-server and the "
        "shard a fixed ~0.1 ms) and adds up to that much to the time an event takes to be seen.",
    )
    max_future_s: float = Field(
        default=86_400,
        ge=0,
        description="Events stamped further than this ahead of the wall clock are rejected.",
    )
    allowed_lateness_s: float = Field(
        default=300,
        ge=0,
        description="How far (event time) behind the newest event of its partition an event "
        "may be and still count as on time in the engagement windows.",
    )
    late_policy: LatenessPolicy = Field(
        default=LatenessPolicy.CORRECT,
        description="What happens to late events: 'drop' (only counted) or 'correct' (kept "
        "in a correction aggregate of their bucket, flagged as late).",
    )
    funnel_steps: str = Field(
        default="page_view,add_to_cart,purchase",
        description="Conversion funnel: comma-separated event types in order (at least two, "
        "distinct).",
    )
    conversion_window_s: float = Field(
        default=1800,
        gt=0,
        description="Most event time from one funnel step to the next for a user to convert.",
    )
    webhook_urls: str = Field(
        default="",
        description="Comma-separated http(s) URLs that every new alert is POSTed to (signed "
        "JSON, retried with backoff); empty: no webhooks.",
    )
    webhook_secret: SecretStr = Field(
        default=SecretStr(""),
        description="Shared secret of the webhooks' X-Audience-Signature (HMAC-SHA256).",
    )
    webhook_sources: Path | None = Field(
        default=None,
        description="JSON file of the inbound webhook sources POST /v1/webhooks/{source} "
        "takes: per source its secret (or the environment variable holding it), signature, "
        "timestamp window and field mapping (deploy/webhook-sources.example.json); unset: none. "
        "Read, with the secrets' environment variables, when the API is deployed.",
    )
    api_auth: bool = Field(
        default=True,
        description="Require an API key on every HTTP route but /healthz, /docs and the "
        "dashboard's page. Turn off only for local experiments.",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="Key store (JSON, hashes only, mode 0600) the API accepts keys from and "
        "follows for changes; default: <data_dir>/api-keys.json. On Kubernetes, a mounted Secret.",
    )
    api_key: SecretStr = Field(
        default=SecretStr(""),
        description="The key commands such as `audience status` send; default: the admin key "
        "`audience up` wrote to <data_dir>/admin.key.",
    )
    dashboard_public: bool = Field(
        default=False,
        description="Serve the dashboard's data without a key (it shows aggregates and "
        "operations, no per-user data); other reads still need one.",
    )
    rate_limit_per_s: float = Field(
        default=500.0, gt=0, description="Requests per second per API key, per API replica."
    )
    rate_limit_burst: float = Field(
        default=1000.0, ge=1, description="Requests an API key may make at once (token bucket)."
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        description="Largest body of POST /v1/events (413 beyond).",
    )
    max_json_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest body of every other request (413 beyond).",
    )
    max_events_per_request: int = Field(
        default=10_000, ge=1, description="Most events in one POST /v1/events (413 beyond)."
    )
    serve_models: bool = Field(
        default=True, description="Serve the churn and personalization models (Ray Serve)."
    )
    insights: bool = Field(
        default=True,
        description="Keep the insight aggregates (engagement, conversion, retention, trends, "
        "segments). false: profile-only mode, per-user state, items and model features only, "
        "for less CPU per event; the /v1/insights routes then answer 404.",
    )
    registry_dir: Path | None = Field(
        default=None,
        description="Model registry folder; default: <data_dir>/models.",
    )
    model_poll_s: float = Field(
        default=5.0, gt=0, description="How often model replicas check the registry's CURRENT."
    )
    item_index_refresh_s: float = Field(
        default=5.0, gt=0, description="How often serving re-merges the shards' item state."
    )
    churn_horizon_days: float = Field(
        default=14.0, gt=0, description="Churned = no activity this many days after the cutoff."
    )
    demo_users: int = Field(default=10_000, ge=1, description="Users simulated by `up --demo`.")
    demo_rate: float = Field(
        default=500, gt=0, description="Events per second simulated by `up --demo`."
    )

    @field_validator("funnel_steps")
    @classmethod
    def _known_steps(cls, value: str) -> str:
        FunnelSpec.parse(value, 1.0)  # raises ValueError with the reason
        return value

    @field_validator("webhook_urls")
    @classmethod
    def _http_urls(cls, value: str) -> str:
        for url in (u.strip() for u in value.split(",") if u.strip()):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"webhook URL must be http(s)://..., got {url!r}")
        return value

    @property
    def webhook_targets(self) -> tuple[str, ...]:
        """The webhook URLs as a tuple, blanks dropped."""
        return tuple(u.strip() for u in self.webhook_urls.split(",") if u.strip())

    @model_validator(mode="after")
    def _shards_fit_partitions(self) -> Settings:
        if self.shards > self.partitions:
            raise ValueError(
                f"shards ({self.shards}) must not exceed partitions ({self.partitions})"
            )
        if self.nats_url != "embedded" and not self.nats_url.startswith(("nats://", "tls://")):
            raise ValueError("nats_url must be 'embedded' or a nats:// or tls:// URL")
        if self.embedded_nats and self.stream_replicas > 1:
            raise ValueError(
                f"stream_replicas ({self.stream_replicas}) needs a NATS cluster; the embedded "
                "nats-server is a single server (set nats_url, or stream_replicas=1)"
            )
        return self

    @model_validator(mode="after")
    def _one_nats_login(self) -> Settings:
        ways = [
            name
            for name, given in (
                ("nats_user", self.nats_user or self.nats_password),
                ("nats_token", self.nats_token),
                ("nats_nkey_seed_file", self.nats_nkey_seed_file),
                ("nats_creds_file", self.nats_creds_file),
            )
            if given
        ]
        if len(ways) > 1:
            raise ValueError(f"give one way to sign in to NATS, not {' and '.join(ways)}")
        if "@" in self.nats_url:  # a login in the URL would be printed and stored with it
            raise ValueError(
                "nats_url must not hold a login (user:password@); set nats_user and "
                "nats_password (or nats_token) instead"
            )
        if bool(self.nats_user) != bool(self.nats_password):
            raise ValueError("nats_user and nats_password go together")
        if bool(self.nats_tls_cert) != bool(self.nats_tls_key):
            raise ValueError("nats_tls_cert and nats_tls_key go together")
        if (self.nats_nkey_seed_file or self.nats_creds_file) and not _has_nkeys():
            # A dependency, but nats-py imports it only when connecting: should the
            # install be broken, fail here, once, in plain words.
            raise ValueError(
                "nats_nkey_seed_file and nats_creds_file need the `nkeys` package, which "
                "does not import here (reinstall audience-insights, or pip install nkeys)"
            )
        return self

    @model_validator(mode="after")
    def _autoscale_bounds(self) -> Settings:
        if self.autoscale_min_shards > self.autoscale_max_shards:
            raise ValueError("autoscale_min_shards must not exceed autoscale_max_shards")
        if self.serve_min_replicas > self.serve_max_replicas:
            raise ValueError("serve_min_replicas must not exceed serve_max_replicas")
        return self

    @model_validator(mode="after")
    def _retention_outlasts_checkpoints(self) -> Settings:
        # A restore replays from the newest snapshot: the stream must still hold
        # what came after it, with room for a few failed snapshots in a row.
        if self.checkpoint_interval_s and self.stream_max_age_s < 10 * self.checkpoint_interval_s:
            raise ValueError(
                f"stream_max_age_s ({self.stream_max_age_s:g}) must be at least 10 times "
                f"checkpoint_interval_s ({self.checkpoint_interval_s:g}), so that a restore "
                "finds every event after its snapshot"
            )
        return self

    @property
    def registry_path(self) -> Path:
        """Where models are stored: ``registry_dir``, or ``models`` under ``data_dir``."""
        return self.registry_dir or self.data_dir / "models"

    @property
    def api_keys_path(self) -> Path:
        """The key store: ``api_keys_file``, or ``api-keys.json`` under ``data_dir``."""
        return self.api_keys_file or self.data_dir / "api-keys.json"

    @property
    def admin_key_path(self) -> Path:
        """Where ``audience up`` writes the admin key it makes on first start (mode 0600)."""
        return self.data_dir / "admin.key"

    @property
    def embedded_nats(self) -> bool:
        """Whether ``audience up`` starts its own nats-server."""
        return self.nats_url == "embedded"
