"""``audience train``: history from files, the stream or a simulation -> models in the registry.

The edge around :mod:`models.training`: it reads history (files through
:mod:`models.history`, the JetStream stream through NATS, or the simulator),
starts Ray if nobody did, trains the requested models and stores them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray

from actors.batch import EventBatch
from actors.codec import decode
from actors.errors import AudienceError, UnavailableError, WireError
from actors.nats_auth import NatsAuthError, NatsCredentials, redact_url
from actors.nats_auth import connect as nats_connect
from actors.simulator import Simulator
from actors.validation import ValidationPolicy, check_batch
from models.churn import KIND as CHURN
from models.evaluation import evaluate_ranking_offline
from models.history import batch_to_frame
from models.ranker import KIND as PERSONALIZATION
from models.registry import ModelRegistry
from models.training import ChurnPlan, train_churn

log = logging.getLogger(__name__)
KINDS = (CHURN, PERSONALIZATION)
DEMO_HORIZON_DAYS = 3.0  # simulated users fade with a 2-day half-life


@dataclass(frozen=True)
class TrainReport:
    """What a training run stored."""

    versions: dict[str, str]
    metrics: dict[str, Any]
    events: int
    users: int
    seconds: float


def train_and_register(
    frame: pd.DataFrame,
    registry: ModelRegistry,
    *,
    kinds: tuple[str, ...] = KINDS,
    plan: ChurnPlan | None = None,
    seed: int = 0,
    promote: bool = True,
    ranker_labels: int = 5,
) -> TrainReport:
    """Train each kind on ``frame`` and store it (Ray must be running, for Ray Data)."""
    if frame.empty:
        raise AudienceError("the history is empty: nothing to train on")
    started = time.monotonic()
    versions: dict[str, str] = {}
    metrics: dict[str, Any] = {}
    if CHURN in kinds:
        churn, metrics[CHURN] = train_churn(frame, plan or ChurnPlan(), seed=seed)
        versions[CHURN] = registry.save(churn.model, promote=promote)
    if PERSONALIZATION in kinds:
        # Trained without each user's last interaction, which it is then evaluated on.
        results, ranker = evaluate_ranking_offline(frame, seed=seed, labels=ranker_labels)
        metrics[PERSONALIZATION] = results
        ranker.model.meta["metrics"] = results
        versions[PERSONALIZATION] = registry.save(ranker.model, promote=promote)
    return TrainReport(
        versions=versions,
        metrics=metrics,
        events=len(frame),
        users=int(frame["user_id"].nunique()),
        seconds=time.monotonic() - started,
    )


def simulated_history(users: int, days: float, seed: int, end_ms: int) -> pd.DataFrame:
    """``days`` of simulated traffic ending at ``end_ms`` (generated at once, no pacing)."""
    start = end_ms - int(days * 86_400_000)
    simulator = Simulator(users, seed, start, time_scale=86_400.0)
    rate = max(1000.0, users * 3.0)  # events per simulated day
    chunks = [c.batch for c in simulator.batches(rate, days, chunk_s=1.0)]
    return batch_to_frame(EventBatch.concat(chunks))


async def stream_history(
    nats_url: str,
    stream: str,
    timeout_s: float = 30.0,
    credentials: NatsCredentials | None = None,
) -> pd.DataFrame:
    """Every valid event now in the JetStream stream, once per event id.

    Bad messages and rows are skipped and counted, as the shards dead-letter them.
    Reading the stream takes a login allowed to (the admin role).
    """
    try:
        nc = await asyncio.wait_for(
            nats_connect(nats_url, credentials, max_reconnect_attempts=1, connect_timeout=5),
            timeout=15,
        )
    except NatsAuthError:
        raise
    except Exception as exc:
        detail = f"cannot connect to {redact_url(nats_url)}: {exc!r}"
        raise UnavailableError("nats", detail) from None
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        last = info.state.last_seq
        batches: list[EventBatch] = []
        skipped = refused = 0
        policy = ValidationPolicy()
        if last:
            subject = (info.config.subjects or [">"])[0]
            sub = await js.subscribe(subject, ordered_consumer=True)
            while True:
                msg = await sub.next_msg(timeout=timeout_s)
                try:
                    checked = check_batch(decode(msg.data), policy)  # the shards' rules
                except WireError:
                    skipped += 1
                else:
                    batches.append(checked.batch)
                    refused += len(checked.rejected)
                if msg.metadata.sequence.stream >= last:
                    break
            await sub.unsubscribe()
        if skipped or refused:
            log.warning("skipped %d messages not in the wire format, %d bad rows", skipped, refused)
        frame = batch_to_frame(EventBatch.concat(batches))
        # An event id seen again is a duplicate, as the shards' de-duplication decides.
        return frame.drop_duplicates("event_id", keep="first", ignore_index=True)
    finally:
        await nc.close()


def ensure_ray(num_cpus: int | None = None, address: str = "local") -> bool:
    """Connect to Ray for Ray Data (``address``, or a new local one); True when this call did."""
    if ray.is_initialized():
        return False
    if address != "local":
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return True
    ray.init(
        address="local",  # a new instance, even if another Ray runs on this machine
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    return True


def train_demo_models(registry_dir: Path, users: int, seed: int = 7) -> TrainReport | None:
    """Train both models on simulated history when the registry has none (``up --demo``)."""
    registry = ModelRegistry(registry_dir)
    if all(registry.current(kind) for kind in KINDS):
        return None
    frame = simulated_history(min(users, 2000), days=30, seed=seed, end_ms=int(time.time() * 1000))
    plan = ChurnPlan(horizon_days=DEMO_HORIZON_DAYS)
    return train_and_register(frame, registry, plan=plan, ranker_labels=2)


def describe(report: TrainReport) -> str:
    """A few lines for the terminal."""
    lines = [f"trained on {report.events} events of {report.users} users in {report.seconds:.1f} s"]
    for kind, version in report.versions.items():
        lines.append(f"{kind:<16} {version}  {_short(report.metrics[kind])}")
    return "\n".join(lines)


def _short(metrics: dict[str, Any]) -> str:
    """Metrics in one line: floats rounded, nested groups as ``group.metric``."""
    from cluster.evaluate import flatten

    return " ".join(
        f"{path}={value:.4f}" if isinstance(value, float) else f"{path}={value}"
        for path, value in flatten(metrics)
    )
