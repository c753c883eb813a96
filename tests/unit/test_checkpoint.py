"""Snapshots: restore + replay from the saved positions equals an uninterrupted run."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actors.checkpoint import MAGIC, SnapshotError, decode_snapshot, encode_snapshot, read_header
from actors.checkpoint_store import FolderCheckpoints, partition_prefix, prune, snapshot_name
from actors.delivery import Delivery
from actors.events import TYPE_CODE, EventType
from actors.shard import Shard
from actors.state import StateRules
from tests.support.events import random_batch
from tests.unit.test_shard import deliveries_of

PARTITIONS = range(4)


def _canonical_pairs(partial: dict[str, Any]) -> dict[str, Any]:
    """A partial with its pairs by (a, b): they come in no particular order (the merge
    sums them by key), the order depending on the shard's internal slots."""
    if "pair_a" not in partial:
        return partial
    order = np.lexsort((partial["pair_b"], partial["pair_a"]))
    return partial | {k: partial[k][order] for k in ("pair_a", "pair_b", "pair_w")}


def observed(shard: Shard, users: list[str]) -> dict[str, Any]:
    """Everything a shard answers with, as plain data to compare."""
    partials = shard.insights_partials()
    rows = shard.user_rows(users)
    return {
        "profiles": shard.profiles(users),
        "engagement": partials["engagement"],
        "conversion": partials["conversion"],
        "retention": partials["retention"],
        "trends": partials["trends"],
        # Sizes only: entries and exits are counted where apply steps evaluate
        # membership, so they depend on how the stream was cut into steps.
        "segments": {
            name: segment["size"] for name, segment in partials["segments"]["segments"].items()
        },
        # Versions count apply steps, which depend on how the stream was cut.
        "items": {
            p: _canonical_pairs({k: v for k, v in (partial or {}).items() if k != "version"})
            for p, partial in shard.item_partials(50).items()
        },
        "positions": dict(shard.positions),
        "applied": shard.applied_events,
        "duplicates": shard.dedup.duplicates,
        "rejected": dict(shard.rejected),
        "rows": {
            "engagement": rows.engagement.tolist(),
            "sessions": rows.sessions.tolist(),
            "recent": rows.recent,
            "affinity": rows.affinity,
        },
    }


def stream_with_duplicates_and_garbage() -> list[Delivery]:
    """Deliveries of 8000 events, then the first 500 again in new messages, then garbage."""
    batch = random_batch(8000, 300, seed=11)
    batch.type[4321] = TYPE_CODE[EventType.USER_DELETED]
    deliveries = deliveries_of(batch, 4, per_message=250)
    last = max(d.seq for d in deliveries)
    again = deliveries_of(batch.take(np.arange(500)), 4, per_message=100)
    resent = [Delivery(d.partition, d.seq + last, d.stored_ns, 0, d.data) for d in again]
    garbage = Delivery(2, resent[-1].seq + 1, 0, 0, b"\xff not the wire format")
    return deliveries + resent + [garbage]


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Deep equality; floats equal up to rounding (decayed sums depend on step sizes)."""
    if isinstance(a, np.ndarray):
        a, b = a.tolist(), np.asarray(b).tolist()
    if isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("cut", [1, 17, 40, 75])
def test_restore_then_replay_from_positions_equals_an_uninterrupted_run(cut: int) -> None:
    deliveries = stream_with_duplicates_and_garbage()
    users = sorted({u for d in deliveries[:-1] for u in _users(d)})
    uninterrupted = Shard(0, PARTITIONS)
    for start in range(0, len(deliveries), 7):
        uninterrupted.apply(deliveries[start : start + 7])

    before = Shard(0, PARTITIONS)
    before.apply(deliveries[:cut])
    _, blob = before.snapshot(created_ms=1)
    restored = Shard(0, PARTITIONS)
    header = restored.restore(blob)
    assert header.positions == before.positions
    # The replay starts at the first partition position + 1; re-delivering
    # everything shows that older messages are skipped, not applied twice.
    for start in range(0, len(deliveries), 11):
        restored.apply(deliveries[start : start + 11])

    assert_same(observed(restored, users), observed(uninterrupted, users))


def _users(delivery: Delivery) -> list[str]:
    from actors.codec import decode

    return list(decode(delivery.data).user_id)


def test_a_deleted_user_is_gone_from_the_next_snapshot_and_after_restore() -> None:
    batch = random_batch(3000, 40, seed=3)
    victim = batch.user_id[0]
    shard = Shard(0, PARTITIONS)
    shard.apply(deliveries_of(batch, 4))
    _, before = shard.snapshot(created_ms=1)
    assert victim.encode() in before
    deletion = batch.take([0])
    deletion.event_id[0] = "delete-1"
    deletion.type[0] = TYPE_CODE[EventType.USER_DELETED]
    (message,) = deliveries_of(deletion, 4)
    deleted_at = Delivery(message.partition, 10_000, 0, 0, message.data)
    shard.apply([deleted_at])
    assert shard.profiles([victim]) == [None]

    _, after = shard.snapshot(created_ms=2)
    assert victim.encode() not in after  # not in any column, aggregate or pending batch
    again = Shard(0, PARTITIONS)
    again.restore(after)
    assert again.profiles([victim]) == [None]
    older = Shard(0, PARTITIONS)  # a snapshot from before the deletion, then the replay
    older.restore(before)
    older.apply([deleted_at])
    assert older.profiles([victim]) == [None]


def test_snapshot_header_names_shard_positions_and_counts() -> None:
    shard = Shard(3, PARTITIONS)
    shard.apply(deliveries_of(random_batch(500, 20), 4))
    header, blob = shard.snapshot(created_ms=123)
    assert blob.startswith(MAGIC)
    assert read_header(blob) == header
    assert (header.shard, header.created_ms, header.users) == (3, 123, 20)
    assert header.positions == shard.positions and header.applied_events == 500


def test_a_corrupt_or_truncated_snapshot_is_refused_and_the_state_is_kept() -> None:
    shard = Shard(0, PARTITIONS)
    shard.apply(deliveries_of(random_batch(500, 20), 4))
    _, blob = shard.snapshot(created_ms=1)
    target = Shard(0, PARTITIONS)
    flipped = bytearray(blob)
    flipped[-10] ^= 0xFF
    for bad, reason in [
        (bytes(flipped), "digest"),
        (blob[:-5], "bytes; header says"),
        (blob[:20], "truncated"),
        (b"something else entirely", "bad magic"),
    ]:
        with pytest.raises(SnapshotError, match=reason):
            target.restore(bad)
    assert len(target.table) == 0 and target.positions == {p: 0 for p in PARTITIONS}


def test_a_snapshot_of_another_format_settings_or_partitions_is_refused() -> None:
    shard = Shard(0, PARTITIONS)
    _, blob = shard.snapshot(created_ms=1)
    with pytest.raises(SnapshotError, match="another state configuration"):
        Shard(0, PARTITIONS, rules=StateRules(recent_items=5)).restore(blob)
    with pytest.raises(SnapshotError, match="partitions"):
        Shard(0, [0, 1]).restore(blob)
    _, other = encode_snapshot(0, {0: 1}, 1, "f", {})
    future = other.replace(b'"format":1', b'"format":9')
    with pytest.raises(SnapshotError, match="format 9"):
        decode_snapshot(future)


def test_folder_store_keeps_newest_snapshots_and_hides_unfinished_writes(tmp_path: Path) -> None:
    store = FolderCheckpoints(tmp_path)

    async def scenario() -> tuple[list[str], list[str], bytes]:
        for created in (3, 1, 2, 5):
            await store.save(snapshot_name("s", 7, created, created), f"blob-{created}".encode())
        await store.save(snapshot_name("s", 8, 4, 4), b"other shard")
        crashed = tmp_path / f".{snapshot_name('s', 7, 9, 9)}.partial"
        crashed.write_bytes(b"half a snap")  # a write that never finished
        deleted = await prune(store, "s", 7, keep=2)
        names = await store.names(partition_prefix("s", 7))
        return deleted, names, await store.load(names[-1])

    deleted, names, newest = asyncio.run(scenario())
    assert deleted == [snapshot_name("s", 7, 1, 1), snapshot_name("s", 7, 2, 2)]
    assert names == [snapshot_name("s", 7, 3, 3), snapshot_name("s", 7, 5, 5)]
    assert newest == b"blob-5"
    assert (tmp_path / snapshot_name("s", 8, 4, 4)).read_bytes() == b"other shard"
