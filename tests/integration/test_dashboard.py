"""The dashboard in a real headless Chromium: it loads cleanly, draws charts and keeps updating."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from cluster.launcher import Platform
from tests.support.events import event
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, installed here when missing and this process may install it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be installed without root and apt")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, timeout=900
    )
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium but it is not on PATH"
    return found


def browse(chromium: str, url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Open ``url`` headless, let its scripts run for a few (virtual) seconds."""
    return subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=6000", *extra, url],
        capture_output=True,
        text=True,
        timeout=120,
    )


def applied_shown(dom: str) -> int:
    match = re.search(r'id="kpi-applied">([\d,]+)<', dom)
    assert match, "the events-applied figure is missing from the page"
    return int(match.group(1).replace(",", ""))


def test_the_dashboard_renders_charts_without_errors_and_its_numbers_update(
    platform: Platform, chromium: str, tmp_path: Path, api_key: str, api_headers: dict[str, str]
) -> None:
    assert platform.info is not None
    url = platform.info.http_url
    with httpx.Client(base_url=url, timeout=30) as anonymous:  # the page itself is open
        page = anonymous.get("/dashboard")
        assert anonymous.get("/v1/status").status_code == 401  # its data are not
    with httpx.Client(base_url=url, timeout=30, headers=api_headers) as api:
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "cdn" not in page.text.lower()
        plotly = api.get("/dashboard/plotly.min.js")
        assert plotly.status_code == 200 and len(plotly.content) > 1_000_000
        api.post("/v1/events", json=[event("dash-user", "page_view")])
        wait_until(lambda: api.get("/v1/users/dash-user").status_code == 200)

        first = browse(chromium, f"{url}/dashboard#key={api_key}", tmp_path / "one", "--dump-dom")
        assert first.returncode == 0, first.stderr[-2000:]
        console = [line for line in first.stderr.splitlines() if "CONSOLE" in line]
        assert not [line for line in console if "Uncaught" in line or "Error" in line], console
        assert first.stdout.count('class="main-svg"') >= 4, "Plotly drew no charts"
        assert "API requests" in first.stdout and "shard 0 apply" in first.stdout
        assert re.search(r'id="ops-scaling"[^>]*>autoscaling: ', first.stdout)
        assert re.search(r'data-updates="[1-9]', first.stdout), "the page never polled"
        before = applied_shown(first.stdout)
        assert before >= 1

        api.post("/v1/events", json=[event("dash-user", "click") for _ in range(5)])
        wait_until(lambda: api.get("/v1/users/dash-user").json()["events"] == 6)
        second = browse(chromium, f"{url}/dashboard#key={api_key}", tmp_path / "two", "--dump-dom")
        assert applied_shown(second.stdout) >= before + 5
        assert api_key not in second.stdout, "the key stayed in the page (or its address)"

        keyless = browse(chromium, f"{url}/dashboard", tmp_path / "keyless", "--dump-dom")
        assert 'data-auth="401"' in keyless.stdout, "no key asked for on a 401"
        assert re.search(r'<form id="key-form"(?![^>]*hidden)', keyless.stdout)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    taken = browse(
        chromium,
        f"{url}/dashboard#key={api_key}",
        tmp_path / "three",
        f"--screenshot={shot}",
        "--window-size=1440,900",
        "--hide-scrollbars",
    )
    assert taken.returncode == 0 and shot.stat().st_size > 20_000
