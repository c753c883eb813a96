"""HMAC-SHA256 signing, shared by outgoing alert webhooks and the inbound webhook receiver.

One primitive (:func:`mac`) and the project's own signature format
(:func:`sign`): ``sha256=<hex>`` of ``"<timestamp>.<body>"``, as Stripe and
most vendors do it. Secrets are passed in, never logged or kept here.
"""

from __future__ import annotations

import hashlib
import hmac


def mac(secret: str, message: bytes) -> bytes:
    """The HMAC-SHA256 of ``message`` keyed by ``secret`` (UTF-8), as raw bytes."""
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()


def signed_message(timestamp: str | None, body: bytes) -> bytes:
    """What is signed: ``"<timestamp>.<body>"``, or the body alone when there is no timestamp."""
    return body if timestamp is None else timestamp.encode() + b"." + body


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Audience-Signature`` value of ``body`` sent at ``timestamp``."""
    return f"sha256={mac(secret, signed_message(timestamp, body)).hex()}"
