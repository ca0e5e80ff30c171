"""Several workers behind one ``/metrics``: prometheus_client's multiprocess mode.

GIVEN gunicorn with two workers (or ``uvicorn --workers 2``), ``PROMETHEUS_MULTIPROC_DIR`` set to
an empty tmp dir, and, for gunicorn, memwatch's ``child_exit`` hook in its config file,
THEN ``/metrics`` (served by whichever worker accepts the scrape) shows each worker's RSS and
heap gauges under its own ``pid`` label and the request counters summed over both workers,
exactly, once the workers have published (at most a second later);
AND a worker killed with SIGKILL is marked dead when gunicorn reaps it: its gauges disappear,
its counts stay in the sums, and its replacement shows up under a new pid.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.apps.support import metric_samples, requests_total
from tests.integration.conftest import Server, Servers

pytestmark = pytest.mark.integration

GUNICORN_CONF = """\
# Written by tests/integration/test_multiworker.py.
from memwatch.gunicorn import child_exit  # noqa: F401  (gunicorn looks the hook up by name)

workers = 2
worker_class = "sync"
graceful_timeout = 5
# No control socket: its default path is shared by every gunicorn of the user.
control_socket_disable = True
"""

RSS = "memwatch_process_resident_memory_bytes"
HEAP = "memwatch_python_heap_blocks"
DEADLINE = 30.0  # seconds for both workers to show up, or for a dead one to go
SETTLE = 10.0  # seconds for the counts to add up (workers publish once a second)

Key = tuple[str, str, str, str]
# i -> (path, headers, expected (route, method, auth, outcome))
Request = Callable[[int], tuple[str, dict[str, str], Key]]

FLASK_REQUESTS: list[Request] = [
    lambda i: (f"/reports/{i}", {"Authorization": f"Bearer t-{i}"}, ("/reports/<int:rid>", "GET", "bearer", "ok")),
    lambda i: ("/status/401", {}, ("/status/<int:code>", "GET", "anonymous", "rejected")),
    lambda i: (f"/api/v2/items/n{i}", {"X-API-Key": f"k-{i}"}, ("/api/v2/items/<name>", "GET", "apikey", "ok")),
]
FASTAPI_REQUESTS: list[Request] = [
    lambda i: (f"/users/{i}", {"Authorization": f"Bearer t-{i}"}, ("/users/{user_id}", "GET", "bearer", "ok")),
    lambda i: ("/status/403", {}, ("/status/{code}", "GET", "anonymous", "rejected")),
]


class Traffic:
    """Sends batches of requests, eight at a time, and remembers what memwatch must count."""

    def __init__(self, server: Server, kinds: list[Request]) -> None:
        self.server = server
        self.kinds = kinds
        self.expected: Counter[Key] = Counter()
        self.sent = 0

    def batch(self, n: int = 80) -> None:
        requests = [self.kinds[i % len(self.kinds)](i) for i in range(self.sent, self.sent + n)]

        def send(request: tuple[str, dict[str, str], Key]) -> int:
            return self.server.request("GET", request[0], request[1])[0]

        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(send, requests))
        assert all(s in (200, 401, 403) for s in statuses), self.server.logs()[-3000:]
        self.expected.update(key for _, _, key in requests)
        self.sent += n

    def metrics(self) -> str:
        status, body = self.server.request("GET", "/metrics")
        assert status == 200
        return body.decode()

    def pids(self, text: str, metric: str = RSS) -> set[str]:
        return {labels["pid"] for labels, _ in metric_samples(text, metric)}

    def until_two_workers(self, excluding: frozenset[str] = frozenset()) -> str:
        """Sends batches until two workers (none of ``excluding``) publish gauges; bounded."""
        deadline = time.monotonic() + DEADLINE
        while True:
            self.batch()
            text = self.metrics()
            pids = self.pids(text)
            if len(pids) == 2 and not pids & excluding:
                return text
            if time.monotonic() > deadline:
                pytest.fail(f"workers publishing: {pids} (not {excluding})\n{self.server.logs()[-3000:]}")
            time.sleep(0.2)

    def settled(self) -> str:
        """/metrics once both workers have published every request (bounded)."""
        time.sleep(1.5)  # each worker publishes at most once a second
        deadline = time.monotonic() + SETTLE
        while True:
            text = self.metrics()
            if requests_total(text) >= self.sent or time.monotonic() > deadline:
                return text
            time.sleep(0.2)

    def assert_counts_exact(self, text: str) -> None:
        counted = {
            (d["route"], d["method"], d["auth"], d["outcome"]): v
            for d, v in metric_samples(text, "memwatch_requests_total")
        }
        assert counted == {key: float(n) for key, n in self.expected.items()}, self.server.logs()[-3000:]


def multiprocess_server(servers: Servers, tmp_path: Path, name: str, argv: list[str]) -> Server:
    directory = tmp_path / "multiproc"
    directory.mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))  # Server copies os.environ
        return servers.start(name, argv)


def test_gunicorn_two_workers_and_a_killed_one(servers: Servers, tmp_path: Path) -> None:
    # GIVEN gunicorn with two sync workers, multiprocess mode and the child_exit hook
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(GUNICORN_CONF, encoding="utf-8")
    argv = [
        sys.executable, "-m", "gunicorn", "--config", str(conf), "--bind", "127.0.0.1:{port}",
        "tests.apps.flask_app:wrapped()",
    ]  # fmt: skip
    server = multiprocess_server(servers, tmp_path, "gunicorn-2-workers", argv)
    traffic = Traffic(server, FLASK_REQUESTS)

    # WHEN both workers have served requests
    text = traffic.until_two_workers()

    # THEN each worker has its own RSS and heap gauges, and the counters are summed, exactly
    workers = traffic.pids(text)
    assert str(server.process.pid) not in workers  # the arbiter serves nothing
    assert traffic.pids(text, HEAP) == workers
    assert all(value > 0 for _, value in metric_samples(text, RSS))
    text = traffic.settled()
    assert requests_total(text) == traffic.sent
    traffic.assert_counts_exact(text)

    # WHEN one worker is killed
    victim = sorted(workers)[0]
    os.kill(int(victim), signal.SIGKILL)

    # THEN once gunicorn has reaped it (child_exit), its gauges are gone and its counts stay
    deadline = time.monotonic() + DEADLINE
    while victim in traffic.pids(text := traffic.metrics()):
        if time.monotonic() > deadline:
            pytest.fail(f"worker {victim} still has gauges:\n{server.logs()[-3000:]}")
        time.sleep(0.2)
    assert requests_total(text) == traffic.sent

    # AND its replacement publishes under a new pid, next to the surviving worker
    text = traffic.until_two_workers(excluding=frozenset({victim}))
    assert traffic.pids(text) & workers == workers - {victim}
    traffic.assert_counts_exact(traffic.settled())
    assert "was sent SIGKILL" in server.logs()


def test_uvicorn_two_workers(servers: Servers, tmp_path: Path) -> None:
    # GIVEN uvicorn --workers 2 in multiprocess mode
    argv = [
        sys.executable, "-m", "uvicorn", "--factory", "tests.apps.fastapi_app:wrapped",
        "--host", "127.0.0.1", "--port", "{port}", "--workers", "2", "--no-access-log",
    ]  # fmt: skip
    server = multiprocess_server(servers, tmp_path, "uvicorn-2-workers", argv)
    traffic = Traffic(server, FASTAPI_REQUESTS)

    # WHEN both workers have served requests
    text = traffic.until_two_workers()

    # THEN /metrics shows both, and the counts summed over them
    assert str(server.process.pid) not in traffic.pids(text)  # the supervisor serves nothing
    traffic.assert_counts_exact(traffic.settled())
