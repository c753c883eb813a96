"""Multi-node Ray on this machine: shards and Serve replicas over raylets, a node added, one lost.

The scenario (``tests/support/multinode.py``) runs in a subprocess with a Ray
cluster of its own (the suite's local Ray holds this process) and writes what
it saw as JSON: on which node each shard and Serve replica ran before and after,
that a 1-CPU actor ran on the node added, and that the shard of the removed
node came back on the new one from its snapshot with every user's counts
exact. A node can go two ways: stopped (its raylet says goodbye: Ray knows at
once) or crashed (Ray learns it from missed health checks, seconds later).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from actors.checkpoint_store import partition_of_name
from actors.jetstream import StreamNames, ensure_streams
from cluster.nats_server import EmbeddedNats
from tests.support.sessions import end_session

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCENARIO_TIMEOUT_S = 240.0
# Ray's defaults: the GCS checks a node every 3 s and declares it dead after 5
# missed checks, so a crashed node's actors restart only after ~15 s.
CRASH_DETECTION_S = 3.0 * 5


@pytest.fixture
def nats_for_multinode(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A fresh server per scenario: snapshots of the same pool name must not carry over."""
    with EmbeddedNats(tmp_path / "nats") as server:
        asyncio.run(_streams(server.url))
        yield server


async def _streams(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await ensure_streams(nc.jetstream(), StreamNames())
    finally:
        await nc.close()


def run_scenario(url: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    """Run the scenario in its own session; end it and every process it started, by pid."""
    out, log_path = tmp_path / "result.json", tmp_path / "scenario.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    args = [sys.executable, "-m", "tests.support.multinode", "--nats-url", url, "--out", str(out)]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*args, *extra],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            process.wait(timeout=SCENARIO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        finally:
            left = end_session(process, grace_s=15)
    output = log_path.read_text(errors="replace")
    assert out.exists(), f"no result (exit {process.returncode}):\n{output[-6000:]}"
    result: dict[str, Any] = json.loads(out.read_text())
    assert result["error"] is None, f"{result['error']}\n{output[-6000:]}"
    assert process.returncode == 0, output[-6000:]
    assert not left, f"processes left behind by the scenario: {left}"
    shown = {k: v for k, v in result.items() if k.endswith("_s") or k.startswith("calls_")}
    print(json.dumps(shown, indent=1))
    return result


def assert_spread_and_recovered(result: dict[str, Any], recovery_bound_s: float) -> None:
    """The placement, scale-up and recovery facts every way of losing a node must show."""
    workers, head, new = result["workers"], result["head"], result["new_node"]
    before, after = result["shard_nodes_before"], result["shard_nodes_after"]
    victim, removed = result["victim"], result["removed_node"]

    # Spread: one shard per worker node, one Serve replica per worker node, and
    # each replica answered exact profiles from both shards.
    assert len(workers) == 2 and head not in workers
    assert sorted(before) == sorted(workers)
    assert result["replica_nodes_before"] == sorted(workers)
    assert sorted(result["serve_nodes_answering_before"]) == sorted(workers)
    assert result["serve_exact_before"] and result["mismatched_before"] == 0
    assert all(result["checkpoints_before"])

    # Scale-up: a node joined, and an actor that needs its CPU ran there.
    assert new not in workers and result["probe_node"] == new
    assert result["node_add_s"] < 30

    # Loss: the removed node's shard restarted on the new node from its newest
    # snapshot and replayed; the other shard never moved; state exact.
    assert removed == before[victim]
    assert after[victim] == new != removed
    assert after[1 - victim] == before[1 - victim] and not result["other_shard_restarted"]
    assert removed not in result["alive_nodes_after"] and new in result["alive_nodes_after"]
    restored, last = result["restored"], result["last_snapshot_before_removal"]
    scope = result["snapshot_scope"]
    assert restored and all(partition_of_name(scope, n) == int(p) for p, n in restored.items())
    assert restored[str(partition_of_name(scope, last))] >= last  # the newest, not an older one
    assert result["exact"], result["mismatched_users"]
    assert result["users_checked"] == result["users"]
    assert 0 < result["removal_to_consuming_s"] <= result["removal_to_caught_up_s"]
    assert result["removal_to_caught_up_s"] < recovery_bound_s

    # Serve replaced the replica it lost, on the new node, and it answers exactly.
    assert result["replica_nodes_after"] == sorted([before[1 - victim], new])
    assert sorted(result["serve_nodes_answering_after"]) == result["replica_nodes_after"]
    assert result["serve_exact_after"]


def test_shards_and_replicas_spread_over_nodes_and_a_stopped_node_s_shard_recovers_elsewhere(
    nats_for_multinode: EmbeddedNats, tmp_path: Path
) -> None:
    result = run_scenario(nats_for_multinode.url, tmp_path, "--rescale")
    assert result["abrupt"] is False
    assert_spread_and_recovered(result, recovery_bound_s=10.0)

    # Scale-up by rescale: a fourth node joined, the pool went from 2 to 3
    # shards live, the new shard runs on the new node, and the partitions it
    # took were handed over (snapshots at positions), not replayed.
    rescale, nodes = result["rescale"], result["shard_nodes_rescaled"]
    assert rescale["from"] == 2 and rescale["to"] == 3
    assert rescale["moved"] == rescale["handed_over"] > 0
    assert nodes[2] == result["rescale_node"] and len(set(nodes)) == 3
    assert result["rescale_exact"], result["rescale_mismatched_users"]
    assert result["rescale_serve_exact"]


def test_a_crashed_node_s_shard_recovers_exactly_once_ray_declares_the_node_dead(
    nats_for_multinode: EmbeddedNats, tmp_path: Path
) -> None:
    result = run_scenario(nats_for_multinode.url, tmp_path, "--abrupt")
    assert result["abrupt"] is True
    assert_spread_and_recovered(result, recovery_bound_s=CRASH_DETECTION_S + 20.0)
