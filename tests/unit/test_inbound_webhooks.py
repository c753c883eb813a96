"""Inbound webhooks in plain Python: config, field mapping, signatures, time window, replays."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from actors.validation import RejectReason, ValidationPolicy
from serving.inbound_config import InboundSources, SourceConfig, TimeFormat, load_sources
from serving.inbound_mapping import lookup, parse_time
from serving.inbound_webhooks import (
    DeliveryTooLarge,
    InboundWebhooks,
    ReplayGuard,
    ReplayRefused,
    SignatureRefused,
    UnknownSource,
)
from serving.signing import mac, sign

SECRET = "shop-secret-0123456789"
NOW = 1_780_000_000.0  # 2026-05-28, the fake clock's time
POLICY = ValidationPolicy()

SHOP: dict[str, Any] = {
    "secret": SECRET,
    "signature": {"header": "X-Shop-Signature"},
    "timestamp": {"header": "X-Shop-Timestamp", "tolerance_s": 300},
    "items": "data.events",
    "fields": {
        "user_id": "customer.id",
        "type": "kind",
        "ts": "created_at",
        "event_id": "id",
        "item_id": "product.sku",
        "category": "product.type",
        "value": "total",
        "properties": {"currency": "currency", "shop": "/shop/domain"},
    },
    "event_types": {"order.paid": "purchase", "product.viewed": "page_view"},
}


def receiver(**sources: dict[str, Any]) -> InboundWebhooks:
    config = InboundSources.model_validate({"sources": sources or {"shop": SHOP}})
    return InboundWebhooks(config, clock=lambda: NOW)


def delivery(*events: dict[str, Any]) -> bytes:
    return orjson.dumps({"data": {"events": list(events)}, "shop": {"domain": "a.example"}})


def paid(n: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"evt_{n}",
        "kind": "order.paid",
        "created_at": "2026-05-28T10:00:00+02:00",
        "customer": {"id": 4711},
        "product": {"sku": "sku-9", "type": "shoes"},
        "total": "59.90",
        "currency": "EUR",
        **extra,
    }


def signed(body: bytes, at: float = NOW, secret: str = SECRET) -> dict[str, str]:
    stamp = str(int(at))
    return {"X-Shop-Timestamp": stamp, "X-Shop-Signature": sign(secret, stamp, body)}


# --- mapping --------------------------------------------------------------------------------


def test_a_signed_delivery_maps_vendor_fields_to_events() -> None:
    hooks = receiver()
    body = delivery(paid(1), paid(2, kind="product.viewed", total=None))
    received = hooks.check(hooks.verify("shop", signed(body), body), POLICY, 100)
    assert received.usable and received.items == 2 and not received.checked.rejected
    first, second = (received.checked.batch.event_dict(i) for i in range(2))
    assert first["event_id"] == "wh.shop.evt_1" and first["user_id"] == "4711"
    assert first["type"] == "purchase" and second["type"] == "page_view"
    assert first["ts"] == parse_time("2026-05-28T08:00:00Z", TimeFormat.ISO)
    assert first["item_id"] == "sku-9" and first["category"] == "shoes"
    assert first["value"] == pytest.approx(59.9)
    assert first["source"] == "webhook"
    # a path that finds nothing leaves the property out (paths are relative to the item)
    assert first["properties"] == {"currency": "EUR", "webhook": "shop"}


def test_items_that_cannot_be_mapped_become_rejections_with_reasons_and_the_rest_pass() -> None:
    hooks = receiver()
    body = delivery(
        paid(1),
        paid(2, kind="order.refunded"),  # no event type for it
        paid(3, customer={}),  # no user
        paid(4, created_at="yesterday"),  # no time
        paid(5, total="lots"),  # no number
        "not an object",
        paid(7, created_at="2090-01-01T00:00:00Z"),  # maps, but the contract refuses it
    )
    received = hooks.check(hooks.verify("shop", signed(body), body), POLICY, 100)
    assert len(received.checked.batch) == 1
    assert [(r.index, r.reason) for r in received.checked.rejected] == [
        (1, RejectReason.UNKNOWN_TYPE),
        (2, RejectReason.MISSING_USER),
        (3, RejectReason.BAD_TIMESTAMP),
        (4, RejectReason.BAD_VALUE),
        (5, RejectReason.SCHEMA),
        (6, RejectReason.BAD_TIMESTAMP),
    ]
    assert all(
        r.detail.startswith(f"webhook shop item {r.index}: ") for r in received.checked.rejected
    )
    assert orjson.loads(received.checked.rejected[0].raw)["kind"] == "order.refunded"


def test_unknown_vendor_event_names_can_be_skipped_instead() -> None:
    hooks = receiver(shop={**SHOP, "unknown_types": "skip"})
    body = delivery(paid(1), paid(2, kind="order.refunded"))
    received = hooks.check(hooks.verify("shop", signed(body), body), POLICY, 100)
    assert len(received.checked.batch) == 1 and received.skipped == 1
    assert not received.checked.rejected


def test_without_a_vendor_id_event_ids_derive_from_the_body_and_position_deterministically() -> (
    None
):
    fields = {k: v for k, v in SHOP["fields"].items() if k != "event_id"}
    hooks = receiver(shop={**SHOP, "fields": fields})
    body = delivery(paid(1), paid(2))
    ids = [
        hooks.check(
            hooks.verify("shop", signed(body, at), body), POLICY, 100
        ).checked.batch.event_id
        for at in (NOW, NOW - 10)  # re-signed later: the same ids
    ]
    assert ids[0] == ids[1] and len(set(ids[0])) == 2
    assert all(i.startswith("wh.shop.") for i in ids[0])
    other = delivery(paid(1), paid(3))
    assert (
        hooks.check(hooks.verify("shop", signed(other), other), POLICY, 100).checked.batch.event_id[
            0
        ]
        != ids[0][0]
    )


def test_a_body_without_items_is_refused_whole_and_too_many_items_are_refused() -> None:
    hooks = receiver()
    for body, reason in (
        (b"not json", RejectReason.INVALID_JSON),
        (b'{"data": 1}', RejectReason.SCHEMA),
    ):
        received = hooks.check(hooks.verify("shop", signed(body), body), POLICY, 100)
        assert not received.usable
        (rejection,) = received.checked.rejected
        assert (rejection.index, rejection.reason, rejection.raw) == (-1, reason, body)
    body = delivery(*(paid(i) for i in range(3)))
    with pytest.raises(DeliveryTooLarge):
        hooks.check(hooks.verify("shop", signed(body), body), POLICY, 2)


def test_one_object_at_the_items_path_is_one_item_and_default_types_apply() -> None:
    hooks = receiver(
        hook={
            "secret": SECRET,
            "fields": {"user_id": "user"},
            "default_type": "signup",
            "timestamp": {"header": "X-Timestamp"},
        }
    )
    body = b'{"user": "u-1"}'
    stamp = str(int(NOW))
    headers = {"x-timestamp": stamp, "x-signature": sign(SECRET, stamp, body)}
    received = hooks.check(hooks.verify("hook", headers, body), POLICY, 100)
    row = received.checked.batch.event_dict(0)
    assert (row["user_id"], row["type"], row["ts"]) == ("u-1", "signup", int(NOW) * 1000)


def test_paths_are_dotted_or_json_pointers() -> None:
    doc = {"a": {"b": [10, {"c/d": 2}]}}
    assert lookup(doc, "a.b.0") == 10
    assert lookup(doc, "/a/b/1/c~1d") == 2
    assert lookup(doc, "a.x") is lookup(doc, "a.b.7")  # both missing


# --- signatures and time window ---------------------------------------------------------------


def test_a_missing_wrong_or_foreign_signature_is_refused() -> None:
    hooks = receiver()
    body = delivery(paid(1))
    good = signed(body)
    cases = [
        ({"X-Shop-Timestamp": good["X-Shop-Timestamp"]}, "missing_signature"),
        ({"X-Shop-Signature": good["X-Shop-Signature"]}, "missing_timestamp"),
        (signed(body, secret="another-secret-0123456789"), "bad_signature"),
        ({**good, "X-Shop-Signature": "sha256=zz"}, "bad_signature"),
        ({**good, "X-Shop-Timestamp": str(int(NOW) + 1)}, "bad_signature"),  # stamp is signed
    ]
    for headers, reason in cases:
        with pytest.raises(SignatureRefused) as refused:
            hooks.verify("shop", headers, body)
        assert refused.value.reason == reason
        assert SECRET not in str(refused.value)
    with pytest.raises(SignatureRefused):
        hooks.verify("shop", good, body + b" ")  # the body is signed too


def test_one_of_several_signatures_may_match_during_a_key_rotation() -> None:
    hooks = receiver()
    body = delivery(paid(1))
    headers = signed(body)
    headers["X-Shop-Signature"] = "sha256=00ff " + headers["X-Shop-Signature"]
    assert hooks.verify("shop", headers, body).source == "shop"


def test_deliveries_outside_the_time_window_are_refused_as_stale() -> None:
    hooks = receiver()
    body = delivery(paid(1))
    for at in (NOW - 301, NOW + 301):
        with pytest.raises(ReplayRefused) as refused:
            hooks.verify("shop", signed(body, at), body)
        assert refused.value.reason == "stale_timestamp"
    assert hooks.verify("shop", signed(body, NOW - 299), body).sent_ms == int(NOW - 299) * 1000


def test_a_body_only_signature_with_the_time_in_the_body_base64_encoded() -> None:
    hooks = receiver(
        gh={
            "secret": SECRET,
            "signature": {
                "header": "X-Hub-Signature",
                "payload": "body",
                "prefix": "v1,",
                "encoding": "base64",
            },
            "timestamp": {"header": None, "field": "sent_ms", "format": "epoch_ms"},
            "fields": {"user_id": "who", "type": "what"},
        }
    )
    body = orjson.dumps({"sent_ms": int(NOW * 1000), "who": "u", "what": "like"})
    header = "v1," + base64.b64encode(mac(SECRET, body)).decode()
    verified = hooks.verify("gh", {"X-Hub-Signature": header}, body)
    assert hooks.check(verified, POLICY, 10).checked.batch.event_dict(0)["type"] == "like"
    stale = orjson.dumps({"sent_ms": int(NOW * 1000) - 600_000, "who": "u", "what": "like"})
    header = "v1," + base64.b64encode(mac(SECRET, stale)).decode()
    with pytest.raises(ReplayRefused):
        hooks.verify("gh", {"X-Hub-Signature": header}, stale)


def test_an_unknown_source_is_refused() -> None:
    with pytest.raises(UnknownSource):
        receiver().verify("nope", {}, b"")


# --- replays ------------------------------------------------------------------------------------


def test_a_delivery_is_taken_once_within_its_window_and_again_if_publishing_failed() -> None:
    hooks = receiver()
    body = delivery(paid(1))
    headers = signed(body)
    with pytest.raises(RuntimeError), hooks.claimed(hooks.verify("shop", headers, body)):
        raise RuntimeError("NATS did not acknowledge")
    with hooks.claimed(hooks.verify("shop", headers, body)):  # the vendor's retry is taken
        pass
    with (
        pytest.raises(ReplayRefused) as refused,
        hooks.claimed(hooks.verify("shop", headers, body)),
    ):
        pass
    assert refused.value.reason == "replayed"
    with hooks.claimed(hooks.verify("shop", signed(body, NOW - 1), body)):  # re-signed: new MAC
        pass
    with pytest.raises(SignatureRefused):
        hooks.verify("shop", {}, body)
    counters = hooks.answer()
    assert counters["taken"] == 2 and counters["remembered"] == 2
    assert counters["refused"] == {"replayed": 1, "missing_signature": 1}


def test_a_replay_whose_window_closes_between_verify_and_claim_is_refused() -> None:
    now = [NOW]
    config = InboundSources.model_validate({"sources": {"shop": SHOP}})
    hooks = InboundWebhooks(config, clock=lambda: now[0])
    body = delivery(paid(1))
    headers = signed(body, NOW - 299)
    with hooks.claimed(hooks.verify("shop", headers, body)):  # the original, on time
        pass
    replay = hooks.verify("shop", headers, body)  # 1 s before its window closes
    now[0] += 2  # publishing waited: the memory forgets the original
    with pytest.raises(ReplayRefused) as refused, hooks.claimed(replay):
        pass
    assert refused.value.reason == "stale_timestamp"
    assert hooks.answer()["taken"] == 1


def test_the_replay_memory_forgets_closed_windows_and_stays_bounded() -> None:
    guard = ReplayGuard(max_entries=3)
    assert guard.claim(b"a", expires_ms=100, now_ms=0)
    assert not guard.claim(b"a", expires_ms=100, now_ms=50)
    assert guard.claim(b"a", expires_ms=300, now_ms=100)  # its window closed: forgotten
    for key in (b"b", b"c", b"d"):
        assert guard.claim(key, expires_ms=1000, now_ms=200)
    assert len(guard) == 3 and guard.forgotten_early == 1


# --- configuration ------------------------------------------------------------------------------


def test_sources_load_from_json_with_secrets_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOP_HOOK_SECRET", SECRET)
    source = {k: v for k, v in SHOP.items() if k != "secret"} | {"secret_env": "SHOP_HOOK_SECRET"}
    path = tmp_path / "sources.json"
    path.write_text(json.dumps({"sources": {"shop": source}}))
    loaded = load_sources(path)
    assert loaded.sources["shop"].key == SECRET
    assert SECRET not in repr(loaded) and SECRET not in str(loaded)
    monkeypatch.delenv("SHOP_HOOK_SECRET")
    with pytest.raises(ValueError, match="SHOP_HOOK_SECRET"):
        load_sources(path)


def test_the_example_config_in_deploy_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    example = Path(__file__).parents[2] / "deploy" / "webhook-sources.example.json"
    raw = json.loads(example.read_text())
    for source in raw["sources"].values():
        monkeypatch.setenv(source["secret_env"], "x" * 32)
    assert set(load_sources(example).sources) == set(raw["sources"])


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"secret": "short"}, "16 characters"),
        ({"secret_env": "X"}, "exactly one"),
        ({"fields": {"user_id": "u"}}, "default_type"),
        ({"signature": {"payload": "body"}}, "body field"),
        ({"event_types": {"x": "teleport"}}, "event_types"),
        ({"fields": {"user_id": "u", "type": "t", "properties": {"webhook": "x"}}}, "reserved"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_source_configs_are_refused_with_the_reason(
    tmp_path: Path, change: dict[str, Any], problem: str
) -> None:
    path = tmp_path / "sources.json"
    path.write_text(json.dumps({"sources": {"shop": {**SHOP, **change}}}))
    with pytest.raises(ValueError, match=problem) as refused:
        load_sources(path)
    assert SECRET not in str(refused.value)


def test_a_bad_source_name_or_unreadable_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_sources(tmp_path / "missing.json")
    path = tmp_path / "sources.json"
    path.write_text(json.dumps({"sources": {"Bad Name": SHOP}}))
    with pytest.raises(ValueError):
        load_sources(path)
    assert SourceConfig.model_validate(SHOP).key == SECRET


def test_the_launcher_loads_the_sources_setting_and_refuses_a_bad_file(tmp_path: Path) -> None:
    from actors.errors import AudienceError
    from cluster.launcher import webhooks_of
    from cluster.settings import Settings

    def settings(path: Path | None) -> Settings:
        return Settings(webhook_sources=path, _env_file=None)  # type: ignore[call-arg]

    assert webhooks_of(settings(None)).sources == {}
    path = tmp_path / "sources.json"
    path.write_text(json.dumps({"sources": {"shop": SHOP}}))
    assert set(webhooks_of(settings(path)).sources) == {"shop"}
    path.write_text(json.dumps({"sources": {"shop": {**SHOP, "secret": "short"}}}))
    with pytest.raises(AudienceError, match="16 characters"):
        webhooks_of(settings(path))
