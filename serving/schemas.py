"""Response shapes of the HTTP API, for clients and the OpenAPI page."""

from __future__ import annotations

from pydantic import BaseModel, Field


class RejectedEvent(BaseModel):
    """One event the API refused, and why."""

    index: int = Field(description="Position in the request's array; -1 for the whole body.")
    reason: str = Field(description="Machine-readable reason; also the dead-letter subject.")
    detail: str = Field(description="What exactly was wrong.")


class IngestResult(BaseModel):
    """Answer to ``POST /v1/events``."""

    accepted: int = Field(description="Events validated and durably published.")
    rejected: list[RejectedEvent] = Field(default_factory=list)


class Profile(BaseModel):
    """Live per-user state, as the owning shard holds it."""

    user_id: str
    counts: dict[str, int] = Field(description="Events applied, per event type.")
    events: int
    first_seen: str = Field(description="Earliest event time, RFC 3339 UTC.")
    last_seen: str = Field(description="Latest event time, RFC 3339 UTC.")
    first_seen_ms: int
    last_seen_ms: int
    sessions: int
    dwell_seconds: float
    revenue: float
    engagement: float = Field(description="Time-decayed engagement score as of last_seen.")
    recent_items: list[str] = Field(description="Most recent items, newest first.")
    category_affinity: dict[str, float]
    active_days: int = Field(description="Days with activity among the last 64.")
