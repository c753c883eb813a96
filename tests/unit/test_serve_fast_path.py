"""The environment that turns on Ray Serve's fast path, per instance."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.serve_fast_path import OWNER, SWITCHES, ServeFastPath, fast_path_env, short_folder

NODE_ID = "f" * 56  # HAProxy's files go in a subfolder named by the Ray node's id


@pytest.fixture(autouse=True)
def own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the environment without Serve's settings (a test session may have set them)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_") and k != OWNER}
    monkeypatch.setattr(os, "environ", clean)


def test_each_instance_gets_its_own_files_and_ports() -> None:
    one, two = short_folder(), short_folder()
    try:
        a, b = fast_path_env(one), fast_path_env(two)
        assert {k: a[k] for k in SWITCHES} == SWITCHES
        paths = [k for k in a if k.endswith(("_LOC", "_PATH", "_BASE", "_FILE"))]
        assert len(paths) == 5
        for key in paths:
            assert a[key] != b[key] and a[key].startswith(str(one)), key
        for key in ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT"):
            assert int(a[key]) > 0
        assert a["RAY_SERVE_HAPROXY_METRICS_PORT"] != a["RAY_SERVE_HAPROXY_STATS_PORT"]
    finally:
        one.rmdir()
        two.rmdir()


def test_socket_paths_fit_haproxys_limit_with_the_node_folder() -> None:
    folder = short_folder()
    try:
        env = fast_path_env(folder)
        for key in ("RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"):
            path = Path(env[key])
            assert len(str(path.parent / NODE_ID / path.name)) <= 97, key
    finally:
        folder.rmdir()


def test_apply_keeps_what_the_operator_set_and_undo_restores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    fast = ServeFastPath()
    applied = fast.apply()
    assert fast.folder is not None and fast.folder.is_dir()
    assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in applied
    assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert fast.haproxy  # the bundled binary comes with ray[serve] on Linux
    folder = fast.folder
    fast.undo()
    assert not any(key in os.environ for key in applied)
    assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    assert OWNER not in os.environ
    assert not folder.exists()


def test_without_an_haproxy_binary_only_the_throughput_settings_are_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "no-haproxy"))
    fast = ServeFastPath()
    assert fast.apply() == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    assert not fast.haproxy
    fast.undo()
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in os.environ


def test_a_child_process_chooses_its_own_files_and_ports() -> None:
    parent = ServeFastPath()
    parent.apply()
    os.environ[OWNER] = "1"  # as a child process sees its parent's choice: another pid
    child = ServeFastPath()
    try:
        applied = child.apply()
        assert applied["RAY_SERVE_HAPROXY_SOCKET_PATH"].startswith(str(child.folder))
        assert child.folder != parent.folder
        assert os.environ[OWNER] == str(os.getpid())
    finally:
        child.undo()
        parent.undo()
