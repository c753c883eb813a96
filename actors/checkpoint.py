"""Shard snapshots: one versioned, checksummed blob holding a shard's whole state.

Layout::

    MAGIC (8 bytes) | header length (4 bytes, big-endian) | header (JSON) | body

The header says what the snapshot is without reading the body: format version,
shard, partitions, the stream position of each partition, when it was taken,
the fingerprint of the state-shaping configuration, and the body's length and
SHA-256. The body is a pickle (protocol 5) of the shard's state: numpy columns
and the project's own aggregate classes, written at memory speed. Snapshots are
read only from the platform's own store; the digest catches truncation and
corruption, not forgery (see the README's security notes).

A reader refuses, with a :class:`SnapshotError` naming the reason, a blob of
another format version, another configuration, or a bad digest; the shard then
falls back to an older snapshot or to a full replay.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from dataclasses import asdict, dataclass
from typing import Any

from actors.errors import AudienceError

SNAPSHOT_FORMAT = 1
MAGIC = b"AUDSNAP\x00"
_LENGTH = struct.Struct(">I")


class SnapshotError(AudienceError):
    """A blob is not a usable snapshot (wrong format, version, configuration or digest)."""


@dataclass(frozen=True)
class SnapshotHeader:
    """What a snapshot holds, readable without unpickling its body.

    Attributes:
        format: the snapshot format version (``SNAPSHOT_FORMAT`` when written).
        shard: the shard that took it.
        positions: partition -> last stream sequence applied into the state.
        created_ms: wall-clock time it was taken (epoch milliseconds).
        fingerprint: digest of the configuration that shapes the state.
        body_bytes: length of the body.
        body_sha256: hex digest of the body.
        applied_events: events applied into the state, for operators.
        users: users held, for operators.
    """

    format: int
    shard: int
    positions: dict[int, int]
    created_ms: int
    fingerprint: str
    body_bytes: int
    body_sha256: str
    applied_events: int = 0
    users: int = 0

    @property
    def partitions(self) -> list[int]:
        """The partitions the snapshot covers."""
        return sorted(self.positions)


def encode_snapshot(
    shard: int,
    positions: dict[int, int],
    created_ms: int,
    fingerprint: str,
    state: dict[str, Any],
    applied_events: int = 0,
    users: int = 0,
) -> tuple[SnapshotHeader, bytes]:
    """The header and the blob of a snapshot of ``state``."""
    body = pickle.dumps(state, protocol=5)
    header = SnapshotHeader(
        format=SNAPSHOT_FORMAT,
        shard=shard,
        positions=dict(positions),
        created_ms=created_ms,
        fingerprint=fingerprint,
        body_bytes=len(body),
        body_sha256=hashlib.sha256(body).hexdigest(),
        applied_events=applied_events,
        users=users,
    )
    head = json.dumps(asdict(header), separators=(",", ":")).encode()
    return header, b"".join((MAGIC, _LENGTH.pack(len(head)), head, body))


def read_header(blob: bytes | memoryview) -> SnapshotHeader:
    """The header of a snapshot blob (the body is not checked).

    Raises:
        SnapshotError: not a snapshot, or a format this code cannot read.
    """
    view = memoryview(blob)
    if bytes(view[: len(MAGIC)]) != MAGIC or len(view) < len(MAGIC) + _LENGTH.size:
        raise SnapshotError("not a shard snapshot (bad magic)")
    (length,) = _LENGTH.unpack_from(view, len(MAGIC))
    start = len(MAGIC) + _LENGTH.size
    if start + length > len(view):
        raise SnapshotError("truncated snapshot header")
    try:
        raw = json.loads(bytes(view[start : start + length]))
    except ValueError as exc:
        raise SnapshotError(f"unreadable snapshot header: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != SNAPSHOT_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise SnapshotError(f"snapshot format {found!r}; this code reads {SNAPSHOT_FORMAT}")
    try:
        raw["positions"] = {int(p): int(s) for p, s in raw["positions"].items()}
        return SnapshotHeader(**raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"bad snapshot header: {exc!r}") from None


def decode_snapshot(
    blob: bytes | memoryview, fingerprint: str | None = None
) -> tuple[SnapshotHeader, dict[str, Any]]:
    """The header and the state of a snapshot blob, checked.

    Args:
        fingerprint: when given, the configuration fingerprint the snapshot must have.

    Raises:
        SnapshotError: wrong format, truncated, digest mismatch or another configuration.
    """
    header = read_header(blob)
    view = memoryview(blob)
    (length,) = _LENGTH.unpack_from(view, len(MAGIC))
    body = view[len(MAGIC) + _LENGTH.size + length :]
    if len(body) != header.body_bytes:
        raise SnapshotError(f"snapshot body is {len(body)} bytes; header says {header.body_bytes}")
    if hashlib.sha256(body).hexdigest() != header.body_sha256:
        raise SnapshotError("snapshot body does not match its digest (corrupt)")
    if fingerprint is not None and header.fingerprint != fingerprint:
        raise SnapshotError(
            "snapshot was taken under another state configuration "
            f"({header.fingerprint[:12]} != {fingerprint[:12]})"
        )
    try:
        state = pickle.loads(body)
    except Exception as exc:  # a class changed shape since it was written
        raise SnapshotError(f"snapshot body cannot be loaded by this code: {exc!r}") from None
    if not isinstance(state, dict):
        raise SnapshotError("snapshot body is not a state mapping")
    return header, state


def fingerprint_of(*config: object) -> str:
    """A digest of configuration objects (frozen dataclasses: their repr is their value)."""
    return hashlib.sha256(repr(config).encode()).hexdigest()
