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


class TopEntry(BaseModel):
    """An item or category and its event count in the bucket."""

    id: str
    events: int


class EngagementTotals(BaseModel):
    """Sums over the answered buckets (distinct users do not add up across buckets)."""

    events: int
    events_by_type: dict[str, int] = Field(description="Non-zero event counts per type.")
    likes: int
    shares: int
    comments: int
    dwell_seconds: float = Field(description="Sum of the values of dwell events.")
    sessions: int = Field(description="session_start events.")
    top_items: list[TopEntry]
    top_categories: list[TopEntry]


class EngagementBucket(EngagementTotals):
    """Engagement in one event-time bucket; rates are computed when read."""

    start: str = Field(description="Bucket start, RFC 3339 UTC (inclusive).")
    end: str = Field(description="Bucket end, RFC 3339 UTC (exclusive).")
    active_users: int = Field(description="Distinct users with an event in the bucket.")
    likes_per_active_user: float
    shares_per_active_user: float
    comments_per_active_user: float
    dwell_seconds_per_active_user: float
    late_events: int = Field(
        description="Late events kept as corrections of this bucket ('correct' policy)."
    )


class Lateness(BaseModel):
    """How lateness is handled, and how many events were late (all time, all shards)."""

    allowed_lateness_s: float
    policy: str = Field(description="'drop' or 'correct'.")
    late_dropped: int = Field(description="Late events not applied ('drop' policy).")
    late_corrected: int = Field(description="Late events kept as corrections ('correct').")
    include_late: bool = Field(description="Whether corrections are added into the numbers.")


class EngagementAnswer(BaseModel):
    """Answer to ``GET /v1/insights/engagement``."""

    granularity: str
    start: str | None
    end: str | None
    as_of: str = Field(description="When the shards' partials were merged, RFC 3339 UTC.")
    buckets: list[EngagementBucket]
    totals: EngagementTotals
    lateness: Lateness
