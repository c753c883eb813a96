"""Real parts: a nats-server with JetStream on a free port in a temp folder, one local Ray.

Ray starts once per session (it costs seconds); NATS servers are cheap and start
per module. The ``platform`` fixture is the whole stack as ``audience up`` builds
it, pointed at an external NATS by URL.

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

from actors.pool import NAMESPACE
from cluster.launcher import Platform
from cluster.nats_server import EmbeddedNats, free_port
from cluster.settings import Settings
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
    with EmbeddedNats(tmp_path_factory.mktemp("platform-nats")) as server:
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
            _env_file=None,  # type: ignore[call-arg]
        )
        running = Platform(settings)
        running.start()
        try:
            yield running
        finally:
            running.stop()


@pytest.fixture(scope="module")
def api(platform: Platform) -> Iterator[httpx.Client]:
    """An HTTP client on the platform's API, once the API answers its probe."""
    assert platform.info is not None
    with httpx.Client(base_url=platform.info.http_url, timeout=30) as client:
        wait_until(lambda: _healthy(client), timeout_s=60)
        yield client


def _healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False
