"""Where the partition layout lives: a JetStream key-value bucket, one key per pool.

The layout is the truth about ownership that outlives every actor: a shard
actor that Ray restarts reads which partitions are its own from here, not from
the arguments it was first created with. Writes are compare-and-set on the
key's revision, and a new layout is refused while the previous rescale has not
settled, so two rescales can neither both win nor overlap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from actors.errors import AudienceError
from actors.layout import Layout

LAYOUT_BUCKET = "AUDIENCE_LAYOUT"


@dataclass(frozen=True)
class StoredLayout:
    """A stored layout, its key revision, and whether its rescale finished.

    Attributes:
        settled: every shard follows it (a rescale stores its layout unsettled
            first, and settled once done); a new rescale waits for that.
        written_ms: when it was written, so an unsettled one left by a rescale
            that died can be overridden after a while.
    """

    layout: Layout
    revision: int
    settled: bool
    written_ms: int


class LayoutStore:
    """The stored layout of one pool (``scope``: stream and pool name)."""

    def __init__(self, js: JetStreamContext, scope: str, replicas: int = 1) -> None:
        self._js = js
        self.key = scope
        self.replicas = replicas
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            try:
                self._kv = await self._js.key_value(LAYOUT_BUCKET)
            except BucketNotFoundError:
                config = KeyValueConfig(
                    bucket=LAYOUT_BUCKET,
                    description="audience-insights partition layouts",
                    history=8,
                    storage=StorageType.FILE,
                    replicas=self.replicas,
                )
                self._kv = await self._js.create_key_value(config)
        return self._kv

    async def ensure(self) -> None:
        """Create the bucket now if it is missing (once, before shards race to)."""
        await self._bucket()

    async def load(self) -> StoredLayout | None:
        """The stored layout with its revision and state; None if none was stored yet."""
        kv = await self._bucket()
        try:
            entry = await kv.get(self.key)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        raw = orjson.loads(entry.value)
        return StoredLayout(
            Layout.from_json(raw),
            int(entry.revision or 0),
            bool(raw.get("settled", True)),
            int(raw.get("written_ms", 0)),
        )

    async def save(self, layout: Layout, revision: int, settled: bool) -> int:
        """Store ``layout`` if the key is still at ``revision`` (0: absent); the new revision.

        Raises:
            AudienceError: someone else changed the layout meanwhile.
        """
        kv = await self._bucket()
        value = orjson.dumps(
            {**layout.to_json(), "settled": settled, "written_ms": int(time.time() * 1000)}
        )
        try:
            if revision == 0:
                return int(await kv.create(self.key, value))
            return int(await kv.update(self.key, value, last=revision))
        except KeyWrongLastSequenceError as exc:
            raise AudienceError(
                f"layout of {self.key} changed meanwhile (expected revision {revision}): {exc!r}"
            ) from None
