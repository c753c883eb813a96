"""`audience up --demo` in a subprocess: it serves, the demo flows, Ctrl-C leaves nothing behind."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from cluster.nats_server import free_port
from tests.support.events import event
from tests.support.waiting import wait_until

AUDIENCE = str(Path(sys.executable).parent / "audience")


def audience_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIENCE_", "RAY_ADDRESS"))}
    env.update(
        {
            "AUDIENCE_DATA_DIR": str(tmp_path / "data"),
            "AUDIENCE_HTTP_PORT": str(free_port()),
            "AUDIENCE_PARTITIONS": "8",
            "AUDIENCE_SHARDS": "2",
            "AUDIENCE_NUM_CPUS": "2",
            "AUDIENCE_DEMO_USERS": "200",
            "AUDIENCE_DEMO_RATE": "400",
        }
    )
    env.update(extra)
    return env


class Running:
    """A started `audience up` whose output is collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        # A session of its own, so that Ctrl-C can be sent the way a terminal
        # sends it: to the whole process group.
        self.process = subprocess.Popen(
            args,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.env = env
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip())

    def line_starting(self, prefix: str) -> str | None:
        return next((line for line in self.lines if line.startswith(prefix)), None)


WEBHOOK_SECRET = f"whsec-e2e-{secrets.token_hex(8)}"


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """Ray's temp folder for this run (short: Ray puts unix sockets in it), so its logs are ours."""
    folder = Path(tempfile.mkdtemp(prefix="aray", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def audience_up(tmp_path: Path, ray_tmp: Path) -> Iterator[Running]:
    env = audience_env(tmp_path, AUDIENCE_WEBHOOK_SECRET=WEBHOOK_SECRET, RAY_TMPDIR=str(ray_tmp))
    running = Running([AUDIENCE, "up", "--demo"], env)
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait(30)


def test_up_serves_the_api_and_ctrl_c_stops_every_process(
    audience_up: Running, ray_tmp: Path
) -> None:
    """Also: secure by default (an owner-only admin key, 401 without it) and no secret in
    the output, the Ray logs, `audience status` or the OpenAPI page."""
    wait_until(
        lambda: audience_up.line_starting("ready") or audience_up.process.poll() is not None,
        timeout_s=180,
    )
    assert audience_up.process.poll() is None, "\n".join(audience_up.lines)
    api_line = audience_up.line_starting("API")
    assert api_line is not None
    url = api_line.split()[1]
    family = psutil.Process(audience_up.process.pid).children(recursive=True)
    assert any("nats-server" in p.name() for p in family)
    assert any("raylet" in p.name() for p in family)

    key_file = Path(audience_up.line_starting("api key").split()[2])  # type: ignore[union-attr]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    env = audience_up.env
    shown = [httpx.get(f"{url}/openapi.json").text]
    assert httpx.get(f"{url}/v1/status").status_code == 401  # no key, no data
    with httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": key}) as api:
        assert api.get("/healthz").status_code == 200
        assert api.post("/v1/events", json=[event("e2e-user", "purchase", value=9.5)]).is_success
        profile = wait_until(lambda: _json_if_ok(api, "/v1/users/e2e-user"), timeout_s=60)
        assert profile["counts"]["purchase"] == 1 and profile["revenue"] == 9.5

        def applied() -> int:
            return sum(s["applied_events"] for s in api.get("/v1/status").json()["shards"])

        first = wait_until(applied, timeout_s=60)
        wait_until(lambda: applied() > first, timeout_s=60)  # the demo keeps publishing

        status = subprocess.run([AUDIENCE, "status"], env=env, capture_output=True, text=True)
        assert status.returncode == 0 and "shard" in status.stdout, status.stderr
        made = subprocess.run(
            [AUDIENCE, "keys", "create", "--scope", "read"], env=env, capture_output=True, text=True
        )
        reader = {"Authorization": f"Bearer {made.stdout.strip()}"}
        assert api.get("/v1/status", headers=reader).status_code == 401  # two keys: refused
        wait_until(lambda: httpx.get(f"{url}/v1/status", headers=reader).status_code == 200)
        assert httpx.post(f"{url}/v1/events", json=[], headers=reader).status_code == 403
        shown += [status.stdout, status.stderr, made.stderr]

    family = psutil.Process(audience_up.process.pid).children(recursive=True)
    os.killpg(audience_up.process.pid, signal.SIGINT)  # Ctrl-C, as a terminal sends it
    os.killpg(audience_up.process.pid, signal.SIGINT)  # and again, as impatient people do
    assert audience_up.process.wait(60) == 0, "\n".join(audience_up.lines[-20:])
    tracebacks = [i for i, line in enumerate(audience_up.lines) if "Traceback" in line]
    assert not tracebacks, "\n".join(audience_up.lines[tracebacks[0] : tracebacks[0] + 40])
    wait_until(lambda: "stopped" in audience_up.lines, timeout_s=10)
    wait_until(lambda: not [p for p in family if _alive(p)], timeout_s=30)

    shown += audience_up.lines
    logs = [p for p in ray_tmp.rglob("*") if p.is_file() and "logs" in p.parts]
    assert logs, "no Ray logs found"
    shown += [p.read_bytes().decode(errors="replace") for p in logs]
    nats_dir = Path(env["AUDIENCE_DATA_DIR"]) / "nats"
    shown += [p.read_text(errors="replace") for p in nats_dir.glob("*.log")]  # the server's
    logins = [json.loads(p.read_text())["password"] for p in (nats_dir / "auth").glob("*.json")]
    assert len(logins) == 4  # admin, api, shard, producer: generated, and...
    for secret in (key, key.split("_", 2)[2], WEBHOOK_SECRET, *logins):
        leaks = [text[:200] for text in shown if secret in text]
        assert not leaks, leaks  # ...never shown


def _json_if_ok(api: httpx.Client, path: str) -> dict | None:
    answer = api.get(path)
    return answer.json() if answer.status_code == 200 else None


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_taken_nats_port_ends_up_with_one_clear_error_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = audience_env(tmp_path, AUDIENCE_NATS_PORT=str(port))
        done = subprocess.run([AUDIENCE, "up"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"error: port {port} is already in use" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_invalid_settings_are_named_in_the_error(tmp_path: Path) -> None:
    env = audience_env(tmp_path, AUDIENCE_SHARDS="100")
    done = subprocess.run([AUDIENCE, "up"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "error: invalid settings" in done.stderr and "shards" in done.stderr
    assert "Traceback" not in done.stderr


def test_status_without_a_running_platform_says_so(tmp_path: Path) -> None:
    env = audience_env(tmp_path)
    done = subprocess.run([AUDIENCE, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "error: cannot reach the API" in done.stderr


def test_an_unreachable_external_nats_is_reported_not_a_traceback(tmp_path: Path) -> None:
    env = audience_env(tmp_path, AUDIENCE_NATS_URL=f"nats://127.0.0.1:{free_port()}")
    done = subprocess.run([AUDIENCE, "up"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "error: nats unavailable: cannot connect to nats://127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
