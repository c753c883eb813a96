"""API keys, the key store, scopes, the guard and the request limits, without Ray or NATS."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request

from cluster.settings import Settings
from serving.auth import KeyRecord, KeyRing, KeyStore, Scope, new_key
from serving.errors import install_error_handlers
from serving.guard import AuthConfig, Forbidden, Guard, RateLimited, Unauthenticated
from serving.limits import BodyLimit, RateLimiter, retry_after


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_new_key_names_its_record_and_verifies_against_it_only() -> None:
    key, record = new_key([Scope.READ], name="grafana")
    assert key.startswith(f"aud_{record.id}_") and len(key) > 50
    ring = KeyRing([record])
    assert ring.verify(key) == record
    assert ring.verify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert ring.verify(f"aud_{'0' * 16}_{key.split('_', 2)[2]}") is None  # unknown id
    for garbage in ("", "aud_", "aud__", "Bearer x", "x" * 5000, key.replace("aud_", "abc_")):
        assert ring.verify(garbage) is None


def test_the_record_holds_a_salted_hash_never_the_key() -> None:
    key, record = new_key([Scope.INGEST])
    secret = key.split("_", 2)[2]
    assert secret not in record.hash and secret not in repr(record)
    assert record.hash not in repr(record) and "hash" not in record.public()
    _, other = new_key([Scope.INGEST])
    assert record.hash.split(":")[1] != other.hash.split(":")[1]  # a salt per key


def test_admin_grants_every_scope_and_the_others_only_themselves() -> None:
    _, admin = new_key([Scope.ADMIN])
    _, reader = new_key(["read"])
    _, both = new_key(["read", "ingest"])
    assert all(admin.grants(s) for s in Scope)
    assert reader.grants(Scope.READ) and not reader.grants(Scope.INGEST)
    assert not reader.grants(Scope.ADMIN)
    assert both.grants(Scope.INGEST) and both.grants(Scope.READ) and not both.grants(Scope.ADMIN)
    with pytest.raises(ValueError):
        new_key([])
    with pytest.raises(ValueError):
        new_key(["root"])
    for limits in ({"rate_per_s": -1.0}, {"rate_per_s": 0.0}, {"burst": 0.5}, {"burst": -3.0}):
        with pytest.raises(ValueError):  # a negative rate would never refuse
            new_key([Scope.READ], **limits)  # type: ignore[arg-type]


def test_the_store_file_is_owner_only_and_keeps_hashes_only(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys" / "api-keys.json")
    assert not store.exists() and store.load() == []
    key, record = store.create(["read"], name="dash", rate_per_s=2, burst=3)
    other, _ = store.create(["admin"])
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    text = store.path.read_text()
    assert key.split("_", 2)[2] not in text and other.split("_", 2)[2] not in text
    loaded = store.load()
    assert loaded[0] == record and len(loaded) == 2
    assert KeyRing(loaded).verify(key) == record
    assert store.revoke(record.id) and not store.revoke(record.id)
    assert KeyRing(store.load()).verify(key) is None
    assert not list(store.path.parent.glob("*.tmp"))


def test_a_file_that_is_no_key_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "api-keys.json"
    path.write_text(json.dumps({"keys": []}))
    with pytest.raises(ValueError, match="not an audience key store"):
        KeyStore(path).load()


def test_the_guard_refuses_missing_wrong_and_underscoped_keys(tmp_path: Path) -> None:
    admin_key, admin = new_key([Scope.ADMIN])
    read_key, reader = new_key([Scope.READ])
    guard = Guard(AuthConfig(keys=(admin, reader)))
    assert guard.admit(admin_key, Scope.ADMIN) == admin
    assert guard.admit(read_key, Scope.READ) == reader
    with pytest.raises(Unauthenticated) as missing:
        guard.admit(None, Scope.READ)
    assert missing.value.reason == "missing_key" and "Authorization: Bearer" in missing.value.detail
    with pytest.raises(Unauthenticated) as wrong:
        guard.admit(read_key + "x", Scope.READ)
    assert wrong.value.reason == "invalid_key"
    with pytest.raises(Forbidden) as forbidden:
        guard.admit(read_key, Scope.INGEST)
    assert forbidden.value.needed == "ingest" and forbidden.value.granted == ("read",)
    assert read_key not in str(forbidden.value) and reader.id in str(forbidden.value)


def test_the_dashboard_data_are_open_only_when_the_dashboard_is_public() -> None:
    closed = Guard(AuthConfig())
    with pytest.raises(Unauthenticated):
        closed.admit(None, Scope.READ, public=True)
    public = Guard(AuthConfig(dashboard_public=True))
    assert public.admit(None, Scope.READ, public=True) is None
    with pytest.raises(Unauthenticated):
        public.admit(None, Scope.READ)  # other reads still need a key
    assert Guard(AuthConfig(enabled=False)).admit(None, Scope.ADMIN) is None


def test_the_public_dashboards_callers_share_one_rate_limit() -> None:
    clock = Clock()
    public = Guard(AuthConfig(dashboard_public=True, rate_per_s=1, burst=2), clock=clock)
    assert public.admit(None, Scope.READ, public=True) is None
    assert public.admit("anything", Scope.READ, public=True) is None
    with pytest.raises(RateLimited) as limited:
        public.admit(None, Scope.READ, public=True)
    assert limited.value.retry_after_s == pytest.approx(1.0)
    clock.now += 1.0
    assert public.admit(None, Scope.READ, public=True) is None


def test_the_guard_follows_the_key_store_file(tmp_path: Path) -> None:
    clock = Clock()
    store = KeyStore(tmp_path / "api-keys.json")
    first, _ = store.create([Scope.READ])
    guard = Guard(AuthConfig(keys=tuple(store.load()), keys_file=str(store.path)), clock=clock)
    assert guard.admit(first, Scope.READ) is not None
    second, record = store.create([Scope.INGEST])
    clock.now += 1.5
    assert guard.admit(second, Scope.INGEST) == record
    store.revoke(record.id)
    clock.now += 0.2  # checked at most once a second
    assert guard.admit(second, Scope.INGEST) == record
    clock.now += 1.0
    with pytest.raises(Unauthenticated):
        guard.admit(second, Scope.INGEST)


def test_a_key_store_missing_on_this_node_leaves_the_deployed_keys(tmp_path: Path) -> None:
    key, record = new_key([Scope.READ])
    config = AuthConfig(keys=(record,), keys_file=str(tmp_path / "absent.json"))
    assert Guard(config).admit(key, Scope.READ) == record


def test_a_token_bucket_allows_the_burst_then_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=clock)
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("k") == pytest.approx(0.5)
    assert limiter.take("other") == 0.0  # per key
    clock.now += 0.5
    assert limiter.take("k") == 0.0 and limiter.take("k") > 0
    clock.now += 100
    assert [limiter.take("k") for _ in range(4)][-1] > 0  # refills up to the burst only
    assert limiter.take("slow", rate_per_s=0.1, burst=1) == 0.0
    assert limiter.take("slow", rate_per_s=0.1, burst=1) == pytest.approx(10.0)
    assert retry_after(0.01) == "1" and retry_after(9.2) == "10"


def test_a_key_over_its_own_rate_is_refused_with_the_wait() -> None:
    clock = Clock()
    key, record = new_key([Scope.READ], rate_per_s=0.5, burst=2)
    guard = Guard(AuthConfig(keys=(record,)), clock=clock)
    guard.admit(key, Scope.READ)
    guard.admit(key, Scope.READ)
    with pytest.raises(RateLimited) as limited:
        guard.admit(key, Scope.READ)
    assert limited.value.retry_after_s == pytest.approx(2.0)
    assert limited.value.rate_per_s == 0.5 and limited.value.burst == 2


def _app(limit: int) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    guard = Guard(AuthConfig(keys=(KEY_RECORD,)))

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    @app.get("/guarded")
    async def guarded(request: Request) -> dict[str, str]:
        guard.admit(request.headers.get("x-api-key"), Scope.ADMIN)
        return {"ok": "yes"}

    app.add_middleware(BodyLimit, limit_for=lambda scope: limit)
    return app


KEY, KEY_RECORD = new_key([Scope.READ], rate_per_s=1, burst=1)


def _call(app: FastAPI, method: str, path: str, **kwargs: object) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, **kwargs)  # type: ignore[arg-type]

    return asyncio.run(go())


def test_bodies_over_the_limit_get_a_413_declared_or_streamed() -> None:
    app = _app(limit=100)
    assert _call(app, "POST", "/echo", content=b"x" * 100).json() == {"bytes": 100}
    declared = _call(app, "POST", "/echo", content=b"x" * 101)
    assert declared.status_code == 413 and "limit of 100 bytes" in declared.json()["detail"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(5):
            yield b"y" * 40

    streamed = _call(app, "POST", "/echo", content=chunks())
    assert streamed.status_code == 413 and "more than 100 bytes" in streamed.json()["detail"]


def test_refusals_are_json_with_a_reason_and_the_right_status() -> None:
    app = _app(limit=100)
    missing = _call(app, "GET", "/guarded")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["reason"] == "missing_key"
    forbidden = _call(app, "GET", "/guarded", headers={"x-api-key": KEY})
    assert forbidden.status_code == 403 and forbidden.json()["reason"] == "insufficient_scope"
    assert KEY not in forbidden.text


def test_rate_limited_answers_429_with_retry_after() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/limited")
    async def limited() -> None:
        raise RateLimited(key_id="abc", rate_per_s=1, burst=1, retry_after_s=2.5)

    answer = _call(app, "GET", "/limited")
    assert answer.status_code == 429 and answer.headers["retry-after"] == "3"
    assert answer.json()["reason"] == "rate_limited" and "abc" in answer.json()["detail"]


def test_secret_settings_are_secret_strings_and_never_shown(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        api_key="aud_0123456789abcdef_very-secret-value",
        webhook_secret="whsec-very-secret",
    )
    shown = repr(settings) + str(settings) + settings.model_dump_json()
    assert "very-secret" not in shown
    assert settings.api_key.get_secret_value().endswith("very-secret-value")
    secret_like = [
        (name, str(field.annotation))
        for name, field in Settings.model_fields.items()
        if re.search(r"(secret|password|token|_key)$", name) and "Path" not in str(field.annotation)
    ]
    assert {"api_key", "webhook_secret"} <= {name for name, _ in secret_like}
    assert all("SecretStr" in annotation for _, annotation in secret_like), secret_like
    assert settings.api_auth and not settings.dashboard_public  # secure by default
    assert settings.api_keys_path == tmp_path / "api-keys.json"


def test_key_records_load_from_what_the_store_wrote(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.json")
    _, record = store.create([Scope.ADMIN, Scope.READ], name="ops")
    (loaded,) = store.load()
    assert isinstance(loaded, KeyRecord) and loaded.scopes == ("admin", "read")
    assert loaded.public()["scopes"] == ["admin", "read"] and loaded.public()["name"] == "ops"
    assert loaded == record


def _settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path, **values)  # type: ignore[call-arg]


def test_up_makes_an_owner_only_admin_key_once_and_again_after_a_revoke(tmp_path: Path) -> None:
    from cluster.launcher import auth_of, ensure_admin_key

    settings = _settings(tmp_path, rate_limit_per_s=7, dashboard_public=True)
    path = ensure_admin_key(settings)
    assert path == tmp_path / "admin.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = path.read_text().strip()
    (record,) = KeyStore(settings.api_keys_path).load()
    assert record.scopes == ("admin",) and KeyRing([record]).verify(key) == record
    assert ensure_admin_key(settings) == path and path.read_text().strip() == key  # kept

    config = auth_of(settings)
    assert config.enabled and config.keys == (record,) and config.dashboard_public
    assert config.rate_per_s == 7 and config.keys_file == str(settings.api_keys_path.resolve())
    assert key not in repr(config) and record.hash not in repr(config)

    KeyStore(settings.api_keys_path).revoke(record.id)
    ensure_admin_key(settings)
    assert path.read_text().strip() != key  # rotated


def test_with_keys_off_nothing_is_made_and_the_api_is_open(tmp_path: Path) -> None:
    from cluster.launcher import auth_of, ensure_admin_key

    settings = _settings(tmp_path, api_auth=False)
    assert ensure_admin_key(settings) is None
    assert not list(tmp_path.iterdir())
    assert auth_of(settings).enabled is False


def test_the_keys_command_creates_lists_and_revokes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cluster.cli import main

    monkeypatch.setenv("AUDIENCE_DATA_DIR", str(tmp_path))
    assert main(["keys", "create", "--scope", "read", "--scope", "ingest", "--name", "etl"]) == 0
    key = capsys.readouterr().out.strip()
    (record,) = KeyStore(tmp_path / "api-keys.json").load()
    assert KeyRing([record]).verify(key) == record and record.scopes == ("ingest", "read")
    out = tmp_path / "ops.key"
    assert main(["keys", "create", "--scope", "admin", "--rate", "5", "--out", str(out)]) == 0
    assert "aud_" not in capsys.readouterr().out
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert main(["keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert record.id in listed and "etl" in listed and "rate 5/s" in listed
    assert key.split("_", 2)[2] not in listed and "sha256" not in listed
    assert main(["keys", "revoke", record.id]) == 0
    assert main(["keys", "revoke", record.id]) == 2
    assert main(["keys", "create"]) == 2
    assert "--scope" in capsys.readouterr().err


# Routes anyone may call: the probe and the dashboard's static files (docs and the
# OpenAPI page are FastAPI's own); inbound webhooks authenticate by their signature.
OPEN = {"/healthz", "/dashboard", "/dashboard/dashboard.js", "/dashboard/plotly.min.js"}
SIGNED = {"/v1/webhooks/{source}"}
ADMIN_ONLY = {
    ("DELETE", "/v1/users/{user_id}"),
    ("POST", "/v1/models/{kind}/promote"),
    ("POST", "/v1/checkpoints"),
    ("POST", "/v1/shards"),
}


def test_every_route_but_the_probe_and_the_dashboard_files_needs_a_scope() -> None:
    from serving.access import RequireScope, api_routes
    from serving.app import app
    from serving.model_routes import churn_api, personalize_api

    seen = set()
    gateway = list(api_routes(app.routes))
    for route in [*gateway, *api_routes(churn_api.routes), *api_routes(personalize_api.routes)]:
        if route.path in SIGNED:
            continue
        checks = [d.call for d in route.dependant.dependencies if isinstance(d.call, RequireScope)]
        for method in route.methods:
            seen.add((method, route.path))
            if route.path in OPEN:
                assert not checks, route.path
                continue
            assert len(checks) == 1, f"{method} {route.path} is not protected"
            (check,) = checks
            if (method, route.path) in ADMIN_ONLY:
                expected = Scope.ADMIN
            elif (method, route.path) == ("POST", "/v1/events"):
                expected = Scope.INGEST
            else:
                expected = Scope.READ
            assert check.scope is expected, f"{method} {route.path}: {check.scope}"
            if check.dashboard:
                assert method == "GET" and route.path.startswith(("/v1/status", "/v1/insights/"))
    assert ("POST", "/v1/events") in seen and ("GET", "/healthz") in seen
    assert ("GET", "/v1/churn/{user_id}") in seen and ("POST", "/v1/personalize") in seen
    # The model apps' routes are the gateway's (one definition, documented there).
    for model_api in (churn_api, personalize_api):
        assert {r.path for r in api_routes(model_api.routes)} <= {r.path for r in gateway}
    schema = app.openapi()
    assert {"HTTPBearer", "APIKeyHeader"} <= set(schema["components"]["securitySchemes"])
