"""The core: event contract, wire codec, validation, per-user state.

Only the light, Ray- and NATS-free names are exported here; the edges
(``actors.producer``, ``actors.shard_actor``, ``actors.pool``) are imported
from their modules by the code that needs them.
"""

from actors.batch import EventBatch
from actors.events import Event, EventType, Source
from actors.state import StateRules, UserStateTable
from actors.validation import RejectReason, ValidationPolicy

__all__ = [
    "Event",
    "EventBatch",
    "EventType",
    "RejectReason",
    "Source",
    "StateRules",
    "UserStateTable",
    "ValidationPolicy",
]
