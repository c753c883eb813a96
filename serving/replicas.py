"""How many replicas each Serve deployment runs: fixed, or Serve's request-based autoscaling.

Serve's autoscaler adds a replica when the ongoing requests per replica exceed
the target and removes one when they fall below it, after its delays; the Ray
autoscaler then adds a node when a new replica does not fit. On one laptop the
default is one replica of each (min = max), which is what two cores carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ReplicaScaling:
    """Replica bounds and target shared by the API and model deployments."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 1 <= min_replicas <= max_replicas")
        if self.target_ongoing_requests <= 0:
            raise ValueError("target_ongoing_requests must be positive")

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        if self.min_replicas == self.max_replicas:
            return {"num_replicas": self.min_replicas}
        return {
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
            }
        }
