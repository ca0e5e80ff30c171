"""The report page in a real browser: headless Chromium loads /memwatch/ from a leaking service."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Servers, gunicorn

pytestmark = pytest.mark.integration

DRIVE_TIMEOUT = 150.0


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is not None:
        return path
    message = "chromium is not installed (Debian package 'chromium'; `make system-deps` as root)"
    if os.environ.get("CI", "").lower() in {"true", "1", "yes"}:
        pytest.fail(message + ": on CI this is a failure, not a skip", pytrace=False)
    pytest.skip(message)


def _browser(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=412,915",  # a phone
    ]
    return subprocess.run([chromium, *flags, *args], capture_output=True, timeout=90, check=True)


def test_report_page_shows_verdict_routes_sites_and_charts(servers: Servers, tmp_path: Path) -> None:
    chromium = _chromium()
    # GIVEN a leaking service (a record kept per /orders request) under gunicorn
    server = servers.start("page", gunicorn("tests.apps.page_app:application"))
    bearer = {"Authorization": "Bearer " + base64.b64encode(b"canary-page-token").decode()}
    # WHEN traffic runs until the leak is suspected and a diagnosis window has finished
    deadline = time.monotonic() + DRIVE_TIMEOUT
    report: dict[str, object] = {}
    sent = 0
    while time.monotonic() < deadline:
        for i in range(200):
            path = f"/orders/{sent + i}" if i % 4 else f"/items/{sent + i}"
            server.request("GET", path, headers=bearer if i % 4 else {"Authorization": "Basic eDp5"})
        sent += 200
        status, body = server.request("GET", "/memwatch/report.json")
        assert status == 200
        report = json.loads(body)
        diagnosis = report.get("diagnosis") or {}
        if report["leak"]["suspected"] and report["sites"] and not diagnosis.get("active"):
            break
    assert report.get("sites"), f"no diagnosis result after {sent} requests: {report.get('leak')}"
    # AND Chromium renders /memwatch/ (the DOM as rendered, and a phone-sized screenshot)
    url = f"http://127.0.0.1:{server.port}/memwatch/"
    dom = _browser(chromium, tmp_path / "profile-dom", "--dump-dom", url).stdout.decode()
    screenshot = tmp_path / "report.png"
    _browser(chromium, tmp_path / "profile-shot", f"--screenshot={screenshot}", url)
    # THEN the verdict, a route, a site and a chart are on the page
    assert 'id="verdict"' in dom and "Leak suspected" in dom
    assert "/orders/{id}" in dom
    assert "tests/apps/leaky_multiworker.py:" in dom
    assert "<svg" in dom and "<path" in dom  # the memory charts
    assert "canary-page-token" not in dom and "Y2FuYXJ5" not in dom
    assert screenshot.exists() and screenshot.stat().st_size > 10_000
