"""The live dashboard: one HTML page, its script, and Plotly served from the installed package.

Nothing comes from a CDN: ``plotly.min.js`` ships inside the ``plotly`` wheel,
so the page works on a machine with no internet. The page polls the JSON API
(the same endpoints a client would call) and redraws without a reload.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

import plotly

STATIC = resources.files("serving") / "static"


@cache
def page() -> str:
    """The dashboard's HTML."""
    return (STATIC / "dashboard.html").read_text(encoding="utf-8")


@cache
def script() -> str:
    """The dashboard's JavaScript (polling and drawing)."""
    return (STATIC / "dashboard.js").read_text(encoding="utf-8")


@cache
def plotly_js() -> bytes:
    """Plotly's browser bundle, from the installed Python package."""
    return (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_bytes()
