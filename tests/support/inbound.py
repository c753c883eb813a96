"""The inbound webhook source the integration platform is configured with, and its signer."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from serving.signing import sign

SOURCES_FILE = Path(__file__).with_name("webhook-sources.json")
SOURCE = "testshop"
SECRET: str = json.loads(SOURCES_FILE.read_text())["sources"][SOURCE]["secret"]


def signed_headers(body: bytes, at: float | None = None, secret: str = SECRET) -> dict[str, str]:
    """The headers ``testshop`` sends with ``body``, signed at ``at`` (default: now)."""
    stamp = str(int(time.time() if at is None else at))
    return {
        "Content-Type": "application/json",
        "X-Shop-Timestamp": stamp,
        "X-Shop-Signature": sign(secret, stamp, body),
    }


def shop_event(n: int, user: str, kind: str = "order.paid", **extra: Any) -> dict[str, Any]:
    """One item as the test shop sends it (ids unique per ``user`` and ``n``)."""
    return {
        "id": f"{user}-{n}",
        "kind": kind,
        "created_at": f"2024-05-01T12:00:{n % 60:02d}+00:00",
        "customer": {"id": user},
        "product": {"sku": f"sku-{n}"},
        "total": "19.90",
        "currency": "EUR",
        **extra,
    }
