"""Real parts: a nats-server with JetStream on a free port in a temp folder, one local Ray.

Ray starts once per session (it costs seconds); NATS servers are cheap and start
per module. The ``platform`` fixture is the whole stack as ``audience up`` builds
it, pointed at an external NATS by URL, with auth on: each part signs in as its role,
and tests that look at NATS directly use the ``nats_admin`` login.

The platform's allowed lateness is twenty years: the suite replays history from
2023 to 2026 onto the same eight partitions in whatever order the test files
run, so with a realistic lateness which events count as late would depend on
test order. Lateness itself is covered by unit tests (tests/unit/test_windows.py
and test_engagement.py); here every event is on time, and the engagement
answers depend only on the events a test publishes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest
import ray

from actors.nats_auth import NatsCredentials
from actors.pool import NAMESPACE
from cluster.launcher import Platform
from cluster.nats_server import EmbeddedNats, free_port
from cluster.nats_users import ROLES
from cluster.serve_fast_path import ServeFastPath
from cluster.settings import Settings
from tests.support.inbound import SOURCES_FILE
from tests.support.waiting import wait_until
from tests.support.webhooks import WebhookReceiver


@pytest.fixture(scope="session")
def ray_local() -> Iterator[int]:
    """One local Ray for the session; yields its Prometheus metrics port.

    Four logical CPUs on two cores, as ``audience up`` does (TRAINING_HEADROOM_CPUS):
    shards and Serve replicas reserve CPU fractions, and Ray Data training
    tasks need whole ones beside them.
    """
    metrics_port = free_port()
    fast_path = ServeFastPath()  # as `audience up` starts its Ray
    fast_path.apply()
    ray.init(
        address="local",  # a new instance, even if another Ray runs on this machine
        _metrics_export_port=metrics_port,
        num_cpus=4,
        include_dashboard=False,
        namespace=NAMESPACE,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    yield metrics_port
    ray.shutdown()
    fast_path.undo()


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="session")
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """A local HTTP server the platform's alert webhooks post to, for the whole session."""
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def platform(
    tmp_path_factory: pytest.TempPathFactory, ray_local: int, webhook_receiver: WebhookReceiver
) -> Iterator[Platform]:
    # NATS with auth on, as `audience up` starts it: each part signs in as its role.
    with EmbeddedNats(tmp_path_factory.mktemp("platform-nats"), auth=True) as server:
        settings = Settings(
            nats_url=server.url,
            partitions=8,
            shards=2,
            http_port=free_port(),
            data_dir=tmp_path_factory.mktemp("platform-data"),
            allowed_lateness_s=20 * 365 * 86_400,
            webhook_urls=webhook_receiver.url,
            webhook_secret=webhook_receiver.secret,
            model_poll_s=0.5,
            item_index_refresh_s=1.0,
            autoscale_every_s=1.0,
            autoscale_apply=False,  # the suite counts on 2 shards; test_rescale rescales
            webhook_sources=SOURCES_FILE,
            _env_file=None,  # type: ignore[call-arg]
        )
        running = Platform(settings, nats_users={r: server.credentials(r) for r in ROLES})
        running.start()
        try:
            yield running
        finally:
            running.stop()


@pytest.fixture(scope="session")
def nats_admin(platform: Platform) -> NatsCredentials:
    """The platform NATS's admin login (every right), for tests that look at NATS directly."""
    creds = platform.credentials("admin")
    assert creds is not None
    return creds


@pytest.fixture(scope="session")
def nats_producer_env(platform: Platform) -> dict[str, str]:
    """Settings (environment) that sign a command in as the platform NATS's producer role."""
    creds = platform.credentials("producer")
    assert creds is not None and creds.user and creds.password and creds.inbox_prefix
    return {
        "AUDIENCE_NATS_USER": creds.user,
        "AUDIENCE_NATS_PASSWORD": creds.password,
        "AUDIENCE_NATS_INBOX_PREFIX": creds.inbox_prefix,
    }


@pytest.fixture(scope="session")
def api_key(platform: Platform) -> str:
    """The platform's admin API key (every scope), as `audience up` wrote it on first start."""
    assert platform.admin_key_file is not None, "the platform made no admin key"
    return platform.admin_key_file.read_text().strip()


@pytest.fixture(scope="session")
def api_headers(api_key: str) -> dict[str, str]:
    """Headers that authenticate a request with the admin key (for clients the tests build)."""
    return {"Authorization": f"Bearer {api_key}"}


@pytest.fixture(scope="module")
def api(platform: Platform, api_headers: dict[str, str]) -> Iterator[httpx.Client]:
    """An HTTP client on the platform's API, sending the admin key, once the API answers."""
    assert platform.info is not None
    with httpx.Client(base_url=platform.info.http_url, timeout=30, headers=api_headers) as client:
        wait_until(lambda: _healthy(client), timeout_s=60)
        yield client


def _healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False
