"""The ``audience`` command: ``up``, ``simulate``, ``replay``, ``status``, ``checkpoint``,
``rescale``, ``keys``.

Every failure a user can cause (bad settings, a taken port, nothing running)
ends in one ``error:`` line and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

    rescale = commands.add_parser(
        "rescale", help="change the shard count live (partitions are handed over)"
    )
    rescale.add_argument("shards", type=int, help="the new shard count (1..partitions)")
    rescale.add_argument("--url", help="API base URL; default: the running `audience up`")
    rescale.set_defaults(run=_rescale)

    nats_users = commands.add_parser(
        "nats-users", help="where the NATS logins of each role are (never the secrets)"
    )
    nats_users.add_argument(
        "--permissions", action="store_true", help="also list what each role may do"
    )
    nats_users.set_defaults(run=_nats_users)

    keys = commands.add_parser("keys", help="create, list or revoke API keys")
    keys.add_argument("action", choices=["create", "list", "revoke"])
    keys.add_argument("key_id", nargs="?", help="the key's id (for revoke)")
    keys.add_argument(
        "--scope",
        action="append",
        choices=["ingest", "read", "admin"],
        help="what the key may do; repeat for several (admin implies the others)",
    )
    keys.add_argument("--name", default="", help="a note: who or what uses the key")
    keys.add_argument("--rate", type=float, help="requests/s for this key (default: the setting)")
    keys.add_argument("--burst", type=float, help="burst for this key (default: the setting)")
    keys.add_argument("--out", type=Path, help="write the key to this file (0600), not stdout")
    keys.add_argument(
        "--api-keys-file",
        type=Path,
        help="key store (AUDIENCE_API_KEYS_FILE); default: data folder",
    )
    keys.set_defaults(run=_keys)
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
        print(f"NATS      {_nats_line(platform, info.nats_url)}")
        print(f"API       {info.http_url}   (docs: {info.http_url}/docs)")
        hint = "" if settings.dashboard_public or not settings.api_auth else "   (asks for a key)"
        print(f"dashboard {info.http_url}/dashboard{hint}")
        if platform.admin_key_file is not None:
            print(f"api key   {platform.admin_key_file}   (admin; send as 'Authorization: Bearer')")
        elif not settings.api_auth:
            print(
                "api key   none: AUDIENCE_API_AUTH=false, the API is open to anyone who reaches it"
            )
        print(f"status    audience status   (or {info.http_url}/v1/status)")
        if info.metrics_url:
            print(f"metrics   {info.metrics_url}   (Prometheus)")
        producer = platform.credentials("producer")
        demo = _start_demo(settings, info.nats_url, stop, producer) if args.demo else None
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


def _nats_line(platform: Any, nats_url: str) -> str:
    """The NATS URL (no secrets) and whether, and where, its users are kept."""
    from actors.nats_auth import redact_url

    users = platform.nats.users if platform.nats is not None else None
    if users is not None:
        return (
            f"{redact_url(nats_url)}   (auth on: a login per role in {users.folder}; "
            "see `audience nats-users`)"
        )
    if platform.nats is not None:
        return f"{nats_url}   (auth OFF: AUDIENCE_NATS_EMBEDDED_AUTH=false)"
    return redact_url(nats_url)


def _nats_users(args: argparse.Namespace, settings: Settings) -> int:
    """``audience nats-users``: each role's login file, inbox prefix and (optionally) rights."""
    from actors.nats_auth import redact_url
    from cluster.launcher import RuntimeInfo, embedded_users_of, nats_credentials_of
    from cluster.nats_users import ROLES, inbox_prefix, permissions

    if not settings.embedded_nats:
        creds = nats_credentials_of(settings, "producer")
        who = creds.identity if creds is not None else "no credentials"
        print(f"external NATS {redact_url(settings.nats_url)}: every component signs in with")
        print(f"the settings' login ({who}); its users and permissions are the server's.")
        return 0
    if not settings.nats_embedded_auth:
        print("embedded NATS without auth (AUDIENCE_NATS_EMBEDDED_AUTH=false): anyone who")
        print("reaches its port can read and write every stream.")
        return 0
    users = embedded_users_of(settings)
    if not users.path("admin").exists():
        return _fail(f"no NATS users in {users.folder} yet: `audience up` creates them")
    info = RuntimeInfo.load(settings.data_dir)
    print(f"NATS      {info.nats_url if info else '(not running)'}")
    print("role      login file (JSON: user, password, inbox_prefix; mode 0600)")
    for role in ROLES:
        print(f"{role:<9} {users.path(role)}   user {role!r}, inbox prefix {inbox_prefix(role)}")
        if args.permissions:
            rights = permissions(role, users.names)
            print(f"          publish:   {' '.join(rights.publish)}")
            print(f"          subscribe: {' '.join(rights.subscribe)}")
    print("producers: sign in with producer.json's user and password, and use its inbox")
    print("prefix (nats-py: inbox_prefix=...) so the stream's acks reach you.")
    return 0


def _start_demo(
    settings: Settings, nats_url: str, stop: threading.Event, credentials: Any = None
) -> threading.Thread:
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
                credentials=credentials,
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
    from cluster.launcher import find_nats, nats_credentials_of, policy_of
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
            credentials=nats_credentials_of(settings, "producer"),
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
    from cluster.launcher import find_nats, nats_credentials_of

    nats_url, _ = find_nats(settings, args.nats_url)
    admin = nats_credentials_of(settings, "admin")  # reading the stream is the shards' or admin's
    return asyncio.run(stream_history(nats_url, settings.stream, credentials=admin))


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
    from cluster.launcher import RuntimeInfo, nats_credentials_of
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
            producer = nats_credentials_of(settings, "producer")
            replay = run_replay(info.nats_url, info.partitions, settings.batch_max_events, producer)
            registry = ModelRegistry(settings.registry_path)
            results["live"] = evaluate_live(
                frame,
                ranker,
                registry,
                info.http_url,
                replay,
                seed=args.seed,
                api_key=_api_key(settings),
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


def _api_key(settings: Settings) -> str | None:
    """The key API calls send: ``AUDIENCE_API_KEY``, else the admin key ``audience up`` wrote."""
    given = settings.api_key.get_secret_value()
    if given:
        return given
    try:
        return settings.admin_key_path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _api_request(
    settings: Settings, url: str, method: str = "GET", body: Any = None
) -> urllib.request.Request:
    """A request to the API carrying the key, if there is one (and ``body`` as JSON)."""
    key = _api_key(settings)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    return urllib.request.Request(url, data=data, method=method, headers=headers)


def _refused(exc: urllib.error.HTTPError) -> str:
    """An API refusal in one line (its JSON ``detail``; never the key sent)."""
    body = exc.read().decode(errors="replace")
    with contextlib.suppress(ValueError, AttributeError):
        body = json.loads(body)["detail"]
    hint = (
        "; set AUDIENCE_API_KEY or make one with `audience keys create`"
        if exc.code
        in (
            401,
            403,
        )
        else ""
    )
    return f"the API answered {exc.code}: {body}{hint}"


def _status(args: argparse.Namespace, settings: Settings) -> int:
    url = _api_url(args, settings)
    try:
        request = _api_request(settings, f"{url}/v1/status")
        with urllib.request.urlopen(request, timeout=30) as answer:
            status = json.load(answer)
    except urllib.error.HTTPError as exc:
        return _fail(_refused(exc))
    except (urllib.error.URLError, OSError) as exc:
        return _fail(f"cannot reach the API at {url}: {exc}")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(status))
    return 0


def _checkpoint(args: argparse.Namespace, settings: Settings) -> int:
    url = _api_url(args, settings)
    request = _api_request(settings, f"{url}/v1/checkpoints", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            stored = json.load(answer)["checkpoints"]
    except urllib.error.HTTPError as exc:
        return _fail(f"checkpoint refused: {_refused(exc)}")
    except (urllib.error.URLError, OSError) as exc:
        return _fail(f"cannot reach the API at {url}: {exc}")
    for shard, snap in enumerate(stored):
        print(
            f"shard {shard}: {snap['partitions']} partitions, {snap['bytes'] / 1e6:.1f} MB "
            f"in {snap['took_s']} s (newest {snap['name']})"
        )
    return 0


def _rescale(args: argparse.Namespace, settings: Settings) -> int:
    url = _api_url(args, settings)
    request = _api_request(settings, f"{url}/v1/shards", "POST", {"shards": args.shards})
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            report = json.load(answer)
    except urllib.error.HTTPError as exc:
        return _fail(f"rescale refused: {_refused(exc)}")
    except (urllib.error.URLError, OSError) as exc:
        return _fail(f"cannot reach the API at {url}: {exc}")
    print(
        f"{report['from']} -> {report['to']} shards in {report['took_s']} s: "
        f"{report['moved']} partitions handed over "
        f"({report['snapshot_bytes'] / 1e6:.1f} MB of snapshots)"
    )
    return 0


def _keys(args: argparse.Namespace, settings: Settings) -> int:
    """``audience keys``: the store file is the truth; running replicas follow it within ~1 s."""
    from serving.auth import KeyStore, write_private

    store = KeyStore(args.api_keys_file or settings.api_keys_path)
    try:
        if args.action == "list":
            for record in store.load():
                shown = record.public()
                rate = f"  rate {record.rate_per_s:g}/s" if record.rate_per_s else ""
                print(
                    f"{record.id}  {','.join(record.scopes):<18} {shown['created']}  "
                    f"{record.name}{rate}"
                )
            return 0
        if args.action == "revoke":
            if not args.key_id:
                return _fail("usage: audience keys revoke KEY_ID")
            if not store.revoke(args.key_id):
                return _fail(f"no key with id {args.key_id} in {store.path}")
            print(f"revoked   {args.key_id} (running API replicas drop it within seconds)")
            return 0
        if not args.scope:
            return _fail("give at least one --scope (ingest, read, admin)")
        key, record = store.create(args.scope, args.name, args.rate, args.burst)
    except (OSError, ValueError) as exc:
        return _fail(f"key store {store.path}: {exc}")
    if args.out is not None:
        try:
            write_private(args.out, key + "\n")
        except OSError as exc:  # nobody could hold the key: take its record back
            store.revoke(record.id)
            return _fail(f"cannot write the key to {args.out}: {exc.strerror}")
        print(f"key       {record.id} ({', '.join(record.scopes)}) written to {args.out}")
    else:
        print(key)  # shown once: only its hash is stored
        print(f"id {record.id}, scopes {', '.join(record.scopes)}; shown once", file=sys.stderr)
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


def _ranges(partitions: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` as ``0-2,5,7-8`` (a rescale leaves gaps); "-" for none."""
    spans: list[list[int]] = []
    for p in sorted(partitions):
        if spans and p == spans[-1][1] + 1:
            spans[-1][1] = p
        else:
            spans.append([p, p])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans) or "-"


def format_status(status: dict[str, Any]) -> str:
    """A readable summary of ``GET /v1/status``."""
    lines = [
        "shard  users      applied    rejected  partitions  lag  fresh p50/p99 ms  "
        "insights lag ms  snapshot"
    ]
    for s in status["shards"]:
        if "partitions" not in s:  # dead or restarting: only that is known
            lines.append(f"{s['shard']:>5}  recovering: {s.get('detail', '')}")
            continue
        lag = sum(s.get("lag", {}).values())
        fresh = s.get("freshness_ms", {})
        p50, p99 = fresh.get("p50"), fresh.get("p99")
        fresh_text = f"{p50:.1f}/{p99:.1f}" if p50 is not None and p99 is not None else "-"
        folded = (s.get("insights_lag_ms") or {}).get("p99")
        folded_text = "-" if folded is None else f"{folded:.0f}"
        span = _ranges(s["partitions"])
        lines.append(
            f"{s['shard']:>5}  {s['users']:>9}  {s['applied_events']:>9}  "
            f"{sum(s['rejected'].values()):>8}  {span:>10}  {lag:>3}  {fresh_text:>16}  "
            f"{folded_text:>15}  {_snapshot_text(s)}"
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
        verb = "applied" if scaling.get("applied") else "recommended"
        lines.append(
            f"autoscaling: {last['current']} shards -> {last['desired']} {verb} ({last['reason']})"
        )
        rescales = [d["rescale"] for d in scaling["decisions"] if "rescale" in d]
        if rescales:
            r = rescales[-1]
            lines.append(
                f"last rescale: {r['error']}"
                if "error" in r
                else f"last rescale: {r['from']} -> {r['to']} shards live in {r['took_s']} s, "
                f"{r['moved']} partitions handed over"
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
