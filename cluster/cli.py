"""The ``audience`` command: ``up``, ``simulate``, ``replay``, ``status``, ``checkpoint``.

Every failure a user can cause (bad settings, a taken port, nothing running)
ends in one ``error:`` line and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from actors.errors import AudienceError
from cluster.settings import Settings

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
        overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
        result: int = args.run(args, settings)
        return result
    except ValidationError as exc:
        return _fail("invalid settings: " + "; ".join(_describe(e) for e in exc.errors()))
    except AudienceError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


def _describe(error: Any) -> str:
    field = ".".join(str(x) for x in error["loc"])
    return f"{field}: {error['msg']}" if field else str(error["msg"])


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audience", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start NATS, Ray, the shard pool and the API")
    up.add_argument("--demo", action="store_true", help="also publish simulated traffic")
    up.add_argument("--shards", type=int, help="shard actors (AUDIENCE_SHARDS)")
    up.add_argument("--http-port", type=int, help="API port (AUDIENCE_HTTP_PORT)")
    up.set_defaults(run=_up)

    sim = commands.add_parser("simulate", help="publish a simulated audience")
    sim.add_argument("--users", type=int, default=100_000)
    sim.add_argument("--rate", type=float, default=20_000, help="events per second")
    sim.add_argument("--duration", type=float, default=60, help="seconds")
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument("--time-scale", type=float, default=1.0, help="event-time speed-up")
    sim.add_argument(
        "--start-ms", type=int, help="event time of the first event (epoch ms); default: now"
    )
    sim.add_argument("--nats-url", help="NATS URL; default: the running `audience up`")
    sim.set_defaults(run=_simulate)

    rep = commands.add_parser("replay", help="publish recorded history (MovieLens, event files)")
    _history_arguments(rep)
    rep.add_argument(
        "--speed", type=float, default=0.0, help="event time per wall time; 0: as fast as possible"
    )
    rep.add_argument(
        "--holdout-last", action="store_true", help="skip each user's last item (test items)"
    )
    rep.add_argument("--nats-url", help="NATS URL; default: the running `audience up`")
    rep.set_defaults(run=_replay)

    train = commands.add_parser("train", help="train the churn and personalization models")
    source = _history_arguments(train)
    source.add_argument(
        "--from-stream", action="store_true", help="every event in the running platform's stream"
    )
    source.add_argument("--simulated-users", type=int, help="train on simulated history")
    source.add_argument(
        "--demo", action="store_true", help="the demo's models, if the registry has none"
    )
    train.add_argument("--kind", choices=["churn", "personalization", "both"], default="both")
    train.add_argument(
        "--horizon-days", type=float, help="churn horizon (AUDIENCE_CHURN_HORIZON_DAYS)"
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-promote", action="store_true", help="store without making it current")
    train.add_argument("--nats-url", help="for --from-stream; default: the running `audience up`")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("evaluate", help="evaluate the models (MovieLens, Telco)")
    evaluate.add_argument("--ratings", type=Path, help="MovieLens ratings.csv")
    evaluate.add_argument("--movies", type=Path, help="MovieLens movies.csv (categories)")
    evaluate.add_argument("--telco", type=Path, help="Telco-Customer-Churn.csv")
    evaluate.add_argument("--out", type=Path, help="write the results as JSON here")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument(
        "--live", action="store_true", help="also through the running platform (NATS, actors, API)"
    )
    evaluate.set_defaults(run=_evaluate)

    models = commands.add_parser("models", help="list or promote model versions")
    models.add_argument("action", choices=["list", "promote"])
    models.add_argument("kind", nargs="?", choices=["churn", "personalization"])
    models.add_argument("version", nargs="?", help="e.g. v0002 (for promote)")
    models.set_defaults(run=_models)

    status = commands.add_parser("status", help="lag, applied events and dead letters")
    status.add_argument("--url", help="API base URL; default: the running `audience up`")
    status.add_argument("--json", action="store_true", help="print raw JSON")
    status.set_defaults(run=_status)

    checkpoint = commands.add_parser("checkpoint", help="snapshot every shard now")
    checkpoint.add_argument("--url", help="API base URL; default: the running `audience up`")
    checkpoint.set_defaults(run=_checkpoint)
    return parser


def _history_arguments(parser: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """--ratings / --events (one of them required) and --movies; the group, to add sources to."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ratings", type=Path, help="MovieLens ratings.csv")
    source.add_argument("--events", type=Path, help="events as JSON lines or Parquet")
    parser.add_argument("--movies", type=Path, help="MovieLens movies.csv (categories)")
    return source


def _up(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.launcher import Platform

    platform = Platform(settings)
    trainer: subprocess.Popen[bytes] | None = None
    stop = threading.Event()
    signalled: list[int] = []  # appended by the handlers: no locks in a signal handler
    # While starting, a signal unwinds through Platform.start, which stops what
    # it started; once up, it only asks the main thread to stop.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        info = platform.start()
        signal.signal(signal.SIGTERM, lambda signum, _: signalled.append(signum))
        signal.signal(signal.SIGINT, lambda signum, _: signalled.append(signum))
        print(f"NATS      {info.nats_url}")
        print(f"API       {info.http_url}   (docs: {info.http_url}/docs)")
        print(f"dashboard {info.http_url}/dashboard")
        print(f"status    audience status   (or {info.http_url}/v1/status)")
        if info.metrics_url:
            print(f"metrics   {info.metrics_url}   (Prometheus)")
        demo = _start_demo(settings, info.nats_url, stop) if args.demo else None
        if demo is not None:
            print(f"demo      {settings.demo_rate:.0f} events/s over {settings.demo_users} users")
            if settings.serve_models:
                trainer = _train_demo_models(settings)
        print("ready     press Ctrl-C to stop", flush=True)
        # Event.set from a handler can deadlock with a second signal arriving
        # inside it (both take the Event's lock): poll a list instead.
        while not signalled and not stop.wait(0.2):
            pass
        stop.set()
        print("stopping...", flush=True)
        if demo is not None:
            demo.join(timeout=10)
    finally:
        _stop_child(trainer)
        platform.stop()
    print("stopped", flush=True)
    return 0


def _train_demo_models(settings: Settings) -> subprocess.Popen[bytes]:
    """Train models on simulated history in a child process if the registry has none.

    A child, attached to this platform's Ray, so that stopping is prompt and
    clean: it is interrupted like the rest, never left using a Ray being shut down.
    """
    import ray

    env = {**os.environ, "AUDIENCE_RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    env["AUDIENCE_DATA_DIR"] = str(settings.data_dir)
    env["AUDIENCE_REGISTRY_DIR"] = str(settings.registry_path)
    # Its own session: a terminal's Ctrl-C (twice, from impatient people) reaches the
    # whole foreground group; the parent alone interrupts the child, once.
    return subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "train", "--demo"], env=env, start_new_session=True
    )


def _stop_child(child: subprocess.Popen[bytes] | None) -> None:
    """Interrupt a child process and wait for it, killing it if it lingers."""
    if child is None or child.poll() is not None:
        return
    child.send_signal(signal.SIGINT)
    try:
        child.wait(timeout=15)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _start_demo(settings: Settings, nats_url: str, stop: threading.Event) -> threading.Thread:
    from cluster.simulate import publish_simulation

    async def run() -> None:
        halt = asyncio.Event()
        task = asyncio.create_task(
            publish_simulation(
                nats_url,
                settings.partitions,
                users=settings.demo_users,
                rate=settings.demo_rate,
                duration_s=365 * 86_400,
                seed=1,
                stop=halt,
            )
        )
        while not stop.is_set() and not task.done():
            await asyncio.sleep(0.2)
        halt.set()
        try:
            await task
        except AudienceError as exc:  # e.g. NATS gone first: say so, do not dump a trace
            print(f"demo stopped: {exc}", file=sys.stderr)

    thread = threading.Thread(target=lambda: asyncio.run(run()), name="demo", daemon=True)
    thread.start()
    return thread


def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.launcher import find_nats, policy_of
    from cluster.simulate import publish_simulation

    nats_url, partitions = find_nats(settings, args.nats_url)
    report = asyncio.run(
        publish_simulation(
            nats_url,
            partitions,
            users=args.users,
            rate=args.rate,
            duration_s=args.duration,
            seed=args.seed,
            start_ms=args.start_ms,
            time_scale=args.time_scale,
            max_batch=settings.batch_max_events,
            linger_ms=settings.linger_ms,
            policy=policy_of(settings),
        )
    )
    print(
        f"published {report.events} events in {report.messages} messages "
        f"({report.events_per_s:,.0f} events/s), {report.rejected} rejected"
    )
    return 0


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.replay import command

    return command(args, settings)


def _history(args: argparse.Namespace, settings: Settings) -> Any:
    """The training history a command's arguments name (a pandas frame)."""
    from cluster.train import simulated_history, stream_history
    from models.history import read_history, read_ratings

    if args.ratings is not None:
        return read_ratings(args.ratings, args.movies)
    if args.events is not None:
        return read_history(args.events)
    if args.simulated_users is not None:
        return simulated_history(args.simulated_users, days=60, seed=args.seed, end_ms=_now_ms())
    from cluster.launcher import find_nats

    nats_url, _ = find_nats(settings, args.nats_url)
    return asyncio.run(stream_history(nats_url, settings.stream))


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _train(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.train import KINDS, describe, ensure_ray, train_and_register, train_demo_models
    from models.registry import ModelRegistry
    from models.training import ChurnPlan

    if args.demo:
        started = ensure_ray(settings.num_cpus, settings.ray_address)
        try:
            demo = train_demo_models(settings.registry_path, settings.demo_users)
        finally:
            if started:
                import ray

                ray.shutdown()
        shown = describe(demo) if demo else f"loaded from {settings.registry_path}"
        print("models    " + shown.replace("\n", "\n          "), flush=True)
        return 0
    frame = _history(args, settings)
    kinds = KINDS if args.kind == "both" else (args.kind,)
    plan = ChurnPlan(horizon_days=args.horizon_days or settings.churn_horizon_days)
    started = ensure_ray(settings.num_cpus, settings.ray_address)
    try:
        report = train_and_register(
            frame,
            ModelRegistry(settings.registry_path),
            kinds=kinds,
            plan=plan,
            seed=args.seed,
            promote=not args.no_promote,
        )
    except ValueError as exc:
        return _fail(f"cannot train: {exc}")
    finally:
        if started:
            import ray

            ray.shutdown()
    print(describe(report))
    print(f"registry  {settings.registry_path}")
    return 0


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.evaluate import (
        evaluate_live,
        evaluate_offline,
        markdown,
        run_replay,
        write_results,
    )
    from cluster.launcher import RuntimeInfo
    from cluster.train import ensure_ray
    from models.history import read_ratings
    from models.registry import ModelRegistry

    if args.ratings is None and args.telco is None:
        return _fail("give --ratings (MovieLens) and/or --telco")
    if args.live and args.ratings is None:
        return _fail("--live needs --ratings")
    info = RuntimeInfo.load(settings.data_dir) if args.live else None
    if args.live and info is None:
        return _fail("--live needs a running `audience up` (none found in the data folder)")
    frame = read_ratings(args.ratings, args.movies) if args.ratings else None
    # --live: Ray Data runs on the platform's Ray cluster, beside it, not in a second one.
    started = ensure_ray(settings.num_cpus, "auto" if args.live else settings.ray_address)
    try:
        results, ranker = evaluate_offline(frame, args.telco, args.seed)
        if info is not None and frame is not None and ranker is not None:
            replay = run_replay(info.nats_url, info.partitions, settings.batch_max_events)
            registry = ModelRegistry(settings.registry_path)
            results["live"] = evaluate_live(
                frame, ranker, registry, info.http_url, replay, seed=args.seed
            )
    finally:
        if started:
            import ray

            ray.shutdown()
    print(markdown(results))
    if args.out:
        write_results(results, args.out)
        print(f"results   {args.out}")
    return 0


def _models(args: argparse.Namespace, settings: Settings) -> int:
    from models.registry import ModelRegistry

    registry = ModelRegistry(settings.registry_path)
    if args.action == "promote":
        if args.kind is None or args.version is None:
            return _fail("usage: audience models promote KIND VERSION")
        registry.promote(args.kind, args.version)
        print(f"{args.kind} {args.version} is current; replicas switch within seconds")
        return 0
    for kind in ("churn", "personalization"):
        current = registry.current(kind)
        shown = [f"{v}*" if v == current else v for v in registry.versions(kind)]
        print(f"{kind:<16} {' '.join(shown) or '(none)'}")
    return 0


def _api_url(args: argparse.Namespace, settings: Settings) -> str:
    """The API base URL: given, or the running ``audience up``'s."""
    from cluster.launcher import RuntimeInfo

    if args.url is not None:
        return str(args.url).rstrip("/")
    info = RuntimeInfo.load(settings.data_dir)
    return info.http_url if info else f"http://127.0.0.1:{settings.http_port}"


def _status(args: argparse.Namespace, settings: Settings) -> int:
    url = _api_url(args, settings)
    try:
        with urllib.request.urlopen(f"{url}/v1/status", timeout=30) as answer:
            status = json.load(answer)
    except (urllib.error.URLError, OSError) as exc:
        return _fail(f"cannot reach the API at {url}: {exc}")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(status))
    return 0


def _checkpoint(args: argparse.Namespace, settings: Settings) -> int:
    url = _api_url(args, settings)
    request = urllib.request.Request(f"{url}/v1/checkpoints", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            stored = json.load(answer)["checkpoints"]
    except urllib.error.HTTPError as exc:
        return _fail(f"checkpoint refused ({exc.code}): {exc.read().decode(errors='replace')}")
    except (urllib.error.URLError, OSError) as exc:
        return _fail(f"cannot reach the API at {url}: {exc}")
    for shard, snap in enumerate(stored):
        print(f"shard {shard}: {snap['name']}  {snap['bytes'] / 1e6:.1f} MB in {snap['took_s']} s")
    return 0


def _snapshot_text(shard: dict[str, Any]) -> str:
    """When a shard last snapshotted and how big it was, or why it answers stale-free."""
    if shard.get("recovering"):
        return "recovering"
    last = shard.get("checkpoint")
    if not last:
        return "none yet"
    age_s = max(0.0, time.time() - last["created_ms"] / 1000)
    return f"{age_s:.0f} s ago, {last['bytes'] / 1e6:.1f} MB"


def format_status(status: dict[str, Any]) -> str:
    """A readable summary of ``GET /v1/status``."""
    lines = ["shard  users      applied    rejected  partitions  lag  fresh p50/p99 ms  snapshot"]
    for s in status["shards"]:
        if "partitions" not in s:  # dead or restarting: only that is known
            lines.append(f"{s['shard']:>5}  recovering: {s.get('detail', '')}")
            continue
        lag = sum(s.get("lag", {}).values())
        fresh = s.get("freshness_ms", {})
        p50, p99 = fresh.get("p50"), fresh.get("p99")
        fresh_text = f"{p50:.1f}/{p99:.1f}" if p50 is not None and p99 is not None else "-"
        parts = s["partitions"]
        span = f"{parts[0]}-{parts[-1]}" if parts else "-"
        lines.append(
            f"{s['shard']:>5}  {s['users']:>9}  {s['applied_events']:>9}  "
            f"{sum(s['rejected'].values()):>8}  {span:>10}  {lag:>3}  {fresh_text:>16}  "
            f"{_snapshot_text(s)}"
        )
    lagging = {p: n for p, n in status["lag"].items() if n}
    lines.append("lag per partition: " + (json.dumps(lagging) if lagging else "none"))
    for warning in status.get("retention_warnings", []):
        lines.append(
            f"{warning['level'].upper()}: partition {warning['partition']}: {warning['detail']}"
        )
    scaling = status.get("autoscaling") or {}
    if scaling.get("decisions"):
        last = scaling["decisions"][-1]
        lines.append(
            f"autoscaling: {last['current']} shards -> {last['desired']} recommended "
            f"({last['reason']})"
        )
    dead = status["dead_letters"]
    lines.append("dead letters: " + (", ".join(f"{k}={v}" for k, v in dead.items()) or "none"))
    served = [
        f"{kind} {m['version']}" + (f" ({m['problem']})" if m.get("problem") else "")
        for kind, m in status.get("models", {}).items()
    ]
    lines.append("models: " + (", ".join(served) or "not served"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
