"""Concurrency through real servers: gunicorn's gthread worker with 8 threads, and uvicorn with
200 requests in flight at once, with and without diagnosis windows running during the load.

Each test first proves the concurrency it claims (a rendezvous route answers only when 8 threads,
or 200 tasks, are inside the app at the same moment), then sends a mixed load with a distinct
credential per request. Then memwatch's counts are exact (the sum over routes equals the
requests sent, per route, auth scheme and outcome too), memwatch failed nowhere, the server
logged no exception, and everything finished within its time bounds (no deadlock: every
request has a timeout, every phase a deadline, and the test one of pytest-timeout's).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.apps.support import basic, metric_samples, requests_total
from tests.integration.conftest import Server, Servers, gunicorn, uvicorn

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REQUEST_TIMEOUT = 30.0  # a single request (the rendezvous waits up to 20 s inside the app)
GTHREAD_THREADS = 8
GTHREAD_CLIENTS = 32  # keep-alive connections, 4 per server thread
GTHREAD_REQUESTS = 4000
UVICORN_IN_FLIGHT = 200
UVICORN_ROUNDS = 3  # rendezvous rounds of 200 requests at once
UVICORN_REQUESTS = 3000

# i -> (headers, auth label): a distinct credential on every request
AUTHS: list[Callable[[int], tuple[dict[str, str], str]]] = [
    lambda i: ({"Authorization": f"Bearer conc-{i:07d}"}, "bearer"),
    lambda i: ({"Authorization": basic(f"user{i}", "pw")}, "basic"),
    lambda i: ({"X-API-Key": f"key-{i:07d}"}, "apikey"),
    lambda i: ({}, "anonymous"),
]
# i -> (path, route label, status)
ROUTES: list[Callable[[int], tuple[str, str, int]]] = [
    lambda i: (f"/work/{i}", "/work/{id}", 200),
    lambda i: ("/status/401", "/status/{id}", 401),
    lambda i: (f"/work/{i}", "/work/{id}", 200),
    lambda i: ("/status/404", "/status/{id}", 404),
    lambda i: ("/status/500", "/status/{id}", 500),
]
OUTCOME = {200: "ok", 401: "rejected", 404: "client_error", 500: "server_error"}

Key = tuple[str, str, str, str]  # route, method, auth, outcome


def request_plan(n: int, offset: int) -> list[tuple[str, dict[str, str], Key, int]]:
    """(path, headers, expected counter key, expected status) for n requests."""
    plan = []
    for i in range(offset, offset + n):
        path, route, status = ROUTES[i % len(ROUTES)](i)
        headers, auth = AUTHS[(i // len(ROUTES)) % len(AUTHS)](i)
        plan.append((path, headers, (route, "GET", auth, OUTCOME[status]), status))
    return plan


def counted(server: Server, expected_total: int, timeout: float = 15.0) -> dict[Key, float]:
    """memwatch's request counts once it has recorded ``expected_total`` requests (a request is
    recorded as its response completes, possibly a moment after the client has it)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = server.request("GET", "/metrics")
        assert status == 200
        text = body.decode()
        if requests_total(text) >= expected_total or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    errors = metric_samples(text, "memwatch_internal_errors_total")
    assert errors == [({}, 0.0)], f"memwatch failed inside: {errors}\n{server.logs()[-3000:]}"
    return {
        (d["route"], d["method"], d["auth"], d["outcome"]): v
        for d, v in metric_samples(text, "memwatch_requests_total")
    }


def assert_clean_log(server: Server) -> None:
    server.stop()
    log = server.logs()
    assert "Traceback" not in log, log[-4000:]
    assert "memwatch internal error" not in log, log[-4000:]


def start_diagnosis(server: Server) -> None:
    status, body = server.request("POST", "/memwatch/diagnose")
    assert status == 202, body


def assert_windows_ran(server: Server) -> None:
    """At least one diagnosis window finished during the load (or is still running)."""
    status, body = server.request("GET", "/memwatch/report.json")
    assert status == 200
    diagnosis = json.loads(body)["diagnosis"]
    assert diagnosis["windows"] >= 1, diagnosis


# --- gunicorn gthread, 8 threads -----------------------------------------------------------------


class KeepAliveClients:
    """One keep-alive HTTP connection per client thread; all closed on exit."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.local = threading.local()
        self.connections: list[http.client.HTTPConnection] = []
        self.lock = threading.Lock()

    def __enter__(self) -> KeepAliveClients:
        return self

    def __exit__(self, *exc: object) -> None:
        for connection in self.connections:
            connection.close()

    def _connect(self) -> http.client.HTTPConnection:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        with self.lock:
            self.connections.append(connection)
        self.local.connection = connection
        return connection

    def get(self, path: str, headers: dict[str, str]) -> int:
        connection = getattr(self.local, "connection", None) or self._connect()
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            # The server closed an idle keep-alive connection as this request went out: it
            # never reached the app (an exact count would show it if it had), so send it again.
            connection.close()
            connection = self._connect()
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
        response.read()
        return response.status


@pytest.mark.parametrize(
    "factory",
    [
        pytest.param("wsgi", id="plain"),
        pytest.param("wsgi_diagnosing", id="diagnosis windows during the load"),
    ],
)
def test_gunicorn_gthread_8_threads_counts_exactly(servers: Servers, factory: str) -> None:
    # GIVEN gunicorn, one gthread worker with 8 threads, serving a wrapped app
    server = servers.start(
        f"gthread8-{factory}",
        gunicorn(
            f"tests.apps.concurrency_app:{factory}()",
            "--worker-class",
            "gthread",
            "--threads",
            str(GTHREAD_THREADS),
            "--no-control-socket",
        ),
    )
    if factory.endswith("diagnosing"):
        start_diagnosis(server)
    sent = 0
    expected: Counter[Key] = Counter()
    with KeepAliveClients(server.port) as clients, ThreadPoolExecutor(GTHREAD_CLIENTS) as pool:
        # WHEN 8 requests at a time meet inside the app (all 8 server threads busy at once)
        for round_ in range(5):
            path = f"/meet/{round_}/{GTHREAD_THREADS}"
            statuses = list(
                pool.map(
                    lambda p: clients.get(p, {}),
                    [path] * GTHREAD_THREADS,
                    timeout=REQUEST_TIMEOUT + 10,
                )
            )
            assert statuses == [200] * GTHREAD_THREADS, statuses
            expected[("/meet/{id}/{id}", "GET", "anonymous", "ok")] += GTHREAD_THREADS
            sent += GTHREAD_THREADS
        # AND 4,000 requests over 32 keep-alive connections follow, each with a new credential
        plan = request_plan(GTHREAD_REQUESTS, 0)
        statuses = list(
            pool.map(lambda r: clients.get(r[0], r[1]), plan, timeout=REQUEST_TIMEOUT * 4)
        )
    assert statuses == [status for *_, status in plan]
    expected.update(key for _, _, key, _ in plan)
    sent += len(plan)

    # THEN memwatch counted every request exactly once, under the right labels
    counts = counted(server, sent)
    assert sum(counts.values()) == sent
    assert counts == {key: float(n) for key, n in expected.items()}
    if factory.endswith("diagnosing"):
        assert_windows_ran(server)
    assert_clean_log(server)


# --- uvicorn, 200 requests in flight ------------------------------------------------------------


class RawConnection:
    """A keep-alive HTTP/1.1 connection on asyncio streams: a client whose cost per request is
    a few system calls (httpx's pool gets slow with hundreds of connections)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str, headers: dict[str, str]) -> int:
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}\r\n".encode("latin-1")
        for attempt in range(2):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            assert self.reader is not None
            try:
                self.writer.write(request)
                await self.writer.drain()
                status_line = await self.reader.readline()
            except (ConnectionResetError, BrokenPipeError):
                status_line = b""
            if status_line:
                break
            # The server closed this idle keep-alive connection before reading the request (a
            # FIN, or a reset when the request crossed it): the request never reached the app
            # (an exact count would show it if it had). Once more, on a new connection.
            await self.close()
            assert attempt == 0, "the server closed a fresh connection"
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return int(status_line.split()[1])

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def uvicorn_load(
    port: int,
) -> tuple[list[int], list[int], list[tuple[str, dict[str, str], Key, int]]]:
    """Rendezvous rounds of 200 concurrent requests, then a mixed load, 200 in flight at most
    (one connection each)."""
    connections = [RawConnection(port) for _ in range(UVICORN_IN_FLIGHT)]
    try:

        async def bounded(coroutine: Any) -> Any:
            return await asyncio.wait_for(coroutine, REQUEST_TIMEOUT)

        met: list[int] = []
        for round_ in range(UVICORN_ROUNDS):
            path = f"/meet/{round_}/{UVICORN_IN_FLIGHT}"
            met += await asyncio.gather(*(bounded(c.get(path, {})) for c in connections))
        plan = request_plan(UVICORN_REQUESTS, 10_000_000)
        idle: asyncio.Queue[RawConnection] = asyncio.Queue()
        for connection in connections:
            idle.put_nowait(connection)

        async def one(path: str, headers: dict[str, str]) -> int:
            connection = await idle.get()
            try:
                return int(await bounded(connection.get(path, headers)))
            finally:
                idle.put_nowait(connection)

        statuses = await asyncio.gather(*(one(path, headers) for path, headers, _, _ in plan))
    finally:
        for connection in connections:
            await connection.close()
    return met, list(statuses), plan


@pytest.mark.parametrize(
    "factory",
    [
        pytest.param("asgi", id="plain"),
        pytest.param("asgi_diagnosing", id="diagnosis windows during the load"),
    ],
)
def test_uvicorn_200_concurrent_requests_counts_exactly(servers: Servers, factory: str) -> None:
    # GIVEN uvicorn serving a wrapped ASGI app
    server = servers.start(
        f"uvicorn200-{factory}",
        uvicorn(
            f"tests.apps.concurrency_app:{factory}",
            "--backlog",
            "1024",
            "--timeout-keep-alive",
            "60",
        ),
    )
    if factory.endswith("diagnosing"):
        start_diagnosis(server)
    # WHEN 200 requests are inside the app at once, three times, then 3,000 more with up to
    # 200 in flight, each with a new credential (bounded: no deadlock can pass unnoticed)
    met, statuses, plan = asyncio.run(asyncio.wait_for(uvicorn_load(server.port), 180))
    assert met == [200] * (UVICORN_ROUNDS * UVICORN_IN_FLIGHT), Counter(met)
    assert statuses == [status for *_, status in plan]
    sent = len(met) + len(plan)

    # THEN memwatch counted every request exactly once, under the right labels
    expected: Counter[Key] = Counter(key for _, _, key, _ in plan)
    expected[("/meet/{id}/{id}", "GET", "anonymous", "ok")] += len(met)
    counts = counted(server, sent)
    assert sum(counts.values()) == sent
    assert counts == {key: float(n) for key, n in expected.items()}
    if factory.endswith("diagnosing"):
        assert_windows_ran(server)
    assert_clean_log(server)
