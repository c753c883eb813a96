"""Response shapes of the HTTP API, for clients and the OpenAPI page."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from actors.events import MAX_ID_LENGTH


class RejectedEvent(BaseModel):
    """One event the API refused, and why."""

    index: int = Field(description="Position in the request's array; -1 for the whole body.")
    reason: str = Field(description="Machine-readable reason; also the dead-letter subject.")
    detail: str = Field(description="What exactly was wrong.")


class IngestResult(BaseModel):
    """Answer to ``POST /v1/events``."""

    accepted: int = Field(description="Events validated and durably published.")
    rejected: list[RejectedEvent] = Field(default_factory=list)


class WebhookResult(BaseModel):
    """Answer to ``POST /v1/webhooks/{source}``: what became of the delivery's items."""

    source: str = Field(description="The webhook source the delivery was for.")
    items: int = Field(description="Items found in the delivery.")
    accepted: int = Field(description="Events mapped, validated and durably published.")
    skipped: int = Field(description="Items left out on purpose (unmapped vendor event names).")
    rejected: list[RejectedEvent] = Field(
        default_factory=list,
        description="Items refused, each dead-lettered with its reason; index -1: the body.",
    )


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
    segments: list[str] | None = Field(
        default=None, description="Segments the user is in, as of its shard's event time."
    )
    traits: dict[str, Any] = Field(
        default_factory=dict, description="Traits merged from the user's identify events."
    )


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
    session_seconds: float = Field(
        description="Active session time: each event continuing a session adds its gap"
        " after the user's earlier events, in the event's bucket (sessions crossing"
        " bucket edges split their time)."
    )
    avg_session_seconds: float | None = Field(
        description="session_seconds / sessions; null when there are no sessions."
    )
    top_items: list[TopEntry]
    top_categories: list[TopEntry]


class EngagementBucket(EngagementTotals):
    """Engagement in one event-time bucket; rates are computed when read."""

    start: str = Field(description="Bucket start, RFC 3339 UTC (inclusive).")
    end: str = Field(description="Bucket end, RFC 3339 UTC (exclusive).")
    active_users: int = Field(
        description="Distinct users with an event in the bucket, a HyperLogLog estimate;"
        " users deleted later stay counted."
    )
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
    active_users_relative_error: float = Field(
        description="Standard error of active_users relative to the true count (HyperLogLog)."
    )
    buckets: list[EngagementBucket]
    totals: EngagementTotals
    lateness: Lateness


class FunnelStep(BaseModel):
    """Attempts that reached one funnel step, and the conversion rates into it."""

    type: str = Field(description="The step's event type.")
    count: int = Field(description="Step transitions (attempts reaching the step).")
    rate_from_first: float | None = Field(description="count / step-1 count; null if 0.")
    rate_from_previous: float | None = Field(description="count / previous step's count.")


class ConversionFigures(BaseModel):
    """Funnel counts and revenue of a bucket, or of the whole range (totals)."""

    steps: list[FunnelStep]
    revenue: float = Field(description="Sum of the values of purchase events.")
    purchases: int = Field(description="Purchase events.")
    purchasing_users: int = Field(description="Distinct purchasers, a HyperLogLog estimate.")
    active_users: int = Field(description="Distinct users with any event (engagement's).")
    revenue_per_purchasing_user: float | None
    revenue_per_active_user: float | None


class ConversionBucket(ConversionFigures):
    """The funnel in one event-time bucket: transitions made by events of the bucket."""

    start: str = Field(description="Bucket start, RFC 3339 UTC (inclusive).")
    end: str = Field(description="Bucket end, RFC 3339 UTC (exclusive).")
    late_steps: int = Field(description="Late step transitions kept as corrections.")


class Funnel(BaseModel):
    """The funnel the platform runs (settings funnel_steps and conversion_window_s)."""

    steps: list[str]
    window_s: float = Field(description="Most event time from one step to the next.")


class ConversionAnswer(BaseModel):
    """Answer to ``GET /v1/insights/conversion``."""

    granularity: str
    start: str | None
    end: str | None
    as_of: str = Field(description="When the shards' partials were merged, RFC 3339 UTC.")
    funnel: Funnel
    users_relative_error: float = Field(
        description="Standard error of purchasing_users and active_users (HyperLogLog)."
    )
    buckets: list[ConversionBucket]
    totals: ConversionFigures
    lateness: Lateness


class Cohort(BaseModel):
    """Users first seen on one UTC day, and the share of them active on later days."""

    date: str = Field(description="Cohort day, YYYY-MM-DD (UTC first-seen day).")
    size: int = Field(description="Estimated users first seen that day.")
    day_1: float | None = Field(description="Share active one day later; null until observed.")
    day_7: float | None
    day_30: float | None
    curve: list[float | None] = Field(description="Share active k days later, k = 0, 1, ...")


class ActiveUsers(BaseModel):
    """Distinct active users in the windows ending on the latest day seen."""

    date: str
    dau: int
    wau: int
    mau: int
    stickiness: float | None = Field(description="DAU / MAU.")
    complete: bool = Field(description="False when part of the 30 days is no longer kept.")


class RetentionAnswer(BaseModel):
    """Answer to ``GET /v1/insights/retention``; every count is a HyperLogLog estimate."""

    as_of: str = Field(description="When the shards' partials were merged, RFC 3339 UTC.")
    start_day: str | None
    end_day: str | None
    latest_day: str | None = Field(description="Newest activity day seen (event time).")
    relative_error: float = Field(description="Standard error of each count, relative.")
    cohorts: list[Cohort]
    active_users: ActiveUsers | None
    rolling: dict[str, Any] | None = Field(
        description="With ?rolling=N: share of each cohort active on day N or later."
    )


class Forecast(BaseModel):
    """Events per minute for the next minutes of event time, with intervals."""

    metric: str
    start: str = Field(description="Start of the first forecast minute, RFC 3339 UTC.")
    history_start: str
    history_points: int = Field(description="Minutes of history used (empty minutes are 0).")
    method: str = Field(description="holt_winters, holt or naive.")
    values: list[float]
    lower: list[float]
    upper: list[float]
    mae: float | None = Field(description="Mean absolute one-step backtest error.")
    mape: float | None = Field(description="Mean absolute percentage backtest error, in %.")
    params: dict[str, float]
    backtest_points: int


class TrendsAnswer(BaseModel):
    """Answer to ``GET /v1/insights/trends``; scores are weighted events per hour, decayed."""

    as_of: str = Field(description="When the shards' partials were merged, RFC 3339 UTC.")
    reference_time: str | None = Field(description="Event time the decay is measured from.")
    trending_items: list[dict[str, Any]] = Field(description="id, score, count, error, certain.")
    trending_categories: list[dict[str, Any]]
    emerging_items: list[dict[str, Any]] = Field(
        description="id, score (short-window rate over baseline rate), counts and rates."
    )
    forecast: Forecast | None


class SegmentSize(BaseModel):
    """One rule-based segment and its live counts, summed over shards."""

    name: str
    description: str = Field(description="The rule, in words.")
    size: int = Field(description="Users in the segment now (exact, not an estimate).")
    entered: int = Field(description="Entries since the shards started.")
    left: int = Field(description="Exits since the shards started (deletions included).")


class SegmentsAnswer(BaseModel):
    """Answer to ``GET /v1/insights/segments``."""

    as_of: str = Field(description="When the shards' partials were merged, RFC 3339 UTC.")
    event_time: str | None = Field(
        description="Newest event time of any shard: the 'now' the time-based rules use."
    )
    segments: list[SegmentSize]


ItemId = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
UserId = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]


class ChurnReason(BaseModel):
    """A feature that raised the user's churn score, with its value and contribution."""

    feature: str
    value: float | None
    contribution: float = Field(description="Added to the model's log-odds (LightGBM SHAP).")


class ChurnAnswer(BaseModel):
    """Answer to ``GET /v1/churn/{user_id}``."""

    user_id: str
    churn_probability: float = Field(description="Calibrated probability of no activity soon.")
    reasons: list[ChurnReason] = Field(description="Top features raising the score.")
    as_of: str = Field(description="The time features were taken at: the shard's newest event.")
    features: dict[str, float | None] = Field(description="Every feature the model saw.")
    model_version: str


class ChurnBatchRequest(BaseModel):
    """Body of ``POST /v1/churn``."""

    model_config = ConfigDict(extra="forbid")
    user_ids: list[UserId] = Field(min_length=1, max_length=1000)


class Recommendation(BaseModel):
    """One recommended item, its score and why it was proposed."""

    item_id: str
    score: float
    reason: str = Field(description='e.g. "viewed with X", or "popular" for cold starts.')


class PersonalizeAnswer(BaseModel):
    """Answer to ``GET /v1/personalize/{user_id}``."""

    user_id: str
    cold_start: bool = Field(description="True when the user is unknown: popular items.")
    items: list[Recommendation]
    model_version: str = Field(description='"none" when no model is trained: popularity order.')
    items_indexed: int


class PersonalizeBatchRequest(BaseModel):
    """Body of ``POST /v1/personalize``."""

    model_config = ConfigDict(extra="forbid")
    user_ids: list[UserId] = Field(min_length=1, max_length=1000)
    k: int = Field(default=10, ge=1, le=100)


class RankRequest(BaseModel):
    """Body of ``POST /v1/personalize/{user_id}/rank``."""

    model_config = ConfigDict(extra="forbid")
    items: list[ItemId] = Field(min_length=1, max_length=1000)


class RankedItem(BaseModel):
    """An item of a re-ranking call with its score."""

    item_id: str
    score: float
    known_item: bool = Field(description="False when no shard has seen the item yet.")


class RankAnswer(BaseModel):
    """Answer to ``POST /v1/personalize/{user_id}/rank``."""

    user_id: str
    cold_start: bool
    items: list[RankedItem]
    model_version: str
    items_indexed: int


class RescaleRequest(BaseModel):
    """Body of ``POST /v1/shards``."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "1" or 1.5 is no shard count
    shards: int = Field(ge=1, le=4096, description="The new shard count (at most the partitions).")


class PromoteRequest(BaseModel):
    """Body of ``POST /v1/models/{kind}/promote``."""

    model_config = ConfigDict(extra="forbid")
    version: str = Field(pattern=r"^v\d{4,}$", description="e.g. v0002")
