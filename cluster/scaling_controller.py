"""The autoscaling policy at work: a named Ray actor that samples the shards on a timer.

It feeds :class:`~cluster.autoscaling.ShardAutoscaler` with each shard's busy
seconds, messages worked and backlog, and keeps the recent decisions for
``GET /v1/status`` (the gateway finds it by ``serving.app.AUTOSCALER_NAME``).
With ``apply`` on, a decision for another shard count rescales the pool live
(:meth:`~actors.pool.ShardPool.rescale`); the rescale's steps and timings are
kept with the decision. Shards that do not fit make Ray's autoscaler add a
node (each shard asks for ``shard_cpus``).
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

    def __init__(
        self,
        spec: PoolSpec,
        policy: ScalingPolicy,
        every_s: float = 10.0,
        apply: bool = False,
    ) -> None:
        """Args:
        apply: rescale the pool to each decision (else only record it).
        """
        self.spec = spec
        self.policy = policy
        self.every_s = every_s
        self.apply = apply
        self._rescales = 0
        self._scaler = ShardAutoscaler(policy, spec.partitions)
        self._decisions: deque[dict[str, Any]] = deque(maxlen=KEPT_DECISIONS)
        self._task = asyncio.get_running_loop().create_task(self._sample_forever())

    async def _sample_forever(self) -> None:
        pool = ShardPool.connect(self.spec)
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await pool.refresh()
                counters: list[dict[str, Any]] = list(
                    await asyncio.gather(*(h.counters.remote() for h in pool.handles))
                )
            except Exception as exc:  # a shard restarting: skip this sample
                log.info("autoscaler skipped a sample: %r", exc)
                continue
            sample = LoadSample(
                at_s=time.monotonic(),
                busy_s=tuple(float(c["busy_s"]) for c in counters),
                applied=tuple(int(c["work_messages"]) for c in counters),
                backlog=sum(int(c["backlog"]) for c in counters),
            )
            decision = self._scaler.observe(sample)
            if decision is None:
                continue
            record: dict[str, Any] = {**decision.as_dict(), "at": time.time()}
            self._decisions.append(record)
            if self.apply and decision.desired != decision.current:
                record["rescale"] = await self._rescale(pool, decision.desired)

    async def _rescale(self, pool: ShardPool, shards: int) -> dict[str, Any]:
        """Rescale the pool; what happened (a failure is recorded, the next decision retries)."""
        try:
            report = await pool.rescale(shards)
        except Exception as exc:  # another rescale won, a shard died: sample again
            log.warning("autoscaler could not rescale to %d shards: %r", shards, exc)
            return {"error": repr(exc)}
        if report["moved"]:
            self._rescales += 1
        return report

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
            "applied": self.apply,
            "rescales": self._rescales,
            "decisions": list(self._decisions),
        }
