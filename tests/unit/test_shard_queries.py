"""Per-request shard reads over NATS: data both ways (no pickle), errors raised as themselves."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from actors.batch import EventBatch
from actors.codec import encode
from actors.delivery import Delivery
from actors.errors import NotOwner, ShardRecovering
from actors.events import Event
from actors.partitioning import partition_of
from actors.shard import Shard
from actors.shard_queries import (
    QueryError,
    answer,
    decode_answer,
    decode_request,
    decode_rows,
    encode_request,
    encode_rows,
    query_subject,
)
from actors.state import _ROW_ARRAYS, UserRows
from tests.support.events import event, random_batch
from tests.unit.test_shard import deliveries_of


@pytest.fixture(scope="module")
def shard() -> Shard:
    shard = Shard(0, range(4))
    shard.apply(deliveries_of(random_batch(3000, 120), 4))
    traits = {"plan": "pro", "seats": 3, "trial": True, "score": 0.5}
    traits_event = event("u7", "identify", "2023-11-16T00:00:00Z", traits=traits)
    known = Event.model_validate_json(orjson.dumps(traits_event))
    body = encode(EventBatch.from_events([known]))
    shard.apply([Delivery(partition_of("u7", 4), 10_000, 0, 0, body)])
    return shard


def assert_same_rows(got: UserRows, want: UserRows) -> None:
    for name in _ROW_ARRAYS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), name
    for name in ("user_ids", "recent", "affinity", "traits", "half_life_ms"):
        assert getattr(got, name) == getattr(want, name), name


def test_rows_cross_as_data_and_come_back_equal(shard: Shard) -> None:
    users = [*shard.user_ids(50), "u7", "nobody-here"]
    want = shard.user_rows(users)
    assert want.held.tolist() == [True] * 51 + [False] and any(want.recent)
    assert want.traits[50] == {"plan": "pro", "seats": 3, "trial": True, "score": 0.5}
    got = decode_rows(encode_rows(want))
    assert_same_rows(got, want)
    got.counts[0, 0] += 1  # a writable copy, not a view of the message
    assert_same_rows(decode_rows(encode_rows(shard.user_rows([]))), shard.user_rows([]))


def test_a_rows_answer_with_an_object_array_or_a_wrong_length_is_refused(shard: Shard) -> None:
    rows = shard.user_rows(shard.user_ids(3))
    data = encode_rows(rows)
    with pytest.raises(QueryError, match="shorter"):
        decode_rows(data[:-1])
    with pytest.raises(QueryError, match="longer"):
        decode_rows(data + b"\0")
    with pytest.raises(QueryError, match="not numeric"):
        decode_rows(_with_dtype(data, 0, "|O"))
    with pytest.raises(QueryError, match="not a rows answer"):
        decode_rows(b"\0\0\0\x05{oops")


def _with_dtype(data: bytes, index: int, dtype: str) -> bytes:
    """``data`` with the dtype of array ``index`` in its header replaced."""
    size = int.from_bytes(data[:4], "big")
    header = orjson.loads(data[4 : 4 + size])
    header["arrays"][index][0] = dtype
    raw = orjson.dumps(header)
    return len(raw).to_bytes(4, "big") + raw + data[4 + size :]


def test_the_shard_side_answers_reads_and_sends_errors_back_as_their_types(shard: Shard) -> None:
    users = shard.user_ids(5)

    def ask(method: str, arg: list) -> object:
        return shard.user_rows(arg) if method == "user_rows" else shard.seen(arg)

    rows = decode_answer("user_rows", answer(encode_request("user_rows", users), ask))
    assert_same_rows(rows, shard.user_rows(users))
    item = rows.recent[0][0]
    pairs = [(users[0], [item, "never-an-item"])]
    assert decode_answer("seen", answer(encode_request("seen", pairs), ask)) == [[True, False]]

    def not_owner(method: str, arg: list) -> object:
        raise NotOwner(3, [5, 6])

    with pytest.raises(NotOwner) as owner:
        decode_answer("seen", answer(encode_request("seen", pairs), not_owner))
    assert (owner.value.shard, owner.value.partitions) == (3, [5, 6])

    def recovering(method: str, arg: list) -> object:
        raise ShardRecovering(2, "replaying its partitions (7 stream sequences to go)")

    with pytest.raises(ShardRecovering, match="7 stream sequences") as late:
        decode_answer("user_rows", answer(encode_request("user_rows", users), recovering))
    assert late.value.shard == 2

    def broken(method: str, arg: list) -> object:
        raise KeyError("bug")

    with pytest.raises(QueryError, match="KeyError"):
        decode_answer("user_rows", answer(encode_request("user_rows", users), broken))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"not json", "not a query"),
        (b'{"method": "user_rows"}', "not a query"),
        (b'{"method": "checkpoint", "arg": []}', "unknown query"),
        (b'{"method": "user_rows", "arg": "u1"}', "not a list"),
    ],
)
def test_a_malformed_query_is_refused_with_its_reason(data: bytes, why: str) -> None:
    with pytest.raises(QueryError, match=why):
        decode_request(data)
    with pytest.raises(QueryError, match=why):
        decode_answer("seen", answer(data, lambda m, a: pytest.fail("must not be asked")))


def test_each_pool_and_shard_has_its_own_subject() -> None:
    assert (
        query_subject("AUDIENCE_EVENTS.audience", 3) == "audience.query.AUDIENCE_EVENTS.audience.3"
    )
    assert query_subject("S.a", 1) != query_subject("S.b", 1) != query_subject("S.a", 2)
