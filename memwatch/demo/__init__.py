"""``make demo``: the demo service under a real server and load, then its leak report.

Starts :mod:`memwatch.demo.app` under gunicorn (one worker, four threads) on 127.0.0.1, drives
seeded random traffic at it from several client threads with a progress bar, stops once memwatch
has flagged the leaks and named their routes (or after ``MEMWATCH_DEMO_REQUESTS``), prints the
report, and keeps ``/metrics`` and ``/memwatch/`` reachable for ``MEMWATCH_DEMO_HOLD`` seconds
(default 60; 0 exits at once).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from memwatch.cli import format_report

_ROUTES = ("profile", "reports", "search", "health")
_WEIGHTS = (30, 25, 30, 15)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _token(i: int) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    payload = {"sub": f"user-{i}", "scopes": ["read", "write"], "tenant": f"t{i % 17}"}
    return f"{part({'alg': 'HS256'})}.{part(payload)}.sig{i:08x}"


class _Load:
    """Seeded random traffic from several keep-alive clients."""

    def __init__(self, port: int, seed: int) -> None:
        self.port = port
        self.seed = seed
        self.sent = 0
        self.errors = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def client(self, index: int, budget: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        for _ in range(budget):
            if self.stop.is_set():
                break
            route = rng.choices(_ROUTES, _WEIGHTS)[0]
            headers: dict[str, str] = {}
            if route == "profile":
                # A third of the calls bring a token never seen before; the rest reuse a few.
                with self.lock:
                    n = self.sent
                tid = n * 7 + index if rng.random() < 0.35 else rng.randrange(50)
                headers["Authorization"] = f"Bearer {_token(tid)}"
                path = "/api/profile"
            elif route == "reports":
                user = f"analyst{rng.randrange(20)}:pw{rng.randrange(1000)}"
                headers["Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
                path = f"/reports/{rng.randrange(10_000)}"
            elif route == "search":
                headers["X-API-Key"] = f"key-{rng.randrange(30)}"
                path = f"/search?q=term{rng.randrange(400)}"
            else:
                path = "/health"
            try:
                conn.request("GET", path, headers=headers)
                conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                with self.lock:
                    self.errors += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            with self.lock:
                self.sent += 1
        conn.close()


def _get_json(port: int, path: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        data: dict[str, Any] = json.loads(conn.getresponse().read())
        return data
    finally:
        conn.close()


def _get_text(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the demo server exited with {proc.returncode}")
        try:
            _get_text(port, "/health")
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the demo server did not start in time")


def _bar(done: int, total: int, status: str, width: int = 30) -> str:
    filled = int(width * done / max(total, 1))
    return f"\r[{'#' * filled}{'.' * (width - filled)}] {done:>6}/{total} requests  {status:<48}"


def main() -> int:
    if shutil.which("gunicorn") is None and not _has_module("gunicorn"):
        print("memwatch demo: gunicorn is not installed (pip install 'memwatch[test]')")
        return 1
    total = int(os.environ.get("MEMWATCH_DEMO_REQUESTS", "30000"))
    hold = float(os.environ.get("MEMWATCH_DEMO_HOLD", "60"))
    port = int(os.environ.get("MEMWATCH_DEMO_PORT", "0")) or _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [
        sys.executable, "-m", "gunicorn", "memwatch.demo.app:app",
        "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "4",
        "--worker-class", "gthread", "--log-level", "warning",
    ]  # fmt: skip
    print(f"memwatch demo: starting the demo service on http://127.0.0.1:{port} (gunicorn gthread)")
    proc = subprocess.Popen(command, env=env)
    try:
        _wait_ready(port, proc)
        load = _Load(port, seed=int(os.environ.get("MEMWATCH_DEMO_SEED", "7")))
        clients = 4
        threads = [
            threading.Thread(target=load.client, args=(i, total // clients), daemon=True)
            for i in range(clients)
        ]
        for t in threads:
            t.start()
        report: dict[str, Any] = {}
        flagged_at: int | None = None
        last_poll = 0
        while any(t.is_alive() for t in threads):
            time.sleep(0.5)
            if load.sent - last_poll >= 500:
                last_poll = load.sent
                report = _get_json(port, "/memwatch/report.json")
                routes = [r for r in report.get("routes", []) if r.get("suspected")]
                if report["leak"]["suspected"] and flagged_at is None:
                    flagged_at = load.sent
                if flagged_at is not None and len(routes) >= 2 and load.sent > flagged_at + 3000:
                    load.stop.set()
                status = (
                    f"leak suspected, {len(routes)} route(s) named"
                    if report["leak"]["suspected"]
                    else f"status: {report['leak']['status']}"
                )
            else:
                status = "..." if not report else status
            print(_bar(load.sent, total, status), end="", flush=True)
        print()
        report = _get_json(port, "/memwatch/report.json")
        print()
        print("=" * 78)
        print("memwatch leak report")
        print("=" * 78)
        print(format_report(report))
        print()
        metrics = _get_text(port, "/metrics").splitlines()
        shown = [
            line
            for line in metrics
            if line.startswith(("memwatch_leak_suspected", "memwatch_route_leak_suspected"))
            and not line.endswith(" 0.0")
        ]
        print("From /metrics:")
        for line in shown:
            print("  " + line)
        print(f"\nRequests sent: {load.sent} ({load.errors} client errors)")
        if hold > 0:
            print(
                f"\nFor the next {hold:.0f} s:\n"
                f"  metrics:     http://127.0.0.1:{port}/metrics\n"
                f"  report page: http://127.0.0.1:{port}/memwatch/\n"
                f"  report JSON: http://127.0.0.1:{port}/memwatch/report.json\n"
                f"  (set MEMWATCH_DEMO_HOLD=0 to exit at once; Ctrl-C to stop)"
            )
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(hold)
        return 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
