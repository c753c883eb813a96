"""The Kubernetes deployment (deploy/) checked offline: no cluster, no network, no Ray started.

What can be validated here is: the manifests parse; the Serve config passes Ray
Serve's own schema and names an application builder whose deployments exist;
every setting is a real one, in one place, and valid; images, versions, ports
and names agree across the image, the manifests and the package.
"""

import importlib
import inspect
import os
import re
from pathlib import Path
from types import FunctionType
from typing import Any

import pytest
import ray
import yaml
from packaging.specifiers import SpecifierSet
from pydantic import SecretStr
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.build_app import build_app
from ray.serve.config import AutoscalingConfig
from ray.serve.deployment import Application
from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

from actors.errors import AudienceError
from cluster import k8s
from cluster.launcher import pool_spec_of
from cluster.serve_fast_path import SWITCHES
from cluster.settings import Settings
from serving.app import GATEWAY_APP
from serving.model_routes import CHURN_PREFIX, PERSONALIZE_PREFIX
from serving.models import CHURN_APP, MODEL_APPS, PERSONALIZE_APP

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PREFIX = "AUDIENCE_"


def _load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc is not None]


def _one(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _load(name) if d.get("kind") == kind]
    return doc


def _rayservice() -> dict[str, Any]:
    return _one("rayservice.yaml", "RayService")


def _serve_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    return config


def _applications() -> list[dict[str, Any]]:
    apps: list[dict[str, Any]] = _serve_config()["applications"]
    return apps


def _application(name: str = GATEWAY_APP) -> dict[str, Any]:
    (app,) = [a for a in _applications() if a["name"] == name]
    return app


def _deployments() -> list[dict[str, Any]]:
    return [d for app in _applications() for d in app["deployments"]]


BUILDERS = {GATEWAY_APP: "app", CHURN_APP: "churn_app", PERSONALIZE_APP: "personalize_app"}


def _pod_specs() -> list[dict[str, Any]]:
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def _containers() -> list[dict[str, Any]]:
    return [c for spec in _pod_specs() for c in spec["containers"]]


def _configmap() -> dict[str, str]:
    data: dict[str, str] = _one("config.yaml", "ConfigMap")["data"]
    return data


def _secret() -> dict[str, str]:
    data: dict[str, str] = _one("secret.example.yaml", "Secret")["stringData"]
    return data


def _runtime_env_vars() -> dict[str, str]:
    env: dict[str, str] = _application()["runtime_env"]["env_vars"]
    return env


def _container_env() -> dict[str, str]:
    return {e["name"]: e.get("value", "") for c in _containers() for e in c.get("env", [])}


def _field(variable: str) -> str:
    assert variable.startswith(PREFIX), variable
    return variable[len(PREFIX) :].lower()


@pytest.fixture
def cluster_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment a Ray pod gives the builder: ConfigMap, Secret, runtime_env."""
    for name in list(os.environ):
        if name.startswith(PREFIX):
            monkeypatch.delenv(name)
    env = {**_configmap(), **_secret(), **_runtime_env_vars()}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(DEPLOY)  # no stray .env file is read
    return env


def _dockerfile() -> list[str]:
    """Instructions of the Dockerfile, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [i.strip() for i in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if i.strip()]


def _docker_args() -> dict[str, str]:
    return dict(
        i.split(None, 1)[1].split("=", 1)
        for i in _dockerfile()
        if i.startswith("ARG ") and "=" in i
    )


def _base_image() -> str:
    (base,) = [i.split()[1] for i in _dockerfile() if i.startswith("FROM ")]
    args = _docker_args()
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)


def _pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return project


# --- the manifests parse ---------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_parses_and_kubernetes_objects_are_named(path: Path) -> None:
    docs = _load(path.name)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        if path.name.endswith("-values.yaml"):  # Helm values, not an object
            assert "apiVersion" not in doc
            continue
        assert doc["apiVersion"] and doc["kind"], path.name
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


def test_the_rayservice_is_kuberays_v1_api() -> None:
    service = _rayservice()
    assert service["apiVersion"] == "ray.io/v1"
    assert isinstance(service["spec"]["serveConfigV2"], str)  # a YAML string, as KubeRay wants


# --- the Serve config ------------------------------------------------------------


def test_serve_config_validates_against_ray_serves_own_schema() -> None:
    schema = ServeDeploySchema.model_validate(_serve_config())
    prefixes = {app.name: app.route_prefix for app in schema.applications}
    assert prefixes == {
        GATEWAY_APP: "/",
        CHURN_APP: CHURN_PREFIX,
        PERSONALIZE_APP: PERSONALIZE_PREFIX,
    }


def test_every_application_has_the_same_serve_settings() -> None:
    (first, *others) = [app["runtime_env"] for app in _applications()]
    assert others and all(env == first for env in others)


def _unknown(keys: dict[str, Any], model: Any) -> set[str]:
    known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    return set(keys) - known


def test_serve_config_has_no_keys_ray_serve_would_ignore() -> None:
    # Serve's schema ignores unknown keys: a misspelt option would pass silently.
    config = _serve_config()
    assert not _unknown(config, ServeDeploySchema)
    for app in _applications():
        assert not _unknown(app, ServeApplicationSchema), app["name"]
    for deployment in _deployments():
        assert not _unknown(deployment, DeploymentSchema), deployment["name"]
        assert not _unknown(deployment["autoscaling_config"], AutoscalingConfig)


def test_every_deployment_autoscales_within_sane_bounds() -> None:
    for deployment in _deployments():
        # The schema keeps autoscaling_config a dict: validate it as Serve will.
        scaling = AutoscalingConfig.model_validate(deployment["autoscaling_config"])
        assert 1 <= scaling.min_replicas <= scaling.max_replicas, deployment["name"]
        assert scaling.target_ongoing_requests <= deployment["max_ongoing_requests"]


def test_import_paths_name_the_application_builders() -> None:
    for app in _applications():
        module_name, _, attribute = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module_name), attribute)
        # What Serve requires of a builder: a plain function of exactly one argument.
        assert isinstance(builder, FunctionType)
        assert len(inspect.signature(builder).parameters) == 1
        assert builder is getattr(k8s, BUILDERS[app["name"]])


def test_serve_calls_the_builder_with_the_configs_args_and_gets_the_app(
    cluster_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[Settings] = []
    monkeypatch.setattr(k8s, "start_backend", started.append)  # no NATS, no Ray here
    args = _application().get("args", {})

    app = call_user_app_builder_with_args_if_necessary(k8s.app, args)

    assert isinstance(app, Application)
    (settings,) = started
    assert settings.nats_url == cluster_env["AUDIENCE_NATS_URL"]
    assert not ray.is_initialized()
    for name in (CHURN_APP, PERSONALIZE_APP):  # the model builders only build
        builder = getattr(k8s, BUILDERS[name])
        model_app = call_user_app_builder_with_args_if_necessary(builder, args)
        assert isinstance(model_app, Application)
    assert len(started) == 1


def test_without_models_there_is_no_model_application(cluster_env: dict[str, str]) -> None:
    with pytest.raises(AudienceError, match="audience-churn"):
        k8s.application(k8s.settings_from({"serve_models": False}), CHURN_APP)


def _built(name: str) -> Any:
    return build_app(
        k8s.application(k8s.settings_from({}), name),
        name=name,
        make_deployment_handle=lambda deployment, app: None,
    )


def test_configured_deployments_are_the_applications_deployments(
    cluster_env: dict[str, str],
) -> None:
    ingress = {GATEWAY_APP: "ApiGateway"} | {app: d for d, app in MODEL_APPS.values()}
    for app in _applications():
        built = _built(app["name"])
        configured = {d["name"] for d in app["deployments"]}
        assert {d.name for d in built.deployments} == configured == {ingress[app["name"]]}
        assert built.ingress_deployment_name == ingress[app["name"]]


def test_model_deployments_follow_the_registry_unless_pinned() -> None:
    for deployment in _deployments():
        if deployment["name"] in ("ChurnScorer", "Personalizer"):
            assert deployment["user_config"] == {"version": "current"}


# --- settings --------------------------------------------------------------------


def _all_manifest_variables() -> dict[str, set[str]]:
    return {
        "configmap": set(_configmap()),
        "secret": set(_secret()),
        "runtime_env": set(_runtime_env_vars()),
        "container env": set(_container_env()),
    }


def test_every_audience_variable_in_the_manifests_is_a_setting() -> None:
    for place, names in _all_manifest_variables().items():
        for name in names:
            if name.startswith(PREFIX):
                assert _field(name) in Settings.model_fields, f"{name} ({place}) is no setting"
    assert all(name.startswith(PREFIX) for name in _configmap() | _secret())


def test_each_setting_has_one_home() -> None:
    places = list(_all_manifest_variables().items())
    for i, (place, names) in enumerate(places):
        for other, other_names in places[i + 1 :]:
            assert not names & other_names, f"set in both {place} and {other}"


def test_secret_settings_live_in_the_secret_and_only_there() -> None:
    secret_fields = {name for name, f in Settings.model_fields.items() if f.annotation is SecretStr}
    assert {_field(n) for n in _secret()} == secret_fields
    # The commands that create the real Secret name the same keys.
    commands = (ROOT / "docs" / "deploy.md").read_text() + (
        DEPLOY / "secret.example.yaml"
    ).read_text()
    created = set(re.findall(r"--from-literal=(\w+)=", commands))
    assert created == set(_secret())
    elsewhere = set(_configmap()) | set(_runtime_env_vars()) | set(_container_env())
    assert not {_field(n) for n in elsewhere if n.startswith(PREFIX)} & secret_fields


def test_local_only_settings_are_left_to_serve_and_the_pods() -> None:
    assert set(Settings.model_fields) >= k8s.LOCAL_ONLY
    for names in _all_manifest_variables().values():
        assert not {_field(n) for n in names if n.startswith(PREFIX)} & k8s.LOCAL_ONLY


def test_the_cluster_settings_pass_validation_and_the_builders_checks(
    cluster_env: dict[str, str],
) -> None:
    settings = k8s.settings_from({})
    assert not settings.embedded_nats
    assert settings.stream_replicas == 3
    assert settings.registry_dir is not None and settings.registry_dir.is_absolute()
    assert settings.webhook_secret.get_secret_value() == cluster_env["AUDIENCE_WEBHOOK_SECRET"]
    # The config's args go over the environment.
    assert k8s.settings_from({"shards": 3}).shards == 3


def test_the_builder_refuses_an_embedded_nats_or_a_private_registry(
    cluster_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AUDIENCE_REGISTRY_DIR")
    with pytest.raises(AudienceError, match="AUDIENCE_REGISTRY_DIR"):
        k8s.settings_from({})
    assert k8s.settings_from({"serve_models": False}).registry_dir is None
    monkeypatch.delenv("AUDIENCE_NATS_URL")
    with pytest.raises(AudienceError, match="AUDIENCE_NATS_URL"):
        k8s.settings_from({"stream_replicas": 1})


def test_the_builder_warns_about_settings_a_cluster_ignores(
    cluster_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AUDIENCE_HTTP_PORT", "9000")
    with caplog.at_level("WARNING", logger=k8s.__name__):
        k8s.settings_from({"serve_max_replicas": 3})
    assert "http_port, serve_max_replicas" in caplog.text


def test_every_ray_pod_reads_the_configmap_and_the_secret() -> None:
    configmap = _one("config.yaml", "ConfigMap")["metadata"]["name"]
    secret = _one("secret.example.yaml", "Secret")["metadata"]["name"]
    for container in _containers():
        sources = container["envFrom"]
        assert {"configMapRef": {"name": configmap}} in sources, container["name"]
        assert {"secretRef": {"name": secret}} in sources, container["name"]


def test_every_ray_pod_starts_ray_with_serves_fast_path() -> None:
    for container in _containers():
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert {k: env.get(k) for k in SWITCHES} == SWITCHES, container["name"]


def test_every_ray_pod_mounts_the_shared_registry_where_the_setting_points() -> None:
    claim = _one("models-pvc.yaml", "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod mounts it
    registry = _configmap()["AUDIENCE_REGISTRY_DIR"]
    for spec in _pod_specs():
        volumes = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        (container,) = spec["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts[registry]] == claim["metadata"]["name"]


# --- images and versions -----------------------------------------------------------


def test_every_ray_container_runs_the_one_image_tagged_with_the_package_version() -> None:
    images = {c["image"] for c in _containers()}
    (image,) = images
    assert image.rpartition(":")[2] == _pyproject()["project"]["version"]
    guide = (ROOT / "docs" / "deploy.md").read_text()
    assert f"docker build -f deploy/Dockerfile -t {image} ." in guide


def test_ray_and_python_versions_agree_across_image_manifest_and_package() -> None:
    base = _base_image()
    repository, _, tag = base.partition(":")
    assert repository == "rayproject/ray"
    ray_version, _, python_tag = tag.partition("-")
    assert ray_version == ray.__version__
    assert _rayservice()["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    python = f"{python_tag[2]}.{python_tag[3:]}"  # py311 -> 3.11
    assert python in SpecifierSet(_pyproject()["project"]["requires-python"])
    assert python == _pyproject()["tool"]["mypy"]["python_version"]  # what the code is checked for


def test_the_dockerfile_installs_the_package_from_the_files_it_copies() -> None:
    copies = [
        [a for a in i.split()[1:] if not a.startswith("--")]
        for i in _dockerfile()
        if i.startswith("COPY ")
    ]
    sources = [s for args in copies for s in args[:-1]]
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
    packages = {p.split(".")[0] for p in _pyproject()["tool"]["setuptools"]["packages"]}
    assert packages | {"pyproject.toml", _pyproject()["project"]["readme"]} <= set(sources)
    # pip installs the folder pyproject.toml went to: the package, not an editable link.
    (project_dir,) = [args[-1].rstrip("/") or "/" for args in copies if "pyproject.toml" in args]
    commands = [c.strip() for i in _dockerfile() if i.startswith("RUN ") for c in i[4:].split("&&")]
    installs = [c.split() for c in commands if c.startswith("pip install")]
    assert any(project_dir in words for words in installs), installs
    assert not any("-e" in words or "--editable" in words for words in installs)


def test_the_image_runs_as_a_non_root_user() -> None:
    users = [i.split()[1] for i in _dockerfile() if i.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    for spec in _pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True


def test_the_build_context_holds_only_what_the_image_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert "**" in ignore  # everything else is left out: .venv, data sets, test artifacts
    sources = [
        s
        for i in _dockerfile()
        if i.startswith("COPY ")
        for s in i.split()[1:-1]
        if not s.startswith("--")
    ]
    assert set(sources) <= allowed


# --- ports, capacity, NATS ---------------------------------------------------------


def _head_ports() -> dict[str, int]:
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    return {p["name"]: p["containerPort"] for p in head["ports"]}


def test_the_api_port_agrees_across_settings_serve_config_and_pods() -> None:
    http_port = Settings.model_fields["http_port"].default
    assert _serve_config()["http_options"]["port"] == http_port
    assert _serve_config()["http_options"]["host"] == "0.0.0.0"  # reachable from the service
    assert _head_ports()["serve"] == http_port  # KubeRay's serve service targets this name
    assert _head_ports()["dashboard"] == 8265


def test_the_nats_url_names_the_helm_releases_client_service() -> None:
    url = _configmap()["AUDIENCE_NATS_URL"]
    match = re.fullmatch(r"nats://([a-z0-9-]+):(\d+)", url)
    assert match, url
    host, port = match.groups()
    values = _load("nats-values.yaml")[0]
    assert int(port) == values["config"].get("nats", {}).get("port", 4222)
    guide = (ROOT / "docs" / "deploy.md").read_text()
    assert f"helm install {host} nats/nats -f deploy/nats-values.yaml" in guide


def _gibibytes(quantity: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i)", quantity)
    assert match, quantity
    number, unit = match.groups()
    return float(number) * {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10}[unit]


def test_nats_is_a_replicated_jetstream_cluster_on_persistent_volumes() -> None:
    config = _load("nats-values.yaml")[0]["config"]
    assert config["cluster"]["enabled"] is True
    assert config["cluster"]["replicas"] == 3
    assert int(_configmap()["AUDIENCE_STREAM_REPLICAS"]) <= config["cluster"]["replicas"]
    jetstream = config["jetstream"]
    assert jetstream["enabled"] and jetstream["fileStore"]["enabled"]
    pvc = jetstream["fileStore"]["pvc"]
    assert pvc["enabled"] is True
    assert _gibibytes(jetstream["fileStore"]["maxSize"]) < _gibibytes(pvc["size"])


def test_the_ray_autoscaler_is_on_and_the_head_takes_no_work() -> None:
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    options = cluster["autoscalerOptions"]
    assert options["upscalingMode"] in ("Default", "Aggressive", "Conservative")
    assert options["idleTimeoutSeconds"] > 0
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in cluster["workerGroupSpecs"]:
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def _worker_cpus(count_key: str) -> float:
    total = 0.0
    for group in _rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        total += group[count_key] * float(container["resources"]["limits"]["cpu"])
    return total


def test_the_smallest_ray_cluster_holds_the_smallest_platform_and_the_largest_the_largest(
    cluster_env: dict[str, str],
) -> None:
    settings = k8s.settings_from({})
    replica_cpus = {
        d.name: d.ray_actor_options["num_cpus"]
        for app in _applications()
        for d in _built(app["name"]).deployments
    }
    shards = settings.shards * pool_spec_of(settings, settings.nats_url).shard_cpus
    scaling = {d["name"]: d["autoscaling_config"] for d in _deployments()}

    def need(bound: str) -> float:
        return shards + sum(cpus * scaling[n][bound] for n, cpus in replica_cpus.items())

    assert need("min_replicas") <= _worker_cpus("minReplicas")
    assert need("max_replicas") <= _worker_cpus("maxReplicas")


def test_the_guide_names_only_files_that_exist() -> None:
    guide = (ROOT / "docs" / "deploy.md").read_text()
    named = set(re.findall(r"\bdeploy/(?:[\w-]+\.[\w.]+|Dockerfile)", guide))
    assert {"deploy/rayservice.yaml", "deploy/nats-values.yaml", "deploy/Dockerfile"} <= named
    for path in named:
        assert (ROOT / path).exists(), path
