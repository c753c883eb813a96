"""The event contract: what a producer may send, checked once at the boundary.

An :class:`Event` is the strict pydantic model for JSON input (HTTP, SDK,
webhooks). Inside the platform events travel as a columnar
:class:`~actors.batch.EventBatch`; the integer codes of :class:`EventType` and
:class:`Source` are part of the wire format, so new members are only ever
appended.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from enum import Enum
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

MAX_ID_LENGTH = 128
MAX_CATEGORY_LENGTH = 64
MAX_MAP_KEYS = 32
MAX_STRING_VALUE = 512

Scalar = str | int | float | bool | None


class EventType(str, Enum):
    """What the user did. The position in this enum is the wire code."""

    PAGE_VIEW = "page_view"
    CLICK = "click"
    DWELL = "dwell"
    LIKE = "like"
    SHARE = "share"
    COMMENT = "comment"
    ADD_TO_CART = "add_to_cart"
    PURCHASE = "purchase"
    SIGNUP = "signup"
    IDENTIFY = "identify"
    SESSION_START = "session_start"
    SESSION_END = "session_end"
    USER_DELETED = "user_deleted"


class Source(str, Enum):
    """Where the event came from. The position in this enum is the wire code."""

    WEB = "web"
    MOBILE = "mobile"
    SOCIAL = "social"
    IOT = "iot"
    WEBHOOK = "webhook"
    SDK = "sdk"
    SERVER = "server"
    REPLAY = "replay"
    SIMULATOR = "simulator"


EVENT_TYPES: tuple[EventType, ...] = tuple(EventType)
SOURCES: tuple[Source, ...] = tuple(Source)
TYPE_CODE: dict[EventType, int] = {t: i for i, t in enumerate(EVENT_TYPES)}
SOURCE_CODE: dict[Source, int] = {s: i for i, s in enumerate(SOURCES)}
N_TYPES = len(EVENT_TYPES)

Identifier = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
ScalarMap = Annotated[dict[str, Scalar], Field(max_length=MAX_MAP_KEYS)]


class Event(BaseModel):
    """One user event as producers send it (strict: unknown fields are rejected).

    Attributes mirror DESIGN.md. ``ts`` must carry a timezone; ``value`` is
    revenue for purchases and seconds for dwell events.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    event_id: Identifier = Field(description="Producer-unique id, used for de-duplication.")
    user_id: Identifier = Field(description="The user the event is about; the partition key.")
    type: EventType = Field(description="What happened.")
    ts: AwareDatetime = Field(description="Event time, RFC 3339 with a timezone.")
    item_id: Identifier | None = Field(default=None, description="Item viewed, bought, liked...")
    category: Annotated[str, Field(min_length=1, max_length=MAX_CATEGORY_LENGTH)] | None = Field(
        default=None, description="Category of the item."
    )
    value: float | None = Field(default=None, description="Revenue, or dwell seconds.")
    source: Source = Field(default=Source.WEB, description="Origin of the event.")
    traits: ScalarMap | None = Field(default=None, description="User traits (identify events).")
    properties: ScalarMap | None = Field(default=None, description="Bounded free-form extras.")

    @field_validator("value")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("value must be a finite number")
        return value

    @field_validator("traits", "properties")
    @classmethod
    def _short_strings(cls, mapping: dict[str, Scalar] | None) -> dict[str, Scalar] | None:
        if mapping:
            for key, item in mapping.items():
                if len(key) > MAX_CATEGORY_LENGTH:
                    raise ValueError(f"key longer than {MAX_CATEGORY_LENGTH} characters")
                if isinstance(item, str) and len(item) > MAX_STRING_VALUE:
                    raise ValueError(f"string value longer than {MAX_STRING_VALUE} characters")
        return mapping

    @property
    def ts_ms(self) -> int:
        """Event time as integer milliseconds since the Unix epoch."""
        return to_epoch_ms(self.ts)


def to_epoch_ms(ts: datetime) -> int:
    """Milliseconds since the epoch for an aware datetime (exact, no float drift)."""
    return (ts - _EPOCH) // _ONE_MS  # timedelta floor division: integers all the way


_EPOCH = datetime.fromisoformat("1970-01-01T00:00:00+00:00")
_ONE_MS = timedelta(milliseconds=1)
