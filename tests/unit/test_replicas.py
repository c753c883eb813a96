"""Replica sizing of the Serve deployments: fixed by default, Serve autoscaling when bounded."""

from __future__ import annotations

import pytest

from actors.pool import PoolSpec
from cluster.launcher import replicas_of
from cluster.settings import Settings
from serving.app import ApiGateway, GatewayConfig, build_apps
from serving.models import ModelsConfig
from serving.replicas import ReplicaScaling


def test_one_replica_each_by_default() -> None:
    assert ReplicaScaling().options() == {"num_replicas": 1}


def test_a_range_turns_on_serves_request_based_autoscaling() -> None:
    options = replicas_of(
        Settings(serve_min_replicas=1, serve_max_replicas=4, serve_target_ongoing_requests=8)
    ).options()
    config = options["autoscaling_config"]
    assert (config["min_replicas"], config["max_replicas"]) == (1, 4)
    assert config["target_ongoing_requests"] == 8
    # Ray Serve itself accepts the options (it validates them when they are set).
    deployment = ApiGateway.options(**options)
    assert deployment._deployment_config.autoscaling_config.max_replicas == 4


def test_impossible_replica_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        ReplicaScaling(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="serve_min_replicas"):
        Settings(serve_min_replicas=3, serve_max_replicas=2)


def test_access_logs_are_a_setting_of_every_deployment() -> None:
    config = GatewayConfig(pool=PoolSpec(8, 1, "nats://127.0.0.1:4222", "EVENTS"))
    models = ModelsConfig(pool=config.pool, registry="/tmp/registry")
    for flag in (True, False):
        apps = build_apps(config, models, access_logs=flag)
        assert len(apps) == 3
        for one in apps:
            logging = one.app._bound_deployment.logging_config
            assert logging["enable_access_log"] is flag, one.name
