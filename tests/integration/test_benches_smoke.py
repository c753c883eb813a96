"""Every bench still runs: each one's ``--smoke`` run, as a subprocess, writes sane results.

Project rule: a bench that no longer runs fails ``make test``. Each bench starts
its own local Ray (``address="local"``), NATS and, for the serving bench, Ray
Serve and a uvicorn app, beside the suite's session Ray: so it runs in a session
of its own, without ``RAY_ADDRESS`` or ``AUDIENCE_*`` settings from this
process, with its own short Ray temp folder (Ray's socket paths must stay short),
and every process of that session is ended by pid when it is done, timed out
or failed. The figures of a smoke run mean nothing; what is checked is that each
step ran and the results hold together (events applied as sent, state exact,
positive latencies).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.sessions import end_session

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXIT_GRACE_S = 15.0  # for the bench's own processes to end after it did


def run_bench(name: str, out: Path, timeout_s: float, out_flag: str = "--out") -> None:
    """Run ``python -m tests.bench.<name> --smoke`` writing into ``out``, to completion.

    Fails when it does not end in ``timeout_s``, exits non-zero or leaves
    processes behind (its output's tail is in the message).
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_ADDRESS", "AUDIENCE_", "BENCH_BARE_"))
    }
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-smoke-"))
    env["RAY_TMPDIR"] = str(ray_tmp)
    log_path = out.parent / f"{name}-smoke.log"
    cmd = [sys.executable, "-m", f"tests.bench.{name}", "--smoke", out_flag, str(out)]
    started = time.monotonic()
    timed_out = False
    with log_path.open("w") as log:
        process = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            left = end_session(process, EXIT_GRACE_S)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    took = time.monotonic() - started
    output = log_path.read_text(errors="replace")
    tail = output[-6000:]
    assert not timed_out, f"{name} --smoke still running after {timeout_s:g} s:\n{tail}"
    assert process.returncode == 0, f"{name} --smoke exited {process.returncode}:\n{tail}"
    assert not left, f"processes left behind by {name} --smoke: {left}"
    print(f"{name} --smoke: {took:.1f} s")


def results(out: Path, name: str) -> dict[str, Any]:
    """``<name>.json`` from ``out``, once the Markdown beside it is there too."""
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    assert json_path.is_file() and md_path.is_file(), sorted(p.name for p in out.glob("*"))
    assert md_path.read_text().startswith("| ")  # a Markdown table
    report: dict[str, Any] = json.loads(json_path.read_text())
    return report


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and value > 0


def test_serving_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_bench("serving", out, timeout_s=240)
    r = results(out, "serving")
    assert r["smoke"] is True
    s = r["setup"]
    # Every simulated event was replayed (with the producer's NATS login) and applied.
    assert s["events"] > 0 and s["replayed_events"] == s["events"], s
    assert s["rejected_events"] == 0
    assert s["benchmark_users"] > 0 and s["items_indexed"] > 0
    assert set(s["versions"]) == {"churn", "personalization"}
    # The platform and the bare app scored the same snapshot the same.
    for name in ("churn", "personalize"):
        check = r["answers_match"][name]
        assert check["users"] > 0 and check["same_answer"] == check["users"], (name, check)
    rate, seconds = float(r["args"]["rate"]), float(r["args"]["open_seconds"])
    for name in ("churn", "personalize"):
        e = r["endpoints"][name]
        assert positive(e["p50_ratio"]), e["p50_ratio"]
        for server in ("platform", "bare"):
            for phase in ("sequential", "open_loop", "closed_loop"):
                m = e[server][phase]
                where = (name, server, phase, m)
                assert m["ok"] > 0 and positive(m["p50_ms"]), where
                assert m["p50_ms"] <= m["p99_ms"] <= m["max_ms"], where
                # Answered requests were all 200s (an overloaded server may leave some late).
                assert all(k.startswith("unanswered_") for k in m["error_kinds"]), where
            assert e[server]["open_loop"]["requests"] == round(rate * seconds)
            assert positive(e[server]["closed_loop"]["rps"])
    # CPU per request net of an idle window as long: on Ray Serve (model routes, trivial app).
    serve = [r["endpoints"][n]["platform"] for n in ("churn", "personalize")]
    for runs in [*serve, r["endpoints"]["trivial"]["serve"]]:
        for phase in ("open_loop", "closed_loop"):
            net = runs[phase]["server_cpu_ms_per_request_net_of_idle"]
            assert isinstance(net, int | float), (phase, runs[phase])
    # The personalize open loop again while `audience simulate` published into the stream.
    u, summary = r["under_ingest"], r["summary"]
    assert u["requests"] == round(rate * seconds) and u["ok"] > 0, u
    assert u["freshness"]["messages"] > 0 and not u["publisher"].get("error"), u
    for key in (
        "personalize_p99_ms_100rps_under_ingest",
        "under_ingest_published_events_per_s",
        "under_ingest_freshness_p99_ms",
    ):
        assert positive(summary[key]), (key, summary[key])
    assert "personalize_p99_ms_100rps_under_ingest" in r["summary_pass"]
    assert positive(r["total_s"])


def test_chaos_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_bench("chaos", out, timeout_s=180)
    r = results(out, "chaos")
    assert r["smoke"] is True
    assert r["exact"] is True
    assert r["users_checked"] > 1000 and r["mismatched_users"] == 0
    assert r["deleted_present"] == 0
    assert r["malformed_injected"] > 0 and r["dead_letters"] == r["malformed_injected"]
    assert r["events_published"] >= r["plan"]["events"] and r["duplicates_injected"] > 0
    assert len(r["kills"]) == r["plan"]["kills"] >= 1
    for kill in r["kills"]:  # each killed shard restored a snapshot and caught up
        assert kill.get("restored"), kill
        assert 0 < kill["consuming_after_s"] <= kill["caught_up_after_s"], kill
    assert positive(r["nats_restart_s"])
    assert positive(r["recovery_consuming_s"]["max"])
    assert positive(r["ray_bare_restart_s"]["max"])
    assert positive(r["snapshot"]["bytes_max"])


def test_rescale_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_bench("rescale", out, timeout_s=180)
    r = results(out, "rescale")
    assert r["smoke"] is True
    assert r["exact"] is True and r["mismatched_users"] == 0
    assert r["queries_failed"] == 0, r["query_failures"]
    assert r["events"] == round(r["rate"] * r["duration_s"]) and r["users"] > 0
    assert [(s["from"], s["to"]) for s in r["rescales"]] == [(2, 4), (4, 1)]
    for step in r["rescales"]:  # moved by snapshot hand-off, none replayed from the stream
        assert step["moved"] > 0 and step["handed_over"] == step["moved"], step
        assert positive(step["took_s"]) and positive(step["snapshot_bytes"]), step
    steady = r["query_ms"]["steady"]
    assert steady["calls"] > 0 and positive(steady["p50"]), steady


def test_segments_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_bench("segments", out, timeout_s=60)
    r = results(out, "segments")
    assert r["smoke"] is True
    assert 0 < r["rows"] <= r["users"]
    assert [p["now_days"] for p in r["points"]] == [3, 12]
    for p in r["points"]:
        assert p["rows"] == r["rows"] and 0 < p["step_rows"] <= p["step_events"], p
        assert positive(p["refresh_ms"]) and positive(p["update_us"]), p


def test_pipeline_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_bench("pipeline", out, timeout_s=240, out_flag="--out-dir")
    r = results(out, "bench")
    assert r["smoke"] is True
    ingest = r["ingest"]
    assert ingest["events"] > 0 and ingest["applied_events"] == ingest["events"], ingest
    assert ingest["complete"] is True and r["ingest_complete"] is True
    assert positive(r["ingest_events_per_s"]) and positive(r["plain_loop_events_per_s"])
    # Smoke skips the reference engines (their venv is not part of `make test`).
    assert r["bytewax_skipped_reason"] and r["flink_skipped_reason"]
    assert positive(r["freshness_p50_ms"]) and r["freshness_p50_ms"] <= r["freshness_p99_ms"]
    assert positive(r["bytes_per_user"])
