"""Start a corpus app under a real server (one worker), wait until it answers, always stop it.

- ``gunicorn-sync``: ``gunicorn --workers 1 --worker-class sync``;
- ``gunicorn-gthread``: ``gunicorn --workers 1 --worker-class gthread --threads 4``;
- ``uvicorn``: ``uvicorn --workers 1`` (asyncio loop, h11), access log off.

The server runs from the repository root (``tests.corpus.<module>:app``) with every
``MEMWATCH_*`` variable removed from its environment, so that memwatch runs at its defaults.
Its output goes to a log file whose tail :class:`ServerError` quotes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.corpus.catalog import GTHREAD, SYNC, UVICORN, Case
from tests.corpus.traffic import fetch

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class ServerError(RuntimeError):
    pass


@dataclass
class Server:
    case: Case
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def command(case: Case, port: int) -> list[str]:
    bind = f"127.0.0.1:{port}"
    if case.server == SYNC:
        return [
            sys.executable, "-m", "gunicorn", "--workers", "1", "--worker-class", "sync",
            "--bind", bind, "--graceful-timeout", "5", "--log-level", "warning", case.target,
        ]  # fmt: skip
    if case.server == GTHREAD:
        return [
            sys.executable, "-m", "gunicorn", "--workers", "1", "--worker-class", "gthread",
            "--threads", "4", "--bind", bind, "--graceful-timeout", "5",
            "--log-level", "warning", case.target,
        ]  # fmt: skip
    if case.server == UVICORN:
        return [
            sys.executable, "-m", "uvicorn", case.target, "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1", "--no-access-log", "--log-level", "warning",
            "--timeout-graceful-shutdown", "5",
        ]  # fmt: skip
    raise ValueError(f"unknown server {case.server!r}")


def server_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWATCH_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.contextmanager
def serve(case: Case, *, log_dir: Path | None = None) -> Iterator[Server]:
    """Runs ``case``'s app under its server until the block exits."""
    port = free_port()
    log_dir = log_dir or Path(tempfile.gettempdir())
    log_path = log_dir / f"corpus-{case.name}-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command(case, port),
            cwd=ROOT,
            env=server_environment(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a stray worker can be reaped
            preexec_fn=_die_with_parent,
        )
    server = Server(case, port, process, log_path)
    try:
        _wait_ready(server)
        yield server
    finally:
        stop(server)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies (Linux), so
    that a test run killed without running its ``finally`` leaves no server behind."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerError(
                f"{server.case.server} for {server.case.name} exited with "
                f"{server.process.returncode}:\n{server.log_tail()}"
            )
        with contextlib.suppress(OSError):
            status, _ = fetch(server.port, "/memwatch/report.json", timeout=2.0)
            if status == 200:
                return
        time.sleep(0.1)
    raise ServerError(
        f"{server.case.server} for {server.case.name} not ready after {READY_TIMEOUT:.0f} s:\n"
        f"{server.log_tail()}"
    )


def stop(server: Server) -> None:
    """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`; then reap the group (stray workers)."""
    process = server.process
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(timeout=STOP_TIMEOUT)
    # The group is the server's own (start_new_session): kill a worker its master left behind.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
