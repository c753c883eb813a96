"""Bad input through the real stack: any body gets a 202 or a clear 4xx, never a 5xx.

Hypothesis posts good and broken events, bodies that are not JSON or not
arrays, bad UTF-8 and huge bodies to ``POST /v1/events``; each answer must
account for every event sent, with the reason each defect earns, and each
rejection must reach the dead-letter stream. A plain test then sends one event
of every bad kind of issue 5 and counts one dead letter per kind.

The platform is shared by the session: events here belong to ``fuzz-`` users,
carry unique ids and, when good, are stamped in 2022 (see tests/support/bad_input.py).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections import Counter
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.jetstream import StreamNames, dead_letter_counts
from actors.nats_auth import connect
from actors.partitioning import events_subject, partition_of
from actors.validation import Rejection, RejectReason, parse_events
from cluster.launcher import Platform, policy_of
from serving.app import _unwrap_events
from tests.support.bad_input import Body, json_bodies, with_fresh_ids
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

STATUSES = {202, 400, 413, 415, 422}
MAX_BODY = 8 * 1024 * 1024
GOOD_TS = "2022-06-01T12:00:00Z"


def post(api: httpx.Client, raw: bytes) -> httpx.Response:
    return api.post("/v1/events", content=raw, headers={"content-type": "application/json"})


def dead_letters(platform: Platform) -> Counter[str]:
    """Dead letters held by the platform's stream, by reason."""

    async def counts() -> dict[str, int]:
        nc = await connect(platform.nats_url, platform.credentials("admin"))
        try:
            return await dead_letter_counts(nc.jetstream(), StreamNames())
        finally:
            await nc.close()

    return Counter(asyncio.run(counts()))


def events_in(raw: bytes) -> int | None:
    """How many events the API must account for: the array's length, or None for no array."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(doc, dict) and set(doc) == {"events"}:
        doc = doc["events"]
    return len(doc) if isinstance(doc, list) else None


def _huge(kind: str) -> Body:
    """Bodies beyond what one event or one request may be, built once."""
    if kind == "over_limit":  # 413 before parsing
        return Body(b"[" + b" " * MAX_BODY + b"]", None, None)
    if kind == "not_json":  # a 2 MiB dead letter would exceed NATS' max_payload
        return Body(b"\xff" * (2 * 1024 * 1024), None, RejectReason.INVALID_JSON)
    if kind == "big_event":  # one 1.5 MiB event: oversized
        item: dict[str, Any] = {"event_id": "x", "user_id": "fuzz-big", "type": "click"}
        item["ts"] = GOOD_TS
        item["properties"] = {"blob": "x" * (1536 * 1024)}
        return Body(orjson.dumps([item]), [RejectReason.OVERSIZED])
    if kind == "too_many":  # 10,001 events: 413
        return Body(b"[" + b",".join([b"1"] * 10_001) + b"]", None, None)
    raise ValueError(kind)


HUGE = ["over_limit", "not_json", "big_event", "too_many"]


def check_answer(body: Body, raw: bytes, answer: httpx.Response) -> Counter[str]:
    """Assert the answer accounts for every event; returns the reasons it dead-lettered."""
    assert answer.status_code in STATUSES, answer.text[:500]
    if answer.status_code != 422 and answer.status_code != 202:
        assert answer.status_code == 413, answer.text[:500]
        assert len(raw) > MAX_BODY or (events_in(raw) or 0) > 10_000
        return Counter()
    doc = answer.json()
    verdicts = [(r["index"], r["reason"]) for r in doc["rejected"]]
    assert all(r["detail"] for r in doc["rejected"])
    assert {reason for _, reason in verdicts} <= {r.value for r in RejectReason}
    assert (answer.status_code == 422) == bool(verdicts)
    if body.expected is not None:
        expected = [(i, why.value) for i, why in enumerate(body.expected) if why is not None]
        assert verdicts == expected
        assert doc["accepted"] == body.expected.count(None)
    elif body.whole is not None:
        assert verdicts == [(-1, body.whole.value)] and doc["accepted"] == 0
    n = events_in(raw)
    if n is None:
        assert len(verdicts) == 1 and verdicts[0][0] == -1 and doc["accepted"] == 0
    else:
        assert doc["accepted"] + len(verdicts) == n
        assert [i for i, _ in verdicts] == sorted({i for i, _ in verdicts})
    return Counter(reason for _, reason in verdicts)


bodies = st.one_of(
    json_bodies(wrapped=True),
    json_bodies(wrapped=True),
    json_bodies(wrapped=True),
    st.sampled_from(HUGE).map(_huge),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
@given(body=bodies)
def test_any_body_gets_a_clear_answer_for_each_event_and_its_dead_letters(
    api: httpx.Client, platform: Platform, body: Body
) -> None:
    raw = with_fresh_ids(body.raw)
    before = dead_letters(platform)
    answer = post(api, raw)
    reasons = check_answer(body, raw, answer)
    # The dead letters the API published (acknowledged before it answered). The
    # stream may keep one of identical ones (same reason and bytes, see
    # actors/deadletter.py), so each one holding an id made for this request is
    # new, and others may have been sent before.
    fresh = set(re.findall(rb"fuzz-[0-9a-f-]{36}", raw))
    letters = _dead_letters_of(raw, platform) if reasons else []
    assert Counter(r.reason.value for r in letters) == reasons
    new = Counter(r.reason.value for r in letters if any(f in r.raw for f in fresh))
    delta = dead_letters(platform) - before
    assert new <= delta <= reasons, (delta, new, reasons)


def _dead_letters_of(raw: bytes, platform: Platform) -> list[Rejection]:
    """The rejections the API dead-letters for ``raw``, bytes and all (same code, in process)."""
    return parse_events(_unwrap_events(raw), policy_of(platform.settings)).rejected


def _event(user: str) -> dict[str, Any]:
    return {"event_id": f"fuzz-{uuid.uuid4()}", "user_id": user, "type": "click", "ts": GOOD_TS}


def _with(event: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**event, **fields}


def _without(event: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != name}


def _profile_events(api: httpx.Client, user: str) -> int:
    answer = api.get(f"/v1/users/{user}")
    return answer.json()["events"] if answer.status_code == 200 else 0


def test_each_kind_of_bad_input_lands_in_the_dead_letter_stream_with_its_reason(
    api: httpx.Client, platform: Platform
) -> None:
    user = f"fuzz-kinds-{uuid.uuid4().hex[:8]}"
    good = _event(user)
    tag = f"fuzz-{uuid.uuid4()}".encode()  # makes each dead letter unique in the session
    oversized = {f"p{i}": "x" * 512 for i in range(32)}
    kinds: list[tuple[str, bytes, str]] = [
        (
            "bad UTF-8",
            orjson.dumps([good]).replace(user.encode(), b"fuzz-\xff\xfe"),
            "invalid_json",
        ),
        ("not JSON", b"{this is not json " + tag, "invalid_json"),
        ("huge, not JSON", tag + b"\xff" * (2 * 1024 * 1024), "invalid_json"),
        ("wrong type of value", orjson.dumps([_with(_event(user), value="12")]), "bad_value"),
        ("wrong type of a map", orjson.dumps([_with(_event(user), traits=[1, 2])]), "schema"),
        ("unknown type", orjson.dumps([_with(_event(user), type="teleport")]), "unknown_type"),
        ("missing user", orjson.dumps([_without(_event(user), "user_id")]), "missing_user"),
        ("oversized", orjson.dumps([_with(_event(user), properties=oversized)]), "oversized"),
        (
            "huge event",
            orjson.dumps([_with(_event(user), properties={"blob": "x" * (1536 * 1024)})]),
            "oversized",
        ),
        (
            "far future",
            orjson.dumps([_with(_event(user), ts="2999-01-01T00:00:00Z")]),
            "bad_timestamp",
        ),
        (
            "ancient",
            orjson.dumps([_with(_event(user), ts="1969-07-20T20:17:40Z")]),
            "bad_timestamp",
        ),
    ]
    before = dead_letters(platform)
    for kind, raw, reason in kinds:
        answer = post(api, raw)
        assert answer.status_code == 422, (kind, answer.text[:300])
        assert [r["reason"] for r in answer.json()["rejected"]] == [reason], kind
    # The shard's side: a message on an event subject that is no batch. (Rows a
    # shard refuses in a well-formed batch are fuzzed in tests/unit/test_fuzz_codec.py:
    # here they would stay in the shared stream for every later reader.)
    partition = partition_of(user, platform.settings.partitions)

    async def publish() -> None:
        nc = await connect(platform.nats_url, platform.credentials("producer"))
        try:
            await nc.jetstream().publish(events_subject(partition), b"\x00 not a batch " + tag)
        finally:
            await nc.close()

    asyncio.run(publish())
    expected = Counter(reason for _, _, reason in kinds) + Counter(bad_wire=1)
    wait_until(lambda: dead_letters(platform) - before == expected, timeout_s=60)
    # The shard that owns the partition went on: a good event after it is applied.
    assert post(api, orjson.dumps([good])).status_code == 202
    wait_until(lambda: _profile_events(api, user) == 1, timeout_s=60)


def test_a_wrapped_array_nested_too_deeply_gets_a_verdict_per_event(api: httpx.Client) -> None:
    good = _event(f"fuzz-wrapped-{uuid.uuid4().hex[:8]}")
    deep = b"[" * 600 + b"]" * 600  # orjson reads it but cannot write it again
    answer = post(api, b'{"events": [' + orjson.dumps(good) + b"," + deep + b"]}")
    assert answer.status_code == 422, answer.text[:300]
    body = answer.json()
    assert body["accepted"] == 1
    assert [(r["index"], r["reason"]) for r in body["rejected"]] == [(1, "schema")]
