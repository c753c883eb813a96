"""NATS roles, credentials and their settings, without a server: the table and the redaction."""

from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from actors.nats_auth import (
    NatsAuthError,
    NatsCredentials,
    NatsKeyFileError,
    NatsTlsError,
    check_key_files,
    is_refusal,
    redact_url,
)
from cluster.launcher import nats_credentials_of
from cluster.nats_users import ROLES, AccessNames, NatsUsers, permissions, server_config
from cluster.settings import Settings


def _settings(**values: object) -> Settings:
    return Settings(**values, _env_file=None)  # type: ignore[arg-type]


def _allows(patterns: tuple[str, ...], subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` the rest."""
    for pattern in patterns:
        want, got = pattern.split("."), subject.split(".")
        for i, token in enumerate(want):
            if token == ">":
                if len(got) > i:
                    return True
                break
            if i >= len(got) or (token != "*" and token != got[i]):
                break
        else:
            if len(want) == len(got):
                return True
    return False


def test_a_producer_may_publish_events_and_dead_letters_only() -> None:
    rights = permissions("producer")
    assert _allows(rights.publish, "audience.events.3")
    assert _allows(rights.publish, "audience.dlq.schema")
    for subject in (
        "audience.events.3.x",
        "audience.dlq.<svg onload=x>",  # only the known reasons: no markup in reason lists
        "audience.alerts.volume",
        "$JS.API.CONSUMER.CREATE.AUDIENCE_EVENTS",
        "$JS.API.STREAM.MSG.GET.AUDIENCE_EVENTS",
        "$JS.API.STREAM.DELETE.AUDIENCE_EVENTS",
        "$O.AUDIENCE_CHECKPOINTS.M.x",
    ):
        assert not _allows(rights.publish, subject), subject
    assert rights.subscribe == ("_INBOX.producer.>",)


def test_nobody_but_admin_and_shards_can_create_consumers_on_the_event_stream() -> None:
    create = "$JS.API.CONSUMER.CREATE.AUDIENCE_EVENTS.c1.audience.events.3"
    allowed = {role for role in ROLES if _allows(permissions(role).publish, create)}
    assert allowed == {"admin", "shard"}


def test_only_admin_may_create_or_delete_the_streams() -> None:
    for role in ("api", "shard", "producer"):
        rights = permissions(role).publish
        streams = (
            "AUDIENCE_EVENTS",
            "AUDIENCE_DLQ",
            "OBJ_AUDIENCE_CHECKPOINTS",
            "KV_AUDIENCE_LAYOUT",
        )
        for stream in streams:
            for verb in ("CREATE", "DELETE", "UPDATE"):
                assert not _allows(rights, f"$JS.API.STREAM.{verb}.{stream}"), (role, verb)


def test_each_role_subscribes_only_to_its_own_inboxes() -> None:
    for role in ("api", "shard", "producer"):
        subscribe = permissions(role).subscribe
        assert subscribe[0] == f"_INBOX.{role}.>"
        assert not _allows(subscribe, "_INBOX.abc")
        assert not _allows(subscribe, "audience.events.1")


def test_only_shards_answer_the_per_request_reads_and_only_the_api_asks_them() -> None:
    read = "audience.query.AUDIENCE_EVENTS.audience.0"
    assert [r for r in ("api", "shard", "producer") if _allows(permissions(r).subscribe, read)] == [
        "shard"
    ]
    assert [r for r in ("api", "shard", "producer") if _allows(permissions(r).publish, read)] == [
        "api"
    ]
    assert permissions("shard").as_config()["allow_responses"] is True
    assert "allow_responses" not in permissions("producer").as_config()


def test_shards_reach_their_snapshots_and_layout_under_the_configured_names() -> None:
    names = AccessNames(events="EV", dlq="DL", bucket="SNAPS", layout="LAY")
    rights = permissions("shard", names).publish
    assert _allows(rights, "$O.SNAPS.C.abc")
    assert _allows(rights, "$JS.API.CONSUMER.MSG.NEXT.EV.c1")
    assert _allows(rights, "$JS.API.STREAM.PURGE.OBJ_SNAPS")
    assert _allows(rights, "$KV.LAY.audience.pool")
    assert not _allows(rights, "$JS.API.CONSUMER.MSG.NEXT.AUDIENCE_EVENTS.c1")
    assert not _allows(rights, "audience.events.1")


def test_an_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown NATS role"):
        permissions("root")


def test_the_server_config_is_json_with_one_user_per_role() -> None:
    users = {role: NatsCredentials(user=role, password=f"pw-{role}") for role in ROLES}
    config = json.loads(server_config(users))
    entries = config["authorization"]["users"]
    assert [e["user"] for e in entries] == list(ROLES)
    assert entries[0]["permissions"]["publish"]["allow"] == [">"]


def test_users_are_made_once_owner_only_and_kept(tmp_path: Path) -> None:
    users = NatsUsers(tmp_path / "auth").ensure()
    first = users.all()
    assert len({c.password for c in first.values()}) == len(ROLES)
    assert NatsUsers(tmp_path / "auth").ensure().all() == first
    assert stat.S_IMODE((tmp_path / "auth").stat().st_mode) == 0o700
    for path in (tmp_path / "auth").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_credentials_never_show_secrets() -> None:
    creds = NatsCredentials(user="api", password="hunter2", token=None)
    assert "hunter2" not in repr(creds) and "hunter2" not in str(creds)
    assert creds.identity == "user 'api'"
    assert NatsCredentials(token="t0k").identity == "token"
    assert "t0k" not in repr(NatsCredentials(token="t0k"))


def test_connect_options_carry_only_what_is_set() -> None:
    creds = NatsCredentials(user="u", password="p", inbox_prefix="_INBOX.u")
    assert creds.options() == {"user": "u", "password": "p", "inbox_prefix": "_INBOX.u"}
    assert NatsCredentials().options() == {}


def test_urls_lose_their_user_information() -> None:
    assert redact_url("nats://bob:secret@host:4222") == "nats://***@host:4222"
    assert redact_url("nats://a:b@h1:1,nats://c@h2:2") == "nats://***@h1:1,nats://***@h2:2"
    assert redact_url("nats://host:4222") == "nats://host:4222"


def test_a_refusal_is_recognised_and_explained_without_secrets() -> None:
    assert is_refusal(Exception("nats: 'Authorization Violation'"))
    assert not is_refusal(Exception("nats: permissions violation for publish to x"))
    error = NatsAuthError("nats://u:pw@h:1", "user 'u'", "authorization violation")
    assert "pw" not in str(error) and "user 'u'" in str(error)
    assert error.retry_after_s > 0
    again = pickle.loads(pickle.dumps(error))  # raised in a Ray actor, re-raised by the caller
    assert str(again) == str(error) and again.identity == "user 'u'"


def test_settings_hold_nats_secrets_as_secret_strings() -> None:
    settings = _settings(
        nats_url="nats://nats:4222", nats_user="platform", nats_password="s3cret-pw"
    )
    assert isinstance(settings.nats_password, SecretStr)
    assert "s3cret-pw" not in repr(settings) and "s3cret-pw" not in str(settings)
    creds = nats_credentials_of(settings, "shard")
    assert creds is not None and creds.user == "platform" and creds.password == "s3cret-pw"


@pytest.mark.parametrize(
    "values",
    [
        {"nats_user": "u"},
        {"nats_password": "p"},
        {"nats_user": "u", "nats_password": "p", "nats_token": "t"},
        {"nats_token": "t", "nats_creds_file": "/x.creds"},
        {"nats_tls_cert": "/c.pem"},
    ],
)
def test_settings_refuse_a_half_or_double_nats_login(values: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        _settings(nats_url="nats://nats:4222", **values)


def test_embedded_nats_roles_read_the_generated_files(tmp_path: Path) -> None:
    settings = _settings(data_dir=tmp_path)
    assert nats_credentials_of(settings, "producer") is None  # not generated yet
    NatsUsers(tmp_path / "nats" / "auth").ensure()
    producer = nats_credentials_of(settings, "producer")
    assert producer is not None and producer.user == "producer"
    assert producer.inbox_prefix == "_INBOX.producer"
    assert (
        nats_credentials_of(_settings(data_dir=tmp_path, nats_embedded_auth=False), "api") is None
    )


def test_nats_users_lists_where_each_login_is_but_never_a_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cluster.cli import main

    for name in [n for n in os.environ if n.startswith("AUDIENCE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AUDIENCE_DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    assert main(["nats-users"]) == 2  # nothing generated yet: one error line
    assert capsys.readouterr().err.startswith("error: no NATS users")

    users = NatsUsers(tmp_path / "nats" / "auth").ensure()
    assert main(["nats-users", "--permissions"]) == 0
    shown = capsys.readouterr().out
    assert str(users.path("producer")) in shown and "_INBOX.producer" in shown
    assert "audience.events.*" in shown
    for creds in users.all().values():
        assert creds.password and creds.password not in shown


def test_an_nkey_or_creds_login_without_the_nkeys_package_is_refused_in_plain_words(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cluster.settings

    monkeypatch.setattr(cluster.settings, "_has_nkeys", lambda: False)
    for values in ({"nats_nkey_seed_file": "/x.nk"}, {"nats_creds_file": "/x.creds"}):
        with pytest.raises(ValidationError, match="pip install nkeys"):
            _settings(nats_url="nats://nats:4222", **values)
    monkeypatch.setattr(cluster.settings, "_has_nkeys", lambda: True)
    assert _settings(nats_url="nats://nats:4222", nats_creds_file="/x.creds").nats_creds_file


def test_settings_refuse_a_login_inside_the_nats_url() -> None:
    with pytest.raises(ValidationError, match="must not hold a login") as caught:
        _settings(nats_url="nats://bob:hunter2@nats:4222")
    assert "hunter2" not in str(caught.value).split("input_value")[0]


def test_tls_and_key_file_errors_are_auth_errors_in_one_line_that_survive_pickling() -> None:
    for kind in (NatsTlsError, NatsKeyFileError):
        error = kind("tls://u:pw@h:1", "user 'u'", "certificate verify failed")
        assert isinstance(error, NatsAuthError)  # callers that stop on a refusal stop on it
        assert "pw" not in str(error) and "\n" not in str(error)
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is kind and str(again) == str(error)
    assert "AUDIENCE_NATS_TLS_CA" in str(NatsTlsError("nats://h:1", "token", "x"))


def test_key_files_are_checked_before_connecting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    import nkeys

    check_key_files("nats://h:1", None)
    check_key_files("nats://h:1", NatsCredentials(user="u", password="p"))
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    (tmp_path / "ok.nk").write_bytes(seed + b"\n")
    check_key_files("nats://h:1", NatsCredentials(nkey_seed_file=str(tmp_path / "ok.nk")))
    with pytest.raises(NatsKeyFileError, match="cannot read"):
        check_key_files("nats://h:1", NatsCredentials(nkey_seed_file=str(tmp_path / "no.nk")))
    (tmp_path / "bad.creds").write_text("-----BEGIN NATS USER JWT-----\nx\n")
    with pytest.raises(NatsKeyFileError, match="not a NATS creds file"):
        check_key_files("nats://h:1", NatsCredentials(creds_file=str(tmp_path / "bad.creds")))
    monkeypatch.setitem(sys.modules, "nkeys", None)  # a broken install: import fails
    with pytest.raises(NatsKeyFileError, match="pip install nkeys"):
        check_key_files("nats://h:1", NatsCredentials(nkey_seed_file=str(tmp_path / "ok.nk")))
