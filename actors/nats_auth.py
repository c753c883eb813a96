"""How a process proves itself to NATS, and the one way the platform connects.

Every NATS connection of the platform (the launcher, shard actors, API replicas,
the ``simulate``/``replay``/``train`` commands) goes through :func:`connect`
with the :class:`NatsCredentials` of its role: user and password, a token, an
nkey seed file or a creds file, optionally TLS with a CA and a client
certificate, and the role's inbox prefix (the embedded server lets each role
subscribe only to its own inboxes, so one role cannot read another's replies).

Secrets never reach a repr, a log line or an error message: credentials print
as ``user 'producer'``, URLs lose their ``user:password@`` part. A server that
refuses the credentials ends the attempt at once with :class:`NatsAuthError`
(nats-py would otherwise retry for ever, a traceback per attempt), and so does
a server whose TLS certificate the CA given does not vouch for
(:class:`NatsTlsError`), or an nkey seed or creds file that cannot be read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client

from actors.errors import UnavailableError
from actors.jetstream import server_list

log = logging.getLogger(__name__)

ErrorCallback = Callable[[Exception], Awaitable[None]]

_REFUSALS = ("authorization violation", "authentication", "user authentication revoked")
_USERINFO = re.compile(r"(?<=://)[^/@,\s]*@")


class NatsAuthError(UnavailableError):
    """The NATS server refused this process's credentials.

    Attributes:
        url: the server (seed list) tried, without any user information.
        identity: who the process claimed to be (``user 'api'``, ``token``), no secret.
    """

    def __init__(self, url: str, identity: str, detail: str) -> None:
        super().__init__(
            "nats",
            f"{redact_url(url)} refused the credentials ({identity}): {detail}; check "
            "AUDIENCE_NATS_USER / _PASSWORD / _TOKEN / _NKEY_SEED_FILE / _CREDS_FILE, or "
            "the embedded server's files listed by `audience nats-users`",
            retry_after_s=5.0,
        )
        self.url = redact_url(url)
        self.identity = identity
        self._reason = detail

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        # Raised inside a Ray actor and re-raised in the caller: pickled by Ray.
        return (type(self), (self.url, self.identity, self._reason))


class NatsTlsError(NatsAuthError):
    """The NATS server's TLS certificate is not trusted (no CA given, or the wrong one).

    A :class:`NatsAuthError` (callers that stop on refused credentials stop on it
    too): retrying cannot help until the settings name the right CA.
    """

    def __init__(self, url: str, identity: str, detail: str) -> None:
        UnavailableError.__init__(
            self,
            "nats",
            f"{redact_url(url)}: TLS certificate not trusted ({detail}); set "
            "AUDIENCE_NATS_TLS_CA to the CA that signed the server's certificate",
            retry_after_s=5.0,
        )
        self.url = redact_url(url)
        self.identity = identity
        self._reason = detail


class NatsKeyFileError(NatsAuthError):
    """The nkey seed or creds file cannot be used (missing, unreadable, no valid seed),
    or the ``nkeys`` package nats-py needs for them does not import."""

    def __init__(self, url: str, identity: str, detail: str) -> None:
        UnavailableError.__init__(
            self,
            "nats",
            f"cannot sign in to {redact_url(url)} ({identity}): {detail}; check "
            "AUDIENCE_NATS_NKEY_SEED_FILE / AUDIENCE_NATS_CREDS_FILE",
            retry_after_s=5.0,
        )
        self.url = redact_url(url)
        self.identity = identity
        self._reason = detail


def redact_url(url: str) -> str:
    """``url`` (or a comma-separated seed list) without ``user:password@`` parts."""
    return _USERINFO.sub("***@", url)


@dataclass(frozen=True)
class NatsCredentials:
    """One NATS identity and how to reach the server safely; secrets stay out of reprs.

    Give at most one of user/password, token, nkey seed file and creds file
    (settings check this); TLS options combine with any of them. Picklable, so
    it travels to Ray actors; the TLS context is built where it is used.
    """

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    nkey_seed_file: str | None = None
    creds_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    inbox_prefix: str | None = None

    @property
    def identity(self) -> str:
        """Who these credentials claim to be, for messages (never a secret)."""
        if self.user:
            return f"user {self.user!r}"
        if self.token:
            return "token"
        if self.nkey_seed_file:
            return f"nkey seed {self.nkey_seed_file}"
        if self.creds_file:
            return f"creds file {self.creds_file}"
        return "no credentials"

    def tls_context(self) -> ssl.SSLContext | None:
        """A TLS context trusting ``tls_ca`` with the client certificate, or None (no options)."""
        if not (self.tls_ca or self.tls_cert):
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def options(self) -> dict[str, Any]:
        """Keyword arguments of ``nats.connect`` for these credentials (no servers)."""
        wanted: dict[str, Any] = {
            "user": self.user,
            "password": self.password,
            "token": self.token,
            "nkeys_seed": self.nkey_seed_file,
            "user_credentials": self.creds_file,
            "inbox_prefix": self.inbox_prefix,
            "tls": self.tls_context(),
        }
        return {key: value for key, value in wanted.items() if value is not None}

    def save(self, path: Path) -> None:
        """Write these credentials as JSON, readable by the owner only (mode 0600)."""
        data = {k: v for k, v in asdict(self).items() if v is not None}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o600)  # an existing file keeps its mode otherwise
            json.dump(data, out, indent=2)

    @classmethod
    def load(cls, path: Path) -> NatsCredentials:
        """Credentials saved by :meth:`save`.

        Raises:
            OSError, ValueError, TypeError: the file is missing or not such a file.
        """
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds no credentials object")
        return cls(**data)


def connect_options(nats_url: str, credentials: NatsCredentials | None) -> dict[str, Any]:
    """``servers`` and credential keyword arguments of ``nats.connect`` / ``Client.connect``."""
    options = credentials.options() if credentials is not None else {}
    return {"servers": server_list(nats_url), **options}


def is_refusal(exc: BaseException) -> bool:
    """Whether a nats-py error is the server refusing the credentials."""
    text = str(exc).lower()
    return any(marker in text for marker in _REFUSALS)


def _final(
    exc: BaseException, nats_url: str, credentials: NatsCredentials | None
) -> Exception | None:
    """The error to end a connect attempt with for ``exc``, or None to let nats-py retry.

    A refusal and an untrusted server certificate end it: the same credentials
    and the same CA would fail again.
    """
    if is_refusal(exc):
        return NatsAuthError(nats_url, _identity(credentials), _reason(str(exc)))
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or str(exc)
        return NatsTlsError(nats_url, _identity(credentials), str(detail))
    return None


def check_key_files(nats_url: str, credentials: NatsCredentials | None) -> None:
    """Read the nkey seed or creds file of ``credentials`` before connecting.

    nats-py reads them inside ``connect`` and fails with a bare traceback (or an
    ImportError without the ``nkeys`` package); this says which file and why.

    Raises:
        NatsKeyFileError: the file is missing, unreadable or holds no valid seed,
            or ``nkeys`` cannot be imported.
    """
    if credentials is None or not (credentials.nkey_seed_file or credentials.creds_file):
        return
    identity = credentials.identity
    try:
        import nkeys  # nats-py needs it for both
    except ImportError as exc:
        raise NatsKeyFileError(
            nats_url, identity, f"the `nkeys` package cannot be imported ({exc}); pip install nkeys"
        ) from None
    path = credentials.nkey_seed_file or credentials.creds_file
    assert path is not None
    try:
        text = Path(path).read_text()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise NatsKeyFileError(nats_url, identity, f"cannot read {path}: {reason}") from None
    except UnicodeDecodeError:  # its message would quote a byte of the file
        raise NatsKeyFileError(nats_url, identity, f"{path} is not a text file") from None
    if credentials.creds_file:
        seed = re.search(r"-+BEGIN USER NKEY SEED-+\s+(\S+)", text)
        if "BEGIN NATS USER JWT" not in text or seed is None:
            raise NatsKeyFileError(nats_url, identity, f"{path} is not a NATS creds file")
        text = seed.group(1)
    try:
        nkeys.from_seed(bytearray(text.strip().encode()))
    except Exception:  # nkeys raises its own error types (and binascii ones)
        raise NatsKeyFileError(nats_url, identity, f"{path} holds no valid nkey seed") from None


async def connect(
    nats_url: str,
    credentials: NatsCredentials | None = None,
    *,
    client: Client | None = None,
    error_cb: ErrorCallback | None = None,
    **options: Any,
) -> Client:
    """Connect to ``nats_url`` (one URL or a comma-separated seed list) as ``credentials``.

    Other keyword arguments go to ``Client.connect`` as they are (name,
    reconnect and timeout settings). Errors other than a refusal go to
    ``error_cb``; without one they are logged in one line each.

    Args:
        client: connect this client (so a caller may close it on its own
            timeout); a new one by default.

    Raises:
        NatsAuthError: the server refused the credentials (not retried: the
            same credentials would be refused again).
        NatsKeyFileError: the nkey seed or creds file is unusable (checked
            before connecting).
        NatsTlsError: the server's TLS certificate is not trusted by the CA
            given (or by the system's CAs without one); not retried either.
        Exception: whatever nats-py raises when the server cannot be reached.
    """
    check_key_files(nats_url, credentials)
    nc = client if client is not None else Client()
    refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
    connected = False

    async def on_error(exc: Exception) -> None:
        final = _final(exc, nats_url, credentials)
        if final is not None:
            if not refused.done():
                refused.set_result(final)
            if connected:  # credentials revoked while running: nats-py keeps retrying
                log.warning("NATS refused %s on reconnect: %s", _identity(credentials), final)
            return
        if error_cb is not None:
            await error_cb(exc)
        else:
            log.warning("NATS connection: %r", exc)

    attempt = asyncio.ensure_future(
        nc.connect(**connect_options(nats_url, credentials), error_cb=on_error, **options)
    )
    first: set[asyncio.Future[Any]] = {attempt, refused}
    try:
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the caller's timeout: stop the attempt with it
        await _abandon(attempt, nc)
        raise
    if refused.done() and not attempt.done():
        await _abandon(attempt, nc)
        raise refused.result()
    try:
        await attempt
    except Exception as exc:
        final = refused.result() if refused.done() else _final(exc, nats_url, credentials)
        if final is not None:
            raise final from None
        raise
    connected = True
    return nc


async def _abandon(attempt: asyncio.Future[None], nc: Client) -> None:
    """Cancel a connect attempt still retrying and close its client."""
    attempt.cancel()
    with contextlib.suppress(BaseException):
        await attempt
    with contextlib.suppress(Exception):
        await nc.close()


def _identity(credentials: NatsCredentials | None) -> str:
    return credentials.identity if credentials is not None else "no credentials"


def _reason(message: str) -> str:
    """nats-py's ``nats: 'Authorization Violation'`` as ``authorization violation``."""
    return message.removeprefix("nats: ").strip("'\" ").lower()
