"""Inbound webhook sources: how each vendor signs, stamps and shapes its deliveries.

Configuration, not code per vendor. A JSON file (the setting
``AUDIENCE_WEBHOOK_SOURCES``) names each source that may ``POST
/v1/webhooks/{source}`` and says, for that source:

* the shared secret of its HMAC-SHA256 signature (inline, or the name of an
  environment variable that holds it; kept as a ``SecretStr``, never logged),
  the header it comes in, what is signed (``"<timestamp>.<body>"`` or the body
  alone), the prefix (``sha256=``) and encoding (hex, base64) of the value;
* where the delivery's timestamp is (a header, or a field of the signed body),
  its format and the tolerance window: older or further-ahead deliveries are
  refused, which bounds how long a captured delivery could be replayed;
* where the list of items is in the payload, and how an item's fields become
  an event's: dotted paths (``data.customer.id``, list positions as numbers)
  or JSON pointers (``/data/customer/id``), a value map from the vendor's event
  names to the platform's event types, and the format of the item's time.

Lower layers never read this file: the launcher loads it once (resolving
secrets from the environment there) and hands the frozen result down.
"""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from actors.events import MAX_CATEGORY_LENGTH, MAX_MAP_KEYS, EventType

SOURCE_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
SOURCE_PROPERTY = "webhook"  # every event's properties name the source it came from

SourceName = Annotated[str, StringConstraints(pattern=SOURCE_PATTERN)]
FieldPath = Annotated[str, StringConstraints(min_length=1, max_length=256)]
HeaderName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9-]{1,64}$")]
PropertyKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CATEGORY_LENGTH)]


class SignedPayload(str, Enum):
    """What the vendor's HMAC covers."""

    TIMESTAMP_BODY = "timestamp.body"  # "<timestamp>.<raw body>" (Stripe-like; our own alerts)
    BODY = "body"  # the raw body alone (GitHub-like); the timestamp must then be in the body


class Encoding(str, Enum):
    """How the MAC bytes are written in the signature header."""

    HEX = "hex"
    BASE64 = "base64"


class TimeFormat(str, Enum):
    """How a time is written: seconds or milliseconds since the epoch, or RFC 3339."""

    EPOCH_S = "epoch_s"
    EPOCH_MS = "epoch_ms"
    ISO = "iso"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SignatureSpec(_Strict):
    """Where the signature is and how it is made."""

    header: HeaderName = Field(default="X-Signature", description="Header holding the signature.")
    payload: SignedPayload = Field(
        default=SignedPayload.TIMESTAMP_BODY, description="What the HMAC-SHA256 covers."
    )
    prefix: str = Field(
        default="sha256=", max_length=32, description="Text before the encoded MAC ('' for none)."
    )
    encoding: Encoding = Field(default=Encoding.HEX, description="Encoding of the MAC bytes.")


class TimestampSpec(_Strict):
    """Where the delivery's send time is, and how far from now it may be."""

    header: HeaderName | None = Field(
        default="X-Timestamp", description="Header holding the send time (signed with the body)."
    )
    field: FieldPath | None = Field(
        default=None, description="Or: path of the send time in the (signed) body."
    )
    format: TimeFormat = Field(default=TimeFormat.EPOCH_S, description="How the time is written.")
    tolerance_s: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        description="Deliveries sent more than this before or after now are refused.",
    )

    @model_validator(mode="after")
    def _one_place(self) -> TimestampSpec:
        if (self.header is None) == (self.field is None):
            raise ValueError("timestamp needs exactly one of 'header' and 'field'")
        return self


class FieldMap(_Strict):
    """Paths, in one delivery item, of the event's fields (None: not mapped)."""

    user_id: FieldPath = Field(description="The user the event is about (a string or integer).")
    type: FieldPath | None = Field(
        default=None, description="The vendor's event name, mapped through event_types."
    )
    ts: FieldPath | None = Field(
        default=None, description="Event time in ts_format; default: the delivery's send time."
    )
    event_id: FieldPath | None = Field(
        default=None,
        description="The vendor's id of the item; default: derived from the delivery's body "
        "and the item's position (the same delivery gives the same ids).",
    )
    item_id: FieldPath | None = None
    category: FieldPath | None = None
    value: FieldPath | None = Field(default=None, description="Revenue, or dwell seconds.")
    properties: dict[PropertyKey, FieldPath] = Field(
        default_factory=dict,
        max_length=MAX_MAP_KEYS - 1,  # one key is the source's name
        description="Event properties: name -> path (scalars only).",
    )
    traits: dict[PropertyKey, FieldPath] = Field(
        default_factory=dict,
        max_length=MAX_MAP_KEYS,
        description="User traits (identify events): name -> path (scalars only).",
    )

    @field_validator("properties")
    @classmethod
    def _source_key_free(cls, value: dict[str, str]) -> dict[str, str]:
        if SOURCE_PROPERTY in value:
            raise ValueError(f"property {SOURCE_PROPERTY!r} is reserved for the source's name")
        return value


class SourceConfig(_Strict):
    """One vendor: its secret, signature, timestamp and field mapping."""

    secret: SecretStr | None = Field(default=None, description="The shared secret itself.")
    secret_env: str | None = Field(
        default=None, description="Or: the environment variable holding it (read at load)."
    )
    signature: SignatureSpec = Field(default_factory=SignatureSpec)
    timestamp: TimestampSpec = Field(default_factory=TimestampSpec)
    items: FieldPath | None = Field(
        default=None,
        description="Path of the list of items in the body; default: the body (an array: "
        "its elements, an object: one item). An object found at the path is one item.",
    )
    fields: FieldMap
    ts_format: TimeFormat = Field(default=TimeFormat.ISO, description="Format of fields.ts.")
    event_types: dict[Annotated[str, StringConstraints(max_length=256)], EventType] = Field(
        default_factory=dict,
        description="Vendor event name -> event type; empty: the name must be an event type.",
    )
    default_type: EventType | None = Field(
        default=None, description="Event type of items without fields.type (or when unmapped)."
    )
    unknown_types: Literal["dead_letter", "skip"] = Field(
        default="dead_letter",
        description="Items whose vendor event name maps to no event type: dead-lettered "
        "(reason unknown_type) or skipped (counted in the answer).",
    )

    @model_validator(mode="after")
    def _resolve_secret(self) -> SourceConfig:
        if (self.secret is None) == (self.secret_env is None):
            raise ValueError("give exactly one of 'secret' and 'secret_env'")
        if self.secret_env is not None:
            value = os.environ.get(self.secret_env, "")
            if not value:
                raise ValueError(f"environment variable {self.secret_env} (the secret) is not set")
            object.__setattr__(self, "secret", SecretStr(value))
        assert self.secret is not None
        if len(self.secret.get_secret_value()) < 16:
            raise ValueError("the secret must be at least 16 characters")
        return self

    @model_validator(mode="after")
    def _coherent(self) -> SourceConfig:
        if self.fields.type is None and self.default_type is None:
            raise ValueError("map fields.type or set default_type")
        if self.signature.payload is SignedPayload.BODY and self.timestamp.field is None:
            # A header the signature does not cover could be rewritten by whoever
            # replays the delivery: the window would protect nothing.
            raise ValueError("with signature.payload 'body' the timestamp must be a body field")
        if self.signature.payload is SignedPayload.TIMESTAMP_BODY and self.timestamp.header is None:
            raise ValueError("signature.payload 'timestamp.body' signs a timestamp header")
        return self

    @property
    def key(self) -> str:
        """The secret's value, for the HMAC (never log it)."""
        assert self.secret is not None  # resolved by the validator
        return self.secret.get_secret_value()


class InboundSources(_Strict):
    """Every configured source by name (none: every ``/v1/webhooks/...`` answers 404)."""

    sources: dict[SourceName, SourceConfig] = Field(default_factory=dict)
    max_remembered: int = Field(
        default=100_000,
        ge=1,
        description="Deliveries each API replica remembers (within their window) to refuse "
        "replays; past it the oldest are forgotten (event-id de-duplication still holds).",
    )


def load_sources(path: Path) -> InboundSources:
    """The sources in the JSON file ``path``, secrets resolved from the environment.

    Raises:
        ValueError: the file cannot be read or parsed, or a source is invalid (the
            message names it and says why; secrets are never part of it).
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read webhook sources {path}: {exc.strerror}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"webhook sources {path} do not parse: {exc}") from None
    try:
        return InboundSources.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise ValueError(f"webhook sources {path}: {problems}") from None
