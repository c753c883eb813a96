"""NATS users of the embedded server: one per role, with least-privilege permissions.

The roles, and what each may do (``permissions`` is the table, plain Python):

- ``admin``: everything; the launcher creates the streams and the snapshot
  and layout buckets with it, ``audience train --from-stream`` reads the stream with it.
- ``shard``: consume the event stream (create, read and delete its consumers,
  read single messages), publish dead letters, read and write the snapshot
  object store and the partition layout key-value bucket, answer the
  per-request reads on ``audience.query.>`` (:mod:`actors.shard_queries`). It
  cannot publish events nor create or delete streams or buckets (the launcher
  makes them).
- ``api``: publish events (ingest, deletions) and their dead letters, publish
  alerts, read the streams' info (dead-letter counts) and single event
  messages (the retention check times the oldest one a restore needs). It
  cannot create consumers, so it cannot follow the event stream.
- ``producer``: for external SDKs and ``audience simulate``/``replay``:
  publish events and their dead letters, nothing else; it gets its
  JetStream acknowledgements on its own inboxes.

Every role subscribes only to its own inboxes (``_INBOX.<role>.>``), and its
clients must use that inbox prefix (:class:`~actors.nats_auth.NatsCredentials`
carries it), so no role can read replies (pull deliveries included) meant for
another. Passwords are generated once and kept in a folder only the owner can
enter (0700), one JSON file per role and the server's config, each 0600.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.nats_auth import NatsCredentials
from actors.partitioning import ALERTS_SUBJECT_PREFIX, EVENTS_SUBJECT_PREFIX, dlq_subject
from actors.shard_queries import QUERY_SUBJECT_PREFIX
from actors.validation import RejectReason

ROLES = ("admin", "api", "shard", "producer")
CONFIG_NAME = "nats-server.conf"


@dataclass(frozen=True)
class AccessNames:
    """The stream and bucket names the permissions refer to (as the settings name them)."""

    events: str = "AUDIENCE_EVENTS"
    dlq: str = "AUDIENCE_DLQ"
    bucket: str = "AUDIENCE_CHECKPOINTS"
    layout: str = "AUDIENCE_LAYOUT"  # actors.layout_store.LAYOUT_BUCKET (key-value)


@dataclass(frozen=True)
class Permissions:
    """Subjects a role may publish to and subscribe to (allow lists; all else denied)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False  # may answer the requests it receives (one reply each)

    def as_config(self) -> dict[str, Any]:
        """The ``permissions`` block of a nats-server user (repeats dropped)."""
        block: dict[str, Any] = {
            "publish": {"allow": list(dict.fromkeys(self.publish))},
            "subscribe": {"allow": list(dict.fromkeys(self.subscribe))},
        }
        if self.allow_responses:
            block["allow_responses"] = True
        return block


def inbox_prefix(role: str) -> str:
    """The inbox prefix clients of ``role`` must use (their only subscribable subjects)."""
    return f"_INBOX.{role}"


def _consume(stream: str) -> tuple[str, ...]:
    """JetStream API subjects to read ``stream`` through consumers and single-message gets."""
    api = "$JS.API"
    return (
        f"{api}.STREAM.INFO.{stream}",
        f"{api}.STREAM.MSG.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}.>",
        f"{api}.CONSUMER.CREATE.{stream}",
        f"{api}.CONSUMER.CREATE.{stream}.>",
        f"{api}.CONSUMER.DELETE.{stream}.*",
        f"{api}.CONSUMER.INFO.{stream}.*",
        f"{api}.CONSUMER.MSG.NEXT.{stream}.*",
        f"$JS.FC.{stream}.>",  # flow-control answers of ordered consumers
        f"{api}.STREAM.NAMES",  # nats-py finds a subscription's stream by its subject
    )


def permissions(role: str, names: AccessNames | None = None) -> Permissions:
    """What ``role`` may publish and subscribe to, with the stream names of ``names``.

    Raises:
        ValueError: an unknown role.
    """
    names = names or AccessNames()
    inbox = f"{inbox_prefix(role)}.>"
    events = f"{EVENTS_SUBJECT_PREFIX}.*"
    # One subject per known reason, not a wildcard: a made-up reason could carry
    # markup into every screen that lists the reasons.
    dead_letters = tuple(dlq_subject(reason.value) for reason in RejectReason)
    if role == "admin":
        return Permissions(publish=(">",), subscribe=(">",))
    if role == "producer":
        return Permissions(publish=(events, *dead_letters), subscribe=(inbox,))
    if role == "api":
        return Permissions(
            publish=(
                events,
                *dead_letters,
                f"{ALERTS_SUBJECT_PREFIX}.>",
                f"{QUERY_SUBJECT_PREFIX}.>",  # per-request reads of the shards
                f"$JS.API.STREAM.INFO.{names.events}",
                f"$JS.API.STREAM.MSG.GET.{names.events}",
                f"$JS.API.STREAM.INFO.{names.dlq}",
            ),
            subscribe=(inbox,),
        )
    if role == "shard":
        objects = f"OBJ_{names.bucket}"
        layout = f"KV_{names.layout}"
        return Permissions(
            publish=(
                *_consume(names.events),
                *dead_letters,
                f"$O.{names.bucket}.>",  # object chunks and metadata
                *_consume(objects),
                f"$JS.API.STREAM.PURGE.{objects}",  # deleting an object purges its chunks
                f"$KV.{names.layout}.>",  # the partition layout (compare-and-set writes)
                *_consume(layout),
            ),
            subscribe=(inbox, f"{QUERY_SUBJECT_PREFIX}.>"),
            allow_responses=True,  # the answers to those reads
        )
    raise ValueError(f"unknown NATS role {role!r}; roles are {', '.join(ROLES)}")


def server_config(users: dict[str, NatsCredentials], names: AccessNames | None = None) -> str:
    """The ``authorization`` block of nats-server's config for ``users`` (role -> credentials).

    nats-server reads JSON as its config format.
    """
    entries = [
        {
            "user": creds.user,
            "password": creds.password,
            "permissions": permissions(role, names).as_config(),
        }
        for role, creds in users.items()
    ]
    return json.dumps({"authorization": {"users": entries}}, indent=2)


class NatsUsers:
    """The embedded server's users, kept in ``folder``: created once, reused after.

    ``folder`` is made 0700; each ``<role>.json`` and the server config 0600.
    """

    def __init__(self, folder: Path, names: AccessNames | None = None) -> None:
        self.folder = Path(folder)
        self.names = names or AccessNames()

    @property
    def config_path(self) -> Path:
        """The nats-server config holding the users and their permissions."""
        return self.folder / CONFIG_NAME

    def path(self, role: str) -> Path:
        """The credentials file of ``role`` (JSON: user, password, inbox_prefix)."""
        if role not in ROLES:
            raise ValueError(f"unknown NATS role {role!r}; roles are {', '.join(ROLES)}")
        return self.folder / f"{role}.json"

    def ensure(self) -> NatsUsers:
        """Create the folder, any missing role's password, and (always) the server config."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        users = {}
        for role in ROLES:
            path = self.path(role)
            try:
                creds = NatsCredentials.load(path)
            except (OSError, ValueError, TypeError):
                creds = NatsCredentials(
                    user=role, password=secrets.token_urlsafe(24), inbox_prefix=inbox_prefix(role)
                )
            creds.save(path)  # also brings back 0600 on a file whose mode was widened
            users[role] = creds
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(server_config(users, self.names))
        return self

    def credentials(self, role: str) -> NatsCredentials:
        """The credentials of ``role``.

        Raises:
            OSError: :meth:`ensure` has not created them (no such file).
        """
        return NatsCredentials.load(self.path(role))

    def all(self) -> dict[str, NatsCredentials]:
        """Every role's credentials."""
        return {role: self.credentials(role) for role in ROLES}
