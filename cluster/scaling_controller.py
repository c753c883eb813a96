"""The autoscaling policy at work: a named Ray actor that samples the shards on a timer.

It feeds :class:`~cluster.autoscaling.ShardAutoscaler` with each shard's busy
seconds, applied messages and backlog, and keeps the recent decisions for
``GET /v1/status`` (the gateway finds it by ``serving.app.AUTOSCALER_NAME``).
It recommends only: moving partitions between shard actors at run time (live
rebalancing) is not built yet, so the shard count changes when an operator
restarts the platform with ``AUDIENCE_SHARDS`` set to the recommendation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import ray

from actors.pool import PoolSpec, ShardPool
from cluster.autoscaling import LoadSample, ScalingPolicy, ShardAutoscaler

log = logging.getLogger(__name__)

KEPT_DECISIONS = 50


@ray.remote(num_cpus=0, max_restarts=-1)
class ScalingController:
    """Samples the pool every ``every_s`` and records what the policy recommends."""

    def __init__(self, spec: PoolSpec, policy: ScalingPolicy, every_s: float = 10.0) -> None:
        self.spec = spec
        self.policy = policy
        self.every_s = every_s
        self._scaler = ShardAutoscaler(policy, spec.partitions)
        self._decisions: deque[dict[str, Any]] = deque(maxlen=KEPT_DECISIONS)
        self._task = asyncio.get_running_loop().create_task(self._sample_forever())

    async def _sample_forever(self) -> None:
        pool = ShardPool.connect(self.spec)
        while True:
            await asyncio.sleep(self.every_s)
            try:
                counters: list[dict[str, Any]] = list(
                    await asyncio.gather(*(h.counters.remote() for h in pool.handles))
                )
            except Exception as exc:  # a shard restarting: skip this sample
                log.info("autoscaler skipped a sample: %r", exc)
                continue
            sample = LoadSample(
                at_s=time.monotonic(),
                busy_s=tuple(float(c["busy_s"]) for c in counters),
                applied=tuple(int(c["applied_messages"]) for c in counters),
                backlog=sum(int(c["backlog"]) for c in counters),
            )
            decision = self._scaler.observe(sample)
            if decision is not None:
                self._decisions.append({**decision.as_dict(), "at": time.time()})

    async def decisions(self) -> dict[str, Any]:
        """The policy and the latest decisions, newest last."""
        return {
            "policy": {
                "min_shards": self.policy.min_shards,
                "max_shards": self.policy.max_shards,
                "target_utilisation": self.policy.target_utilisation,
                "up_window_s": self.policy.up_window_s,
                "down_window_s": self.policy.down_window_s,
            },
            "every_s": self.every_s,
            "applied": False,
            "decisions": list(self._decisions),
        }
