"""The inbound webhook receiver: a vendor's signed delivery in, the platform's events out.

``POST /v1/webhooks/{source}`` hands each request to :class:`InboundWebhooks`:

1. :meth:`~InboundWebhooks.verify` finds the source (else
   :class:`UnknownSource`), checks the HMAC-SHA256 signature over what the
   source signs, in constant time (else :class:`SignatureRefused`), and the
   send time against the source's tolerance window (else
   :class:`ReplayRefused`, reason ``stale_timestamp``);
2. :meth:`~InboundWebhooks.claimed` refuses a delivery this replica has
   already taken within its window (:class:`ReplayRefused`, reason
   ``replayed``), and forgets the claim if publishing then fails, so that the
   vendor's retry is taken;
3. :meth:`~InboundWebhooks.check` maps the items through the source's field
   mapping and the platform's own validation: a
   :class:`~actors.validation.Checked` whose rejections (items that cannot be
   mapped or break the event contract, or the whole body when it holds no
   items) the producer dead-letters like any ingest rejection.

Replay protection has two layers. Each replica remembers the MACs of the
deliveries it took until their window closes (bounded: ``max_remembered``, the
oldest forgotten first); a delivery older than the window is refused by its
time. A replay that reaches another replica, or one past the memory's bound,
still maps to the same event ids (see :mod:`serving.inbound_mapping`), which
the shards apply once. Plain Python: no Ray, no FastAPI, no NATS.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson

from actors.batch import EventBatch
from actors.errors import AudienceError
from actors.validation import Checked, Rejection, RejectReason, ValidationPolicy, parse_events
from serving.inbound_config import Encoding, InboundSources, SignedPayload, SourceConfig
from serving.inbound_mapping import UnusableDelivery, items_of, lookup, map_delivery, parse_time
from serving.signing import mac, signed_message

_NOT_PARSED = object()
MAX_HEADER_CHARS = 1024  # a signature or timestamp header longer than this is refused unread


class WebhookRefused(AudienceError):
    """A delivery refused before anything was published.

    Attributes:
        source: the source named in the URL.
        reason: machine-readable reason.
        detail: what was wrong, for the vendor's logs; never holds a secret or a MAC.
    """

    def __init__(self, source: str, reason: str, detail: str) -> None:
        super().__init__(f"webhook {source}: {detail}")
        self.source = source
        self.reason = reason
        self.detail = detail


class UnknownSource(WebhookRefused):
    """No source of that name is configured (HTTP 404)."""

    def __init__(self, source: str) -> None:
        super().__init__(source, "unknown_source", f"no webhook source named {source[:64]!r}")


class SignatureRefused(WebhookRefused):
    """The signature, or the timestamp it needs, is missing or wrong (HTTP 401)."""


class ReplayRefused(WebhookRefused):
    """A validly signed delivery outside its time window, or one already taken (HTTP 409).

    Attributes:
        sent_ms: the delivery's send time.
    """

    def __init__(self, source: str, reason: str, detail: str, *, sent_ms: int) -> None:
        super().__init__(source, reason, detail)
        self.sent_ms = sent_ms


class DeliveryTooLarge(WebhookRefused):
    """More items in one delivery than one request may carry (HTTP 413)."""


@dataclass(frozen=True)
class Delivery:
    """A delivery whose signature and send time were verified.

    Attributes:
        source: the source's name.
        config: its configuration.
        body: the raw body, as signed.
        sent_ms: the send time it was signed with.
        mac: the verified MAC: the delivery's identity for replay checks.
        doc: the parsed body, when verification needed it.
    """

    source: str
    config: SourceConfig = field(repr=False)
    body: bytes = field(repr=False)
    sent_ms: int
    mac: bytes = field(repr=False)
    doc: Any = field(default=_NOT_PARSED, repr=False)

    @property
    def expires_ms(self) -> int:
        """When the delivery falls out of its window (a replay is refused by its time)."""
        return self.sent_ms + int(self.config.timestamp.tolerance_s * 1000)


@dataclass
class Received:
    """What became of a delivery's items.

    Attributes:
        checked: accepted events and rejections to publish (item positions as indexes;
            ``-1``: the whole body).
        items: items in the delivery.
        skipped: items left out on purpose (unknown vendor event names, ``skip`` policy).
    """

    checked: Checked
    items: int
    skipped: int = 0

    @property
    def usable(self) -> bool:
        """False when the whole body was refused (no items where the mapping says)."""
        return not any(r.index == -1 for r in self.checked.rejected)


class ReplayGuard:
    """The MACs of deliveries taken, each kept until its window closes; bounded in count."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # key -> expiry (epoch ms)
        self.forgotten_early = 0  # pushed out by the bound before their window closed

    def claim(self, key: bytes, expires_ms: int, now_ms: int) -> bool:
        """Take ``key`` unless it is held; False for a replay."""
        while self._seen:
            first, expiry = next(iter(self._seen.items()))
            if expiry > now_ms:
                break
            del self._seen[first]
        if key in self._seen:
            return False
        self._seen[key] = expires_ms
        if len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
            self.forgotten_early += 1
        return True

    def release(self, key: bytes) -> None:
        """Forget ``key`` (its delivery was not published: a retry must be taken)."""
        self._seen.pop(key, None)

    def __len__(self) -> int:
        return len(self._seen)


class InboundWebhooks:
    """One API replica's receiver: the sources, and the deliveries taken recently.

    Args:
        sources: the configured sources.
        clock: wall-clock seconds (tests pass a fake one).
    """

    def __init__(self, sources: InboundSources, clock: Callable[[], float] = time.time) -> None:
        self.sources = sources
        self._clock = clock
        self.guard = ReplayGuard(sources.max_remembered)
        self.taken = 0  # deliveries published
        self.refused: Counter[str] = Counter()  # by reason

    def source(self, name: str) -> SourceConfig:
        """The configuration of source ``name``.

        Raises:
            UnknownSource: none of that name.
        """
        config = self.sources.sources.get(name)
        if config is None:
            self.refused["unknown_source"] += 1
            raise UnknownSource(name)
        return config

    def answer(self) -> dict[str, Any]:
        """This replica's counters, for ``GET /v1/status`` (never a secret)."""
        return {
            "sources": sorted(self.sources.sources),
            "taken": self.taken,
            "refused": dict(self.refused),
            "remembered": len(self.guard),
            "forgotten_early": self.guard.forgotten_early,
        }

    def verify(self, name: str, headers: Mapping[str, str], body: bytes) -> Delivery:
        """Check the signature, then the send time, of a delivery to source ``name``.

        Raises:
            UnknownSource: no such source.
            SignatureRefused: the signature or timestamp is missing, malformed or wrong.
            ReplayRefused: signed correctly, but sent outside the tolerance window.
        """
        config = self.source(name)
        try:
            return self._verify(name, config, headers, body)
        except WebhookRefused as exc:
            self.refused[exc.reason] += 1
            raise

    def _verify(
        self, name: str, config: SourceConfig, headers: Mapping[str, str], body: bytes
    ) -> Delivery:
        headers = {k.lower(): v for k, v in headers.items()}
        spec = config.signature
        signature = _header(name, headers, spec.header, "missing_signature")
        stamp_spec = config.timestamp
        stamp: str | None = None
        if spec.payload is SignedPayload.TIMESTAMP_BODY:
            assert stamp_spec.header is not None  # the config's rule
            stamp = _header(name, headers, stamp_spec.header, "missing_timestamp")
        expected = mac(config.key, signed_message(stamp, body))
        if not any(hmac.compare_digest(expected, given) for given in _macs(signature, config)):
            raise SignatureRefused(
                name, "bad_signature", f"the {spec.header} header does not match the body"
            )
        doc: Any = _NOT_PARSED
        found: Any = stamp  # a header timestamp is always signed (the config's rule)
        if stamp_spec.field is not None:
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError:
                doc = None
            found = lookup(doc, stamp_spec.field)
        where = stamp_spec.field or stamp_spec.header
        try:
            sent_ms = parse_time(found, stamp_spec.format)
        except (ValueError, TypeError):
            raise SignatureRefused(
                name, "bad_timestamp", f"no {stamp_spec.format.value} send time at {where!r}"
            ) from None
        now_ms = int(self._clock() * 1000)
        tolerance_ms = int(stamp_spec.tolerance_s * 1000)
        if abs(now_ms - sent_ms) > tolerance_ms:
            raise ReplayRefused(
                name,
                "stale_timestamp",
                f"sent {(now_ms - sent_ms) / 1000:+.0f} s from now; deliveries are taken "
                f"within {stamp_spec.tolerance_s:g} s",
                sent_ms=sent_ms,
            )
        return Delivery(name, config, body, sent_ms, name.encode() + b":" + expected, doc)

    @contextmanager
    def claimed(self, delivery: Delivery) -> Iterator[None]:
        """Hold the delivery as taken; forget it if the block raises (nothing published).

        Raises:
            ReplayRefused: this replica took the same delivery within its window.
        """
        now_ms = int(self._clock() * 1000)
        if now_ms >= delivery.expires_ms:
            # Its window closed since verify() (the producer may have taken a while):
            # the memory no longer holds an earlier copy, so only its time can refuse it.
            self.refused["stale_timestamp"] += 1
            raise ReplayRefused(
                delivery.source,
                "stale_timestamp",
                "the delivery's time window closed while it was being received",
                sent_ms=delivery.sent_ms,
            )
        if not self.guard.claim(delivery.mac, delivery.expires_ms, now_ms):
            self.refused["replayed"] += 1
            raise ReplayRefused(
                delivery.source,
                "replayed",
                "this delivery (same signature) was already received",
                sent_ms=delivery.sent_ms,
            )
        try:
            yield
        except BaseException:
            self.guard.release(delivery.mac)
            raise
        self.taken += 1

    def check(self, delivery: Delivery, policy: ValidationPolicy, max_items: int) -> Received:
        """Map and validate the delivery's items; bad items (or body) become rejections.

        Raises:
            DeliveryTooLarge: more than ``max_items`` items.
        """
        name, body = delivery.source, delivery.body
        doc = delivery.doc
        if doc is _NOT_PARSED:
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                detail = f"webhook {name}: body is not JSON: {exc}"
                return _refused_whole(body, RejectReason.INVALID_JSON, detail, policy)
        try:
            items = items_of(delivery.config, doc)
        except UnusableDelivery as exc:
            return _refused_whole(body, RejectReason.SCHEMA, f"webhook {name}: {exc}", policy)
        if len(items) > max_items:
            raise DeliveryTooLarge(
                name,
                "too_many_items",
                f"{len(items)} items in one delivery; the limit is {max_items}",
            )
        digest = hashlib.blake2b(body, digest_size=12, person=b"audience-wh").hexdigest()
        mapped = map_delivery(name, delivery.config, items, digest, delivery.sent_ms, policy)
        checked = parse_events(orjson.dumps(mapped.events), policy)
        rejected = list(mapped.rejected)
        for r in checked.rejected:  # re-number from mapped events to delivery items
            position = mapped.positions[r.index]
            detail = f"webhook {name} item {position}: {r.detail}"
            rejected.append(Rejection(position, r.reason, detail, r.raw))
        rejected.sort(key=lambda r: r.index)
        return Received(Checked(checked.batch, rejected), mapped.items, mapped.skipped)


def _header(source: str, headers: Mapping[str, str], name: str, reason: str) -> str:
    value = headers.get(name.lower())
    if not value:
        raise SignatureRefused(source, reason, f"no {name} header")
    if len(value) > MAX_HEADER_CHARS:
        raise SignatureRefused(source, reason, f"the {name} header is too long")
    return value


def _macs(header: str, config: SourceConfig) -> Iterator[bytes]:
    """The MACs a signature header offers (several, space-separated, during a key rotation)."""
    prefix, encoding = config.signature.prefix, config.signature.encoding
    for candidate in header.split():
        if not candidate.startswith(prefix):
            continue
        text = candidate[len(prefix) :]
        try:
            if encoding is Encoding.HEX:
                yield bytes.fromhex(text)
            else:
                yield base64.b64decode(text, validate=True)
        except (ValueError, binascii.Error):
            continue


def _refused_whole(
    body: bytes, reason: RejectReason, detail: str, policy: ValidationPolicy
) -> Received:
    """A delivery with no usable items: one rejection holding (the start of) the body."""
    limit = policy.max_dead_letter_bytes
    if len(body) > limit:
        detail = f"{detail} (body of {len(body)} bytes, the first {limit} kept)"
    rejection = Rejection(-1, reason, detail, body[:limit])
    return Received(Checked(EventBatch.empty(), [rejection]), items=0)
