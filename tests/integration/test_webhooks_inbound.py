"""Inbound webhooks through the real stack: signed deliveries become events, the rest is refused.

The platform is configured with the ``testshop`` source of
tests/support/webhook-sources.json. Deliveries are posted without an API key:
the HMAC signature is what authenticates them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from cluster.launcher import Platform
from tests.support.inbound import SOURCE, shop_event, signed_headers
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def vendor(platform: Platform, api: httpx.Client) -> Iterator[httpx.Client]:
    """A client as a vendor has it: the platform's URL, and no API key."""
    assert platform.info is not None
    with httpx.Client(base_url=platform.info.http_url, timeout=30) as client:
        yield client


def deliver(vendor: httpx.Client, body: bytes, **signing: Any) -> httpx.Response:
    return vendor.post(
        f"/v1/webhooks/{SOURCE}", content=body, headers=signed_headers(body, **signing)
    )


def delivery(*items: dict[str, Any]) -> bytes:
    return orjson.dumps({"data": {"events": list(items)}})


def profile_with(api: httpx.Client, user: str, events: int) -> dict[str, Any] | None:
    answer = api.get(f"/v1/users/{user}")
    if answer.status_code == 200 and answer.json()["events"] == events:
        return answer.json()
    return None


def test_a_signed_delivery_becomes_events_in_the_users_profile(
    vendor: httpx.Client, api: httpx.Client
) -> None:
    body = delivery(shop_event(1, "wh-alice", kind="product.viewed"), shop_event(2, "wh-alice"))
    answer = deliver(vendor, body)
    assert answer.status_code == 202, answer.text
    assert answer.json() == {
        "source": SOURCE,
        "items": 2,
        "accepted": 2,
        "skipped": 0,
        "rejected": [],
    }
    profile = wait_until(lambda: profile_with(api, "wh-alice", events=2))
    assert profile["counts"]["page_view"] == 1 and profile["counts"]["purchase"] == 1
    assert profile["revenue"] == pytest.approx(19.9)
    assert profile["recent_items"] == ["sku-2", "sku-1"]


def test_a_bad_signature_an_unknown_source_and_a_stale_delivery_are_refused(
    vendor: httpx.Client, api: httpx.Client
) -> None:
    body = delivery(shop_event(1, "wh-mallory"))
    forged = deliver(vendor, body, secret="not-the-shops-secret-at-all")
    assert forged.status_code == 401 and forged.json()["reason"] == "bad_signature"
    unsigned = vendor.post(f"/v1/webhooks/{SOURCE}", content=body)
    assert unsigned.status_code == 401 and unsigned.json()["reason"] == "missing_signature"
    stale = deliver(vendor, body, at=time.time() - 3600)
    assert stale.status_code == 409 and stale.json()["reason"] == "stale_timestamp"
    unknown = vendor.post("/v1/webhooks/nope", content=body, headers=signed_headers(body))
    assert unknown.status_code == 404 and unknown.json()["reason"] == "unknown_source"
    counters = api.get("/v1/status").json()["inbound_webhooks"]  # one API replica here
    assert counters["sources"] == [SOURCE]
    assert {"bad_signature", "missing_signature", "stale_timestamp"} <= set(counters["refused"])


def test_a_replayed_delivery_is_refused_and_a_re_signed_one_is_applied_once(
    vendor: httpx.Client, api: httpx.Client
) -> None:
    body = delivery(shop_event(1, "wh-bob"), shop_event(2, "wh-bob"))
    headers = signed_headers(body)
    first = vendor.post(f"/v1/webhooks/{SOURCE}", content=body, headers=headers)
    assert first.status_code == 202, first.text
    again = vendor.post(f"/v1/webhooks/{SOURCE}", content=body, headers=headers)
    assert again.status_code == 409 and again.json()["reason"] == "replayed"
    # The vendor's own retry, signed anew a second later: taken, but the same event ids.
    retry = deliver(vendor, body, at=time.time() + 1)
    assert retry.status_code == 202 and retry.json()["accepted"] == 2
    api.post(
        "/v1/events",
        json=[
            {
                "event_id": "wh-bob-last",
                "user_id": "wh-bob",
                "type": "like",
                "ts": "2024-05-01T13:00:00Z",
            }
        ],
    )
    profile = wait_until(lambda: profile_with(api, "wh-bob", events=3))
    assert profile["counts"]["purchase"] == 2


def test_unmappable_items_are_dead_lettered_with_reasons_and_the_others_published(
    vendor: httpx.Client, api: httpx.Client
) -> None:
    before = api.get("/v1/status").json()["dead_letters"]
    body = delivery(
        shop_event(1, "wh-carol"),
        shop_event(2, "wh-carol", customer={}),
        shop_event(3, "wh-carol", kind="order.refunded"),
    )
    answer = deliver(vendor, body)
    assert answer.status_code == 202, answer.text
    result = answer.json()
    assert result["accepted"] == 1
    assert [(r["index"], r["reason"]) for r in result["rejected"]] == [
        (1, "missing_user"),
        (2, "unknown_type"),
    ]
    wait_until(lambda: profile_with(api, "wh-carol", events=1))

    def grew() -> bool:
        dead = api.get("/v1/status").json()["dead_letters"]
        return all(dead.get(r, 0) > before.get(r, 0) for r in ("missing_user", "unknown_type"))

    wait_until(grew)


def test_a_body_without_items_gets_a_422_and_is_dead_lettered_whole(
    vendor: httpx.Client,
) -> None:
    answer = deliver(vendor, b'{"data": {"events": "none"}}')
    assert answer.status_code == 422
    (rejected,) = answer.json()["rejected"]
    assert rejected["index"] == -1 and rejected["reason"] == "schema"
    not_json = deliver(vendor, b"<xml/>")
    assert not_json.status_code == 422
    assert not_json.json()["rejected"][0]["reason"] == "invalid_json"
