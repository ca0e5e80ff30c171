"""Real servers for the integration tests: start one on a free port on 127.0.0.1, wait until it
answers (bounded), and always stop it (terminate, then kill after a timeout), keeping its logs."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One server process, its port and its combined stdout/stderr log."""

    def __init__(self, name: str, argv: Sequence[str], port: int, log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.log_path = log_path
        self._log = log_path.open("wb")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        for key in [k for k in env if k.startswith("MEMWATCH_")]:
            del env[key]  # the server runs with memwatch's defaults, whatever the caller's shell
        self.process = subprocess.Popen(
            self.argv,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, timeout: float = 10.0
    ) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def wait_ready(self, path: str = "/metrics", timeout: float = START_TIMEOUT) -> None:
        """Polls ``path`` until it answers 200; fails with the server's log if it exits first
        or never answers."""
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"{self.name} exited with {self.process.returncode} before it was ready:\n"
                    + self.logs()
                )
            try:
                status, _ = self.request("GET", path, timeout=2.0)
                if status == 200:
                    return
                last_error = RuntimeError(f"status {status}")
            except OSError as exc:  # not listening yet
                last_error = exc
            time.sleep(0.1)
        pytest.fail(f"{self.name} not ready after {timeout} s ({last_error!r}):\n{self.logs()}")

    def stop(self) -> int | None:
        """Terminates the server and waits for it; kills it if it does not stop in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
        self._log.close()
        return self.process.returncode


class Servers:
    """Starts servers for one test and stops every one of them at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Server] = []

    def start(self, name: str, argv_for_port: Sequence[str]) -> Server:
        port = free_port()
        argv = [arg.format(port=port) for arg in argv_for_port]
        server = Server(name, argv, port, self.log_dir / f"{name}-{port}.log")
        self.started.append(server)
        server.wait_ready()
        return server

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    started = Servers(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


def gunicorn(app: str, *options: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        "127.0.0.1:{port}",
        "--workers",
        "1",
        "--graceful-timeout",
        "5",
        *options,
        app,
    ]


def uvicorn(factory: str, *options: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        factory,
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--workers",
        "1",
        "--no-access-log",  # its access log quotes query strings; memwatch's output is checked
        *options,
    ]
