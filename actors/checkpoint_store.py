"""Where shard snapshots live: the JetStream object store (default) or a folder.

Both stores write atomically: a reader finds a snapshot under its name only
once it is complete, and a crash mid-write leaves the earlier snapshots as they
were. Every snapshot gets a new name (``<scope>.p0003.<position>.<created_ms>``
for partition 3, the scope naming the stream and pool it belongs to), so the
furthest on is the last name in sort order and pruning deletes the rest.

* :class:`ObjectStoreCheckpoints`: a JetStream object store bucket. An object's
  chunks are published first and its metadata last, so an object appears whole
  or not at all. No extra component; replicated like the streams.
* :class:`FolderCheckpoints`: files written to a temporary name, fsynced and
  renamed into place (a rename is atomic on POSIX file systems).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from nats.js import JetStreamContext
from nats.js.api import ObjectMeta, ObjectMetaOptions, ObjectStoreConfig, StorageType
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.object_store import ObjectStore

CHUNK_BYTES = 512 * 1024  # below NATS' default 1 MiB max_payload, with room for headers
LOAD_TIMEOUT_S = 5.0  # plus the size at LOAD_MIN_BYTES_PER_S: a stalled transfer is retried
LOAD_MIN_BYTES_PER_S = 20e6


@dataclass(frozen=True)
class CheckpointConfig:
    """Where shards keep snapshots and how often they take them.

    Attributes:
        bucket: JetStream object store bucket (the default store).
        folder: a folder instead of the bucket, when set.
        interval_s: seconds between timed snapshots (0: only on demand).
        keep: snapshots kept per partition; older ones are pruned.
        replicas: object store replicas (match the stream's on a NATS cluster).
        on_stop: take a last snapshot when a shard is stopped, for a fast next start.
        scope: what the snapshots belong to (the pool sets stream and pool name),
            so that pools sharing a store never restore each other's state.
    """

    bucket: str = "AUDIENCE_CHECKPOINTS"
    folder: str | None = None
    interval_s: float = 60.0
    keep: int = 3
    replicas: int = 1
    on_stop: bool = True
    scope: str = "default"

    def open(self, js: JetStreamContext) -> CheckpointStore:
        """The store this config names."""
        if self.folder:
            return FolderCheckpoints(Path(self.folder))
        return ObjectStoreCheckpoints(js, self.bucket, self.replicas)


def snapshot_name(scope: str, partition: int, position: int, created_ms: int) -> str:
    """The name of a snapshot: sorts by scope and partition, then by stream position.

    Sorting by position, not by time, makes "newest" mean "furthest on",
    whichever shard (and clock) took it; two snapshots at one position hold
    the same state, and the later one sorts last.
    """
    return f"{partition_prefix(scope, partition)}{position:015d}.{created_ms:015d}"


def partition_prefix(scope: str, partition: int) -> str:
    """The name prefix of one partition's snapshots (whichever shard took them)."""
    return f"{scope}.p{partition:04d}."


def partition_of_name(scope: str, name: str) -> int | None:
    """The partition a snapshot name belongs to, or None for a name of another scope."""
    head = f"{scope}.p"
    if not name.startswith(head):
        return None
    digits = name[len(head) :].split(".", 1)[0]
    return int(digits) if digits.isdigit() else None


class CheckpointStore(Protocol):
    """Named, immutable blobs, written atomically."""

    async def save(self, name: str, blob: bytes) -> None:
        """Store ``blob`` under ``name``; visible only once complete."""

    async def load(self, name: str) -> bytes:
        """The blob stored under ``name``."""

    async def names(self, prefix: str) -> list[str]:
        """Names starting with ``prefix``, sorted."""

    async def delete(self, name: str) -> None:
        """Remove ``name`` (no error if it is gone)."""


async def prune(store: CheckpointStore, scope: str, partition: int, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` snapshots of ``partition``; the names deleted."""
    names = await store.names(partition_prefix(scope, partition))
    old = names[: max(0, len(names) - keep)]
    for name in old:
        await store.delete(name)
    return old


class FolderCheckpoints:
    """Snapshots as files in a folder (a mounted volume, a laptop's data folder)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    async def save(self, name: str, blob: bytes) -> None:
        await asyncio.to_thread(self._write, name, blob)

    def _write(self, name: str, blob: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / name
        partial = self.folder / f".{name}.partial"
        with open(partial, "wb") as out:
            out.write(blob)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, final)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a power cut
        finally:
            os.close(fd)

    async def load(self, name: str) -> bytes:
        return await asyncio.to_thread((self.folder / name).read_bytes)

    async def names(self, prefix: str) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir() if p.name.startswith(prefix))

    async def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.folder / name).unlink()


class ObjectStoreCheckpoints:
    """Snapshots as objects in a JetStream object store bucket (created if missing)."""

    def __init__(self, js: JetStreamContext, bucket: str, replicas: int = 1) -> None:
        self._js = js
        self.bucket = bucket
        self.replicas = replicas
        self._store: ObjectStore | None = None

    async def _bucket(self) -> ObjectStore:
        if self._store is None:
            try:
                self._store = await self._js.object_store(self.bucket)
            except BucketNotFoundError:
                config = ObjectStoreConfig(
                    description="audience-insights shard snapshots",
                    storage=StorageType.FILE,
                    replicas=self.replicas,
                )
                self._store = await self._js.create_object_store(self.bucket, config)
        return self._store

    async def ensure(self) -> None:
        """Create the bucket now if it is missing (once, before shards need it)."""
        await self._bucket()

    async def save(self, name: str, blob: bytes) -> None:
        store = await self._bucket()
        meta = ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=CHUNK_BYTES))
        await store.put(name, blob, meta=meta)

    async def load(self, name: str) -> bytes:
        """The object's bytes.

        Raises:
            TimeoutError: the transfer stalled (NATS restarting mid-way: nats-py's
                ordered consumer can wait a long time); the caller tries again.
        """
        store = await self._bucket()
        info = await store.get_info(name)
        out = io.BytesIO()  # nats-py appends chunks to a bytes object otherwise (quadratic)
        budget_s = LOAD_TIMEOUT_S + (info.size or 0) / LOAD_MIN_BYTES_PER_S
        await asyncio.wait_for(store.get(name, writeinto=out), timeout=budget_s)
        return out.getvalue()

    async def names(self, prefix: str) -> list[str]:
        store = await self._bucket()
        try:
            infos = await asyncio.wait_for(store.list(ignore_deletes=True), LOAD_TIMEOUT_S * 2)
        except NotFoundError:  # an empty bucket
            return []
        return sorted(i.name for i in infos if i.name and i.name.startswith(prefix))

    async def delete(self, name: str) -> None:
        store = await self._bucket()
        with contextlib.suppress(NotFoundError):
            await store.delete(name)
