"""Logins to an "external" NATS, as the settings give them, against a real nats-server.

Each server here is a nats-server child process with a config file written by
the test (the way an operator would configure theirs): an nkey user, a
decentralised (operator / account / user JWT) setup for creds files, and TLS
with a throwaway CA (server certificate only, and with client certificates).
Every login goes through :func:`actors.nats_auth.connect`, as the platform's do.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import ipaddress
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from actors.nats_auth import (
    NatsAuthError,
    NatsCredentials,
    NatsKeyFileError,
    NatsTlsError,
    connect,
)
from cluster.nats_server import EmbeddedNats

pytestmark = pytest.mark.integration


def server_with(folder: Path, config: dict[str, Any]) -> EmbeddedNats:
    """A started nats-server reading ``config`` (JSON) from a file in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "server.conf"
    path.write_text(json.dumps(config, indent=2))
    return EmbeddedNats(folder / "store", extra_args=("-c", str(path))).start()


async def round_trip(url: str, credentials: NatsCredentials) -> bytes:
    """Connect as ``credentials``, publish to a subject it subscribes to, return what came."""
    nc = await asyncio.wait_for(connect(url, credentials), timeout=10)
    try:
        sub = await nc.subscribe("external.check")
        await nc.publish("external.check", b"hello")
        msg = await sub.next_msg(timeout=5)
        return bytes(msg.data)
    finally:
        await nc.close()


def refusal_of(url: str, credentials: NatsCredentials) -> NatsAuthError:
    """The error a login that must fail ends with (within 10 s: no retry loop)."""

    async def attempt() -> None:
        await asyncio.wait_for(connect(url, credentials), timeout=10)

    with pytest.raises(NatsAuthError) as caught:
        asyncio.run(attempt())
    assert "\n" not in str(caught.value)
    return caught.value


def user_seed() -> tuple[bytes, str]:
    """A new user nkey: its seed (SU...) and public key (U...)."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed, nkeys.from_seed(bytearray(seed)).public_key.decode()


def write_private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return path


# --- nkey users -------------------------------------------------------------


@pytest.fixture(scope="module")
def nkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedNats, Path]]:
    """A server with one nkey user; yields it and the user's seed file."""
    folder = tmp_path_factory.mktemp("nats-nkey")
    seed, public = user_seed()
    seed_file = write_private(folder / "user.nk", seed + b"\n")
    server = server_with(folder, {"authorization": {"users": [{"nkey": public}]}})
    try:
        yield server, seed_file
    finally:
        server.stop()


def test_an_nkey_seed_file_signs_in(nkey_server: tuple[EmbeddedNats, Path]) -> None:
    server, seed_file = nkey_server
    creds = NatsCredentials(nkey_seed_file=str(seed_file))
    assert asyncio.run(round_trip(server.url, creds)) == b"hello"


def test_a_wrong_nkey_seed_is_refused_at_once_in_one_line(
    nkey_server: tuple[EmbeddedNats, Path], tmp_path: Path
) -> None:
    server, _ = nkey_server
    other, _ = user_seed()
    wrong = write_private(tmp_path / "other.nk", other)
    error = refusal_of(server.url, NatsCredentials(nkey_seed_file=str(wrong)))
    message = str(error)
    assert f"refused the credentials (nkey seed {wrong})" in message
    assert "authorization violation" in message
    assert other.decode() not in message


def test_an_unusable_seed_file_is_named_before_connecting(
    nkey_server: tuple[EmbeddedNats, Path], tmp_path: Path
) -> None:
    server, _ = nkey_server
    missing = tmp_path / "missing.nk"
    error = refusal_of(server.url, NatsCredentials(nkey_seed_file=str(missing)))
    assert isinstance(error, NatsKeyFileError) and f"cannot read {missing}" in str(error)
    garbage = write_private(tmp_path / "garbage.nk", b"SUNOTASEED\n")
    error = refusal_of(server.url, NatsCredentials(nkey_seed_file=str(garbage)))
    assert isinstance(error, NatsKeyFileError)
    assert "holds no valid nkey seed" in str(error) and "SUNOTASEED" not in str(error)


# --- creds files (decentralised JWT auth) -----------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT (ed25519-nkey) for ``subject``, signed by ``issuer``."""
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    digest = hashlib.sha512(json.dumps(claims, sort_keys=True).encode()).digest()[:32]
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    header = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64url(json.dumps(claims).encode())
    signature = _b64url(issuer.sign(f"{header}.{payload}".encode()))
    return f"{header}.{payload}.{signature}"


def keypair(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def creds_file(path: Path, user_jwt: str, seed: bytes) -> Path:
    """A creds file as `nsc` writes them."""
    text = (
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
    )
    return write_private(path, text.encode())


@pytest.fixture(scope="module")
def operator_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[EmbeddedNats, Path, Path]]:
    """A server in operator mode with one account and user; yields it, the user's creds
    file and the creds file of a user signed by an account the server does not know."""
    folder = tmp_path_factory.mktemp("nats-jwt")
    operator = keypair(nkeys.PREFIX_BYTE_OPERATOR)
    limits = {"subs": -1, "conn": -1, "leaf": -1, "imports": -1, "exports": -1}
    limits |= {"data": -1, "payload": -1, "wildcards": True}
    jwts = {}
    for name in ("SYS", "known", "unknown"):  # the server needs a system account
        account = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
        account_pub = account.public_key.decode()
        account_jwt = jwt(operator, account_pub, name, {"type": "account", "limits": limits})
        user = keypair(nkeys.PREFIX_BYTE_USER)
        user_claims = {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
        user_jwt = jwt(account, user.public_key.decode(), f"{name}-user", user_claims)
        path = creds_file(folder / f"{name}.creds", user_jwt, user.seed)
        jwts[name] = (account_pub, account_jwt, path)
    config = {
        "operator": jwt(operator, operator.public_key.decode(), "test", {"type": "operator"}),
        "resolver": "MEMORY",
        "resolver_preload": {jwts[name][0]: jwts[name][1] for name in ("SYS", "known")},
        "system_account": jwts["SYS"][0],
    }
    server = server_with(folder, config)
    try:
        yield server, jwts["known"][2], jwts["unknown"][2]
    finally:
        server.stop()


def test_a_creds_file_signs_in(operator_server: tuple[EmbeddedNats, Path, Path]) -> None:
    server, known, _ = operator_server
    creds = NatsCredentials(creds_file=str(known))
    assert asyncio.run(round_trip(server.url, creds)) == b"hello"


def test_a_creds_file_of_an_unknown_account_is_refused_in_one_line(
    operator_server: tuple[EmbeddedNats, Path, Path], tmp_path: Path
) -> None:
    server, _, unknown = operator_server
    error = refusal_of(server.url, NatsCredentials(creds_file=str(unknown)))
    assert f"refused the credentials (creds file {unknown})" in str(error)
    not_creds = write_private(tmp_path / "plain.creds", b"just text\n")
    error = refusal_of(server.url, NatsCredentials(creds_file=str(not_creds)))
    assert isinstance(error, NatsKeyFileError) and "is not a NATS creds file" in str(error)


# --- TLS with a CA --------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        )
        builder = builder.add_extension(usage, critical=True)
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    else:
        purpose = x509.ExtendedKeyUsageOID.SERVER_AUTH if server else None
        purpose = purpose or x509.ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        if issuer is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
    if server:
        names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(folder: Path) -> Pki:
    def write(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
        write_private(folder / f"{name}.key", _key_pem(key))
        path = folder / f"{name}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("audience test CA", ca_key, None, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate("127.0.0.1", server_key, ca, ca_key, server=True)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate("audience client", client_key, ca, ca_key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _certificate("some other CA", other_key, None, other_key, ca=True)
    return Pki(
        ca=write("ca", ca, ca_key),
        server_cert=write("server", server, server_key),
        server_key=folder / "server.key",
        client_cert=write("client", client, client_key),
        client_key=folder / "client.key",
        other_ca=write("other-ca", other, other_key),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


LOGIN = {"user": "platform", "password": "tls-pw-1"}


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[EmbeddedNats]:
    """A server that speaks TLS only (its certificate signed by ``pki.ca``), with a login."""
    tls = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key), "timeout": 2}
    config = {"tls": tls, "authorization": {"users": [LOGIN]}}
    server = server_with(tmp_path_factory.mktemp("nats-tls"), config)
    try:
        yield server
    finally:
        server.stop()


def test_tls_with_the_ca_connects_and_publishes(tls_server: EmbeddedNats, pki: Pki) -> None:
    creds = NatsCredentials(**LOGIN, tls_ca=str(pki.ca))
    assert asyncio.run(round_trip(tls_server.url, creds)) == b"hello"
    tls_url = tls_server.url.replace("nats://", "tls://")
    assert asyncio.run(round_trip(tls_url, creds)) == b"hello"


@pytest.mark.parametrize("ca", ["none", "other"])
def test_tls_without_the_right_ca_fails_at_once_in_one_line(
    tls_server: EmbeddedNats, pki: Pki, ca: str
) -> None:
    tls_ca = str(pki.other_ca) if ca == "other" else None
    creds = NatsCredentials(**LOGIN, tls_ca=tls_ca)
    started = time.monotonic()
    error = refusal_of(tls_server.url, creds)
    assert time.monotonic() - started < 5  # not nats-py's retry loop
    assert isinstance(error, NatsTlsError)
    message = str(error)
    assert "TLS certificate not trusted" in message and "AUDIENCE_NATS_TLS_CA" in message
    assert "certificate" in message.split("(", 1)[1]  # the ssl module's reason
    assert LOGIN["password"] not in message


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[EmbeddedNats]:
    """A server that also verifies client certificates against ``pki.ca``."""
    tls = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key), "timeout": 2}
    tls |= {"ca_file": str(pki.ca), "verify": True}
    server = server_with(tmp_path_factory.mktemp("nats-mtls"), {"tls": tls})
    try:
        yield server
    finally:
        server.stop()


def test_a_client_certificate_signs_in_where_the_server_verifies_clients(
    mtls_server: EmbeddedNats, pki: Pki
) -> None:
    creds = NatsCredentials(
        tls_ca=str(pki.ca), tls_cert=str(pki.client_cert), tls_key=str(pki.client_key)
    )
    assert asyncio.run(round_trip(mtls_server.url, creds)) == b"hello"
