"""API keys: scopes, the owner-only key store file, and constant-time verification.

A key reads ``aud_<id>_<secret>``: the id (16 hex digits) finds its record, the
secret (32 random bytes, URL-safe base64) is checked against the record's salted
SHA-256 with :func:`hmac.compare_digest`. Only hashes are stored or handed to the
API replicas; a key is shown once, when it is made. A fast hash is enough here:
the secrets are random and long, so there is nothing to guess from a hash.

Plain Python (no Ray, no FastAPI): the CLI writes the store, the replicas read it.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

PREFIX = "aud"
HASH_SCHEME = "sha256"
STORE_VERSION = 1


class Scope(str, enum.Enum):
    """What a key may do. ``admin`` grants the other two as well."""

    INGEST = "ingest"  # POST /v1/events
    READ = "read"  # every GET of data (profiles, insights, models, status)
    ADMIN = "admin"  # deletion, model rollout, checkpoints; implies ingest and read


@dataclass(frozen=True)
class KeyRecord:
    """One stored key: never the key itself, only its salted hash.

    Attributes:
        id: public part of the key, finds the record.
        scopes: scope names the key grants.
        hash: ``sha256:<salt hex>:<digest hex>`` of the secret part.
        created: when the key was made, RFC 3339 UTC.
        name: a note for people (who or what uses the key).
        rate_per_s: requests per second this key may make (per API replica);
            None: the platform's default.
        burst: requests it may make at once before the rate applies; None: the default.
    """

    id: str
    scopes: tuple[str, ...]
    hash: str = field(repr=False)
    created: str = ""
    name: str = ""
    rate_per_s: float | None = None
    burst: float | None = None

    def grants(self, scope: Scope) -> bool:
        """Whether this key may do what ``scope`` guards (admin may do everything)."""
        return scope.value in self.scopes or Scope.ADMIN.value in self.scopes

    def public(self) -> dict[str, object]:
        """What may be shown about the key: everything but its hash."""
        shown = asdict(self)
        del shown["hash"]
        shown["scopes"] = list(self.scopes)
        return shown


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def new_key(
    scopes: Iterable[Scope | str],
    name: str = "",
    rate_per_s: float | None = None,
    burst: float | None = None,
) -> tuple[str, KeyRecord]:
    """A fresh random key and the record that verifies it.

    Raises:
        ValueError: no scope, or an unknown one; a rate that is not > 0 or a burst below 1
            (a negative rate would never refuse, a burst below 1 never admit).
    """
    wanted = tuple(sorted({Scope(s).value for s in scopes}))
    if not wanted:
        raise ValueError("a key needs at least one scope: ingest, read or admin")
    if rate_per_s is not None and not rate_per_s > 0:
        raise ValueError(f"a key's rate must be > 0 requests/s, got {rate_per_s}")
    if burst is not None and not burst >= 1:
        raise ValueError(f"a key's burst must be >= 1, got {burst}")
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    record = KeyRecord(
        id=key_id,
        scopes=wanted,
        hash=f"{HASH_SCHEME}:{salt.hex()}:{_digest(salt, secret).hex()}",
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        name=name,
        rate_per_s=rate_per_s,
        burst=burst,
    )
    return f"{PREFIX}_{key_id}_{secret}", record


_DUMMY_SALT = bytes(16)
_DUMMY_DIGEST = _digest(_DUMMY_SALT, "")


class KeyRing:
    """The keys an API replica accepts, by id; verifies a presented key in constant time."""

    def __init__(self, records: Iterable[KeyRecord]) -> None:
        self._by_id = {r.id: r for r in records}

    def __len__(self) -> int:
        return len(self._by_id)

    def verify(self, presented: str) -> KeyRecord | None:
        """The record of a valid key, or None (malformed, unknown or wrong secret).

        The same hash work is done whether or not the id is known, and the
        digests are compared with :func:`hmac.compare_digest`.
        """
        prefix, _, rest = presented.partition("_")
        key_id, _, secret = rest.partition("_")
        record = self._by_id.get(key_id) if prefix == PREFIX and secret else None
        salt, expected = _DUMMY_SALT, _DUMMY_DIGEST
        if record is not None:
            parts = record.hash.split(":")
            try:
                if len(parts) != 3 or parts[0] != HASH_SCHEME:
                    raise ValueError(f"unknown hash scheme of key {record.id}")
                salt, expected = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
            except ValueError:
                record = None
        matches = hmac.compare_digest(_digest(salt, secret), expected)
        return record if record is not None and matches else None


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


class KeyStore:
    """The key records in one JSON file (hashes only, mode 0600), shared by CLI and replicas.

    Changes are whole-file atomic replacements under a lock file, so a reader
    never sees half a store and two ``audience keys create`` never lose a key.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        """Whether the store file exists (absent: the platform never made a key here)."""
        return self.path.exists()

    def load(self) -> list[KeyRecord]:
        """Every record; none when the file does not exist.

        Raises:
            ValueError: the file is not a key store.
        """
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        if not isinstance(doc, dict) or doc.get("version") != STORE_VERSION:
            raise ValueError(f"{self.path} is not an audience key store (version 1)")
        return [
            KeyRecord(**{**item, "scopes": tuple(item["scopes"])}) for item in doc.get("keys", [])
        ]

    def _save(self, records: list[KeyRecord]) -> None:
        doc = {"version": STORE_VERSION, "keys": [asdict(r) for r in records]}
        write_private(self.path, json.dumps(doc, indent=1) + "\n")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def add(self, record: KeyRecord) -> None:
        """Store one more record."""
        with self._locked():
            self._save([*self.load(), record])

    def create(
        self,
        scopes: Iterable[Scope | str],
        name: str = "",
        rate_per_s: float | None = None,
        burst: float | None = None,
    ) -> tuple[str, KeyRecord]:
        """Make a key, store its record, return both (the key is not kept anywhere)."""
        key, record = new_key(scopes, name, rate_per_s, burst)
        self.add(record)
        return key, record

    def revoke(self, key_id: str) -> bool:
        """Remove a key's record; whether there was one."""
        with self._locked():
            records = self.load()
            kept = [r for r in records if r.id != key_id]
            if len(kept) == len(records):
                return False
            self._save(kept)
            return True
