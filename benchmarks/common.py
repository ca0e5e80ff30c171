"""What the benchmark harnesses share: statistics, the machine's description, progress output,
and real servers started and stopped by the harness itself.

Servers listen on 127.0.0.1 on a port the kernel picked, with their output in a log file; a
harness stops exactly the processes it started (terminate, then kill after a timeout), never
anything found by name. gunicorn runs with ``--no-control-socket``: otherwise every gunicorn on
the machine shares ``~/.gunicorn/gunicorn.ctl``.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# --- statistics ------------------------------------------------------------------------------


def iqr(values: Sequence[float]) -> float:
    """Interquartile range (0 with fewer than four values)."""
    if len(values) < 4:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, IQR, min and max of a list of figures."""
    if not values:
        return {
            "median": float("nan"),
            "iqr": 0.0,
            "min": float("nan"),
            "max": float("nan"),
            "n": 0,
        }
    return {
        "median": statistics.median(values),
        "iqr": iqr(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def fmt(values: Sequence[float], digits: int = 2) -> str:
    """``median (IQR)``."""
    return f"{median(values):.{digits}f} ({iqr(values):.{digits}f})"


# --- the machine and output ------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in load],
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def versions(*distributions: str) -> dict[str, str]:
    """Installed versions of the named distributions (missing ones are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in distributions:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_json(path: str | None, document: dict[str, Any]) -> None:
    if not path:
        return
    document.setdefault("command", " ".join([sys.executable, *sys.argv]))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=2, default=str)
        f.write("\n")


# --- processes: CPU and memory from /proc ---------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (read from /proc, alive now)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: split after its last ")".
        fields = stat[stat.rindex(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of these processes (all their threads), from /proc/<pid>/stat.
    A process that has exited counts 0: keep the same set of pids for a before/after pair."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


# --- servers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for key in [k for k in env if k.startswith("MEMWATCH_") or k == "PROMETHEUS_MULTIPROC_DIR"]:
        del env[key]  # the caller's shell must not change what is measured
    paths = [str(REPO_ROOT), str(HERE), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Server:
    """One server process started by a harness, on 127.0.0.1:``port``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        ready_path: str = "/metrics",
    ) -> None:
        self.name = name
        self.port = free_port()
        self.argv = [a.format(port=self.port) for a in argv]
        self.log_path = log_dir / f"{name}-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.argv,
            cwd=REPO_ROOT,
            env=server_env(env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the harness's terminal reaches the harness only
        )
        self.ready_path = ready_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        """The server's processes: the master (or only) process and its workers."""
        return process_tree(self.process.pid)

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
        body: bytes | None = None,
    ) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def wait_ready(self, timeout: float = START_TIMEOUT, workers: int = 0) -> None:
        """Polls until the server answers 200 (and, with ``workers``, until that many worker
        processes exist)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.logs()[-4000:]}"
                )
            try:
                status, _ = self.request("GET", self.ready_path, timeout=2.0)
                if status == 200 and (workers == 0 or len(self.pids()) >= workers + 1):
                    return
                last = f"status {status}"
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.name} not ready after {timeout} s ({last!r}):\n{self.logs()[-4000:]}"
        )

    def stop(self) -> None:
        """SIGTERM to the process this harness started, SIGKILL to its group after a timeout."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                # The group is the session started for this server: only its own processes.
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_TIMEOUT)
        if not self._log.closed:
            self._log.close()


def gunicorn_argv(app: str, *options: str, workers: int = 1) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        "127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--graceful-timeout",
        "5",
        "--no-control-socket",
        "--log-level",
        "warning",
        *options,
        app,
    ]


def uvicorn_argv(factory: str, *options: str, workers: int = 1) -> list[str]:
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
        str(workers),
        "--no-access-log",
        "--log-level",
        "warning",
        *options,
    ]


# --- wrk ---------------------------------------------------------------------------------------

# Appended to every harness's wrk script: one JSON line with the counts and latency percentiles.
WRK_DONE_LUA = r"""
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "errors_connect": %d, "errors_read": %d, '
    .. '"errors_write": %d, "errors_status": %d, "errors_timeout": %d, '
    .. '"latency_p50_us": %d, "latency_p90_us": %d, "latency_p99_us": %d, "latency_max_us": %d, '
    .. '"latency_mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""

# Requests as the in-process harness sends them (benchmarks/inprocess.py): an item id over 1000
# values, a query string, nine ordinary headers, a cookie and a JWT-sized Bearer token that
# changes every 4 requests.
WRK_LUA = (
    WRK_DONE_LUA
    + r"""
local counter = 0
local thread_id = 0
local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("id", #threads)
end
function init(args)
  thread_id = tonumber(wrk.thread:get("id")) or 1
  counter = thread_id * 100000000 + math.floor(os.time() % 100000) * 1000
end
local headers = {
  ["Host"] = "api.example.com",
  ["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36",
  ["Accept"] = "application/json",
  ["Accept-Encoding"] = "gzip, deflate, br",
  ["Accept-Language"] = "en-GB,en;q=0.9",
  ["X-Forwarded-For"] = "203.0.113.7",
  ["X-Request-Id"] = "5f0c6a4e-3b7d-4a3b-9a51-7c1f0d2e8b44",
  ["Cookie"] = "theme=dark; csrftoken=Zm9vYmFyYmF6cXV4cXV1eA; _ga=GA1.2.123456789.1700000000",
}
function request()
  counter = counter + 1
  local token = math.floor(counter / 4)
  headers["Authorization"] = string.format(
    "Bearer eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ1c2VyLXtuOjA4ZH0iLCJpYXQiOjE3MDAwMDAwMDAsInNlcSI6%012dfQ.c2lnbmF0dXJlLXRoYXQtbG9va3MtcmVhbC1lbm91Z2gtZm9yLWEtYmVuY2htYXJr%08x",
    token, token % 4294967296)
  return wrk.format("GET", string.format("/items/%d?fields=name,price&page=2", counter % 1000), headers)
end
"""
)


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    port: int,
    script: Path,
    *,
    seconds: float,
    threads: int,
    connections: int,
    timeout: float | None = None,
    script_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Runs wrk for ``seconds`` against 127.0.0.1:``port``; returns the JSON its ``done`` wrote."""
    argv = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}/",
        *(["--", *script_args] if script_args else []),
    ]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout or seconds + 60, check=False
    )
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    raise RuntimeError(
        f"wrk gave no summary (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
    )


def bounded_loop(deadline_seconds: float) -> Callable[[], bool]:
    """A predicate that turns False once ``deadline_seconds`` have passed."""
    end = time.monotonic() + deadline_seconds
    return lambda: time.monotonic() < end


_WORD_CONSONANTS = "ghjklmnprstvwz"
_WORD_VOWELS = "oui"


def route_word(n: int) -> str:
    """A pronounceable path segment, distinct for each n < 1764, that memwatch's path
    normalisation keeps as it is (no digits, no hex-only runs, vowels enough)."""
    syllables = [c + v for c in _WORD_CONSONANTS for v in _WORD_VOWELS]
    return syllables[n // len(syllables) % len(syllables)] + syllables[n % len(syllables)]


def parse_sizes(text: str) -> list[int]:
    return [int(s.replace("_", "")) for s in re.split(r"[,\s]+", text) if s.strip()]


# --- every label set -----------------------------------------------------------------------

# The contract's auth schemes and outcomes (docs: README "Metrics"); written out here so that a
# process measured without memwatch need not import it.
AUTH_SCHEMES = ("bearer", "basic", "digest", "apikey", "session", "other", "anonymous")
OUTCOME_STATUS = ("200", "401", "404", "500")


def auth_headers(scheme: str, n: int) -> dict[str, str]:
    """Headers that memwatch classifies as ``scheme``, with a credential distinct for each n."""
    if scheme == "bearer":
        return {"Authorization": f"Bearer tok-{n}"}
    if scheme == "basic":
        return {"Authorization": "Basic " + base64.b64encode(f"user{n}:pw".encode()).decode()}
    if scheme == "digest":
        return {"Authorization": f'Digest username="user{n}", realm="r", nonce="{n}", uri="/"'}
    if scheme == "apikey":
        return {"X-API-Key": f"key-{n}"}
    if scheme == "session":
        return {"Cookie": f"theme=dark; sessionid=s{n}"}
    if scheme == "other":
        return {"Authorization": f"Negotiate neg-{n}"}
    return {}


def combos(max_routes: int) -> list[tuple[str, str, str]]:
    """(path, auth scheme, status) for every label set."""
    return [
        (f"/api/{route_word(r)}", scheme, status)
        for r in range(max_routes)
        for scheme in AUTH_SCHEMES
        for status in OUTCOME_STATUS
    ]


_STATUS = {
    "200": "200 OK",
    "401": "401 Unauthorized",
    "404": "404 Not Found",
    "500": "500 Internal Server Error",
}


def cardinality_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    query = environ.get("QUERY_STRING", "")
    status = _STATUS.get(query[2:5] if query.startswith("s=") else "200", "200 OK")
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
