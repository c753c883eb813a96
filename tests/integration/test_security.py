"""API keys, scopes, rate and body limits on the running platform, and secrets kept out of sight."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from cluster.launcher import Platform
from serving.auth import KeyStore, Scope
from tests.integration.test_cli import run_cli
from tests.support.events import event
from tests.support.waiting import wait_until
from tests.support.webhooks import WebhookReceiver

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store(platform: Platform) -> KeyStore:
    """The key store the running API follows (new keys work within about a second)."""
    return KeyStore(platform.settings.api_keys_path)


@pytest.fixture(scope="module")
def anonymous(platform: Platform) -> Iterator[httpx.Client]:
    assert platform.info is not None
    with httpx.Client(base_url=platform.info.http_url, timeout=30) as client:
        wait_until(lambda: client.get("/healthz").status_code == 200, timeout_s=60)
        yield client


def _accepted(client: httpx.Client, key: str, path: str = "/v1/users/nobody") -> bool:
    return client.get(path, headers={"Authorization": f"Bearer {key}"}).status_code != 401


def _new_key(store: KeyStore, client: httpx.Client, *scopes: Scope, **limits: float) -> str:
    key, _ = store.create(scopes, name="test", **limits)  # type: ignore[arg-type]
    if Scope.READ in scopes or Scope.ADMIN in scopes:
        wait_until(lambda: _accepted(client, key), timeout_s=10, every_s=0.2)
    return key


def test_requests_without_a_key_get_401_saying_how_to_send_one(anonymous: httpx.Client) -> None:
    for method, path in [
        ("GET", "/v1/users/someone"),
        ("GET", "/v1/status"),
        ("GET", "/v1/insights/engagement"),
        ("POST", "/v1/events"),
        ("DELETE", "/v1/users/someone"),
        ("POST", "/v1/checkpoints"),
    ]:
        answer = anonymous.request(method, path, json=[event("sec-anon")])
        assert answer.status_code == 401, (method, path, answer.text)
        assert answer.json()["reason"] == "missing_key"
        assert "Authorization: Bearer" in answer.json()["detail"]
        assert answer.headers["www-authenticate"] == "Bearer"


def test_the_key_is_checked_before_the_body_is_read(
    anonymous: httpx.Client, store: KeyStore
) -> None:
    """A refused caller costs no body read or JSON parse: 401/403, never 422."""
    junk = b'{"not json'
    reader = {"X-API-Key": _new_key(store, anonymous, Scope.READ)}
    for path in ("/v1/churn", "/v1/personalize", "/v1/models/churn/promote", "/v1/shards"):
        refused = anonymous.post(path, content=junk, headers={"Content-Type": "application/json"})
        assert refused.status_code == 401, (path, refused.text)
        assert refused.json()["reason"] == "missing_key"
    for path in ("/v1/models/churn/promote", "/v1/shards", "/v1/events"):
        refused = anonymous.post(path, content=junk, headers=reader)
        assert refused.status_code == 403, (path, refused.text)
    for path in ("/v1/churn", "/v1/personalize"):  # admitted: now the body is read, and refused
        assert anonymous.post(path, content=junk, headers=reader).status_code == 422, path


def test_a_wrong_or_malformed_key_gets_401(anonymous: httpx.Client, api_key: str) -> None:
    forged = api_key[:-4] + ("AAAA" if not api_key.endswith("AAAA") else "BBBB")
    for key in (forged, "aud_0000000000000000_nope", "not-a-key"):
        answer = anonymous.get("/v1/users/someone", headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 401 and answer.json()["reason"] == "invalid_key"
        assert key not in answer.text


def test_probes_docs_and_the_dashboard_page_stay_open(anonymous: httpx.Client) -> None:
    assert anonymous.get("/healthz").json() == {"status": "ok"}
    assert anonymous.get("/dashboard").status_code == 200
    assert anonymous.get("/dashboard/dashboard.js").status_code == 200
    assert anonymous.get("/docs").status_code == 200
    schema = anonymous.get("/openapi.json").json()
    assert {"HTTPBearer", "APIKeyHeader"} <= set(schema["components"]["securitySchemes"])
    assert "security" in schema["paths"]["/v1/events"]["post"]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_a_read_key_reads_but_cannot_ingest_delete_promote_or_checkpoint(
    anonymous: httpx.Client, api: httpx.Client, store: KeyStore
) -> None:
    assert api.post("/v1/events", json=[event("sec-read", "like")]).status_code == 202
    key = _new_key(store, anonymous, Scope.READ)
    reader = {"X-API-Key": key}  # the other header works too
    assert wait_until(lambda: anonymous.get("/v1/users/sec-read", headers=reader).json()["events"])
    assert anonymous.get("/v1/status", headers=reader).status_code == 200
    for method, path, body in [
        ("POST", "/v1/events", [event("sec-read")]),
        ("DELETE", "/v1/users/sec-read", None),
        ("POST", "/v1/models/churn/promote", {"version": "v0001"}),
        ("POST", "/v1/checkpoints", None),
    ]:
        answer = anonymous.request(method, path, json=body, headers=reader)
        assert answer.status_code == 403, (method, path, answer.text)
        assert answer.json()["reason"] == "insufficient_scope"
        assert f"lacks the '{'ingest' if path == '/v1/events' else 'admin'}' scope" in answer.text
    assert anonymous.get("/v1/users/sec-read", headers=reader).status_code == 200  # not deleted


def test_an_ingest_key_ingests_but_cannot_read(
    anonymous: httpx.Client, api: httpx.Client, store: KeyStore
) -> None:
    key = _new_key(store, anonymous, Scope.INGEST)
    writer = {"Authorization": f"Bearer {key}"}

    def posted() -> httpx.Response | None:  # a new key works within about a second
        answer = anonymous.post("/v1/events", json=[event("sec-ingest")], headers=writer)
        return answer if answer.status_code != 401 else None

    answer = wait_until(posted, timeout_s=10, every_s=0.2)
    assert answer.status_code == 202, answer.text
    assert anonymous.get("/v1/users/sec-ingest", headers=writer).status_code == 403
    wait_until(lambda: api.get("/v1/users/sec-ingest").status_code == 200)


def test_an_ingest_key_cannot_forget_a_user_by_sending_user_deleted(
    anonymous: httpx.Client, api: httpx.Client, store: KeyStore
) -> None:
    assert api.post("/v1/events", json=[event("sec-forget", "like")]).status_code == 202
    wait_until(lambda: api.get("/v1/users/sec-forget").status_code == 200)
    key = _new_key(store, anonymous, Scope.INGEST)
    writer = {"Authorization": f"Bearer {key}"}

    def posted() -> httpx.Response | None:  # a new key works within about a second
        body = [event("sec-forget", "user_deleted")]
        answer = anonymous.post("/v1/events", json=body, headers=writer)
        return answer if answer.status_code != 401 else None

    answer = wait_until(posted, timeout_s=10, every_s=0.2)
    assert answer.status_code == 403, answer.text  # deletion is the admin's
    assert answer.json()["reason"] == "insufficient_scope"
    assert api.get("/v1/users/sec-forget").status_code == 200  # still known


def test_the_admin_key_may_delete_and_roll_out_models(api: httpx.Client) -> None:
    assert api.post("/v1/events", json=[event("sec-admin", "like")]).status_code == 202
    wait_until(lambda: api.get("/v1/users/sec-admin").status_code == 200)
    assert api.delete("/v1/users/sec-admin").json()["deleted"] is True
    promote = api.post("/v1/models/churn/promote", json={"version": "v9999"})
    assert promote.status_code in (404, 503), promote.text  # past the guard: no such version


def test_a_revoked_key_stops_working_within_seconds(
    anonymous: httpx.Client, store: KeyStore
) -> None:
    key = _new_key(store, anonymous, Scope.READ)
    store.revoke(key.split("_")[1])
    wait_until(lambda: not _accepted(anonymous, key), timeout_s=10, every_s=0.2)


def test_a_key_over_its_burst_gets_429_with_retry_after_and_others_are_unaffected(
    anonymous: httpx.Client, api: httpx.Client, store: KeyStore
) -> None:
    key = _new_key(store, anonymous, Scope.READ, rate_per_s=0.2, burst=5)
    headers = {"Authorization": f"Bearer {key}"}
    answers = [anonymous.get("/v1/users/nobody", headers=headers) for _ in range(8)]
    codes = [a.status_code for a in answers]
    assert 429 in codes and codes[0] != 429, codes
    limited = answers[codes.index(429)]
    assert 1 <= int(limited.headers["Retry-After"]) <= 5
    assert limited.json()["reason"] == "rate_limited" and "0.2 requests/s" in limited.text
    assert api.get("/v1/users/nobody").status_code == 404  # the admin key has its own bucket


def test_bodies_over_their_limit_get_413(api: httpx.Client) -> None:
    big = api.post("/v1/churn", json={"user_ids": ["u" * 100] * 12_000})  # > 1 MiB
    assert big.status_code == 413 and "exceeds the limit" in big.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"user_ids": ['
        for _ in range(2000):
            yield b'"' + b"u" * 1000 + b'",'
        yield b'"x"]}'

    streamed = api.post("/v1/churn", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413, streamed.text
    events = api.post("/v1/events", content=b"[" + b" " * (9 * 1024 * 1024) + b"]")
    assert events.status_code == 413
    too_many = api.post("/v1/personalize", json={"user_ids": ["u"] * 1001})
    assert too_many.status_code == 422  # batch endpoints cap their item count


def test_no_secret_shows_in_status_openapi_or_errors(
    platform: Platform,
    anonymous: httpx.Client,
    api: httpx.Client,
    api_key: str,
    webhook_receiver: WebhookReceiver,
) -> None:
    assert platform.info is not None
    secrets = [api_key, api_key.split("_", 2)[2], webhook_receiver.secret]
    shown = [
        anonymous.get("/openapi.json").text,
        api.get("/v1/status").text,
        anonymous.get("/v1/status", headers={"X-API-Key": api_key + "x"}).text,
        run_cli("status", "--url", platform.info.http_url, api_key=api_key).stdout,
        run_cli("status", "--json", "--url", platform.info.http_url, api_key=api_key).stdout,
        json.dumps(api.get("/v1/models").json()),
    ]
    assert "shard" in shown[3]  # the command did run
    for text in shown:
        for secret in secrets:
            assert secret not in text
    keys_file = platform.settings.api_keys_path.read_text()
    assert api_key.split("_", 2)[2] not in keys_file
