"""Drive a corpus app in process, without a server: for the false-alarm soak and to measure how
much each app really retains.

The corpus's :class:`tests.corpus.traffic.Traffic` makes the requests; a minimal PEP 3333 driver
(environ built, body iterated, ``close()`` called, which is where memwatch records) or ASGI driver
(one task on one event loop, ``await app(scope, receive, send)`` per request) hands them to the
app. Both run in a child
process per case (``python -m tests.corpus.inprocess``) so that each app has its own heap and its
own memwatch, as under a server, and two Django settings never meet.

- ``soak``: the wrapped app at default settings, ``/memwatch/report.json`` read through the app
  every 500 requests and the alert counter from ``/metrics`` at the end.
- ``measure``: the *unwrapped* app after a warm-up: retained heap blocks per request and, under
  tracemalloc, retained bytes per request and per request of the leaking route (the figure in the
  catalogue).

Prints one JSON object on its last line (``soak`` also prints each poll on a line of its own before it).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import io
import json
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Generator, Iterable
from typing import Any
from urllib.parse import urlsplit

from tests.corpus.catalog import BY_NAME, Case, fixed_twin
from tests.corpus.traffic import Request, Traffic, metric_value, poll_from_report

SOAK_POLL_EVERY = 500


def _environ(request: Request) -> dict[str, Any]:
    url = urlsplit(request.path)
    body = request.body or b""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": url.path,
        "QUERY_STRING": url.query,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "50000",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in request.headers.items():
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            environ[key] = value
        else:
            environ["HTTP_" + key] = value
    return environ


Script = Generator[Request, tuple[int, bytes], dict[str, Any]]


def _call_wsgi(app: Any, request: Request) -> tuple[int, bytes]:
    status: list[str] = []

    def start_response(
        line: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        status.append(line)
        return lambda data: None

    result: Iterable[bytes] = app(_environ(request), start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return int(status[-1][:3]), body


async def _call_asgi(app: Any, request: Request) -> tuple[int, bytes]:
    url = urlsplit(request.path)
    body = request.body or b""
    sent = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # a client that stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": url.path,
        "raw_path": url.path.encode(),
        "query_string": url.query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in request.headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    return status, b"".join(chunks)


def run_script(app: Any, script: Script) -> dict[str, Any]:
    """Feeds the requests ``script`` yields to ``app``, sending each response back into it.

    An ASGI app runs the whole script inside one task of one event loop, as under a server
    (anyio's worker threads, which FastAPI uses for sync endpoints and dependencies, live as
    long as that task).
    """
    import memwatch

    if memwatch.detect_protocol(app) == "wsgi":
        try:
            request = next(script)
            while True:
                request = script.send(_call_wsgi(app, request))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def main() -> dict[str, Any]:
        try:
            request = next(script)
            while True:
                request = script.send(await _call_asgi(app, request))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    return asyncio.run(main())


def _get(path: str) -> Request:
    headers = {"Host": "127.0.0.1", "Accept": "application/json"}
    return Request("GET", path, headers, None, ("", "GET", "anonymous"), False)


def _check(request: Request, status: int) -> bool:
    return status == 401 if request.rejected else status < 400


# --- soak ------------------------------------------------------------------------------------


def soak(case: Case, requests: int, seed: int) -> dict[str, Any]:
    """``requests`` requests through the wrapped app; every poll's verdict."""
    module = importlib.import_module(case.module_name)
    return run_script(module.app, _soak_script(case, requests, seed))


def _soak_script(case: Case, requests: int, seed: int) -> Script:
    """Each poll is written out as its own line (``{"poll": ...}``) as soon as it is read and
    then dropped: a list of polls kept here would grow by about 15 bytes per request, in the
    heap memwatch watches, which is as much as the smallest growth it may call a leak
    (``min_growth_bytes``). :func:`soak_in_subprocess` gathers the lines."""
    traffic = Traffic(case, seed=seed)
    unexpected = 0
    first_flagged: int | None = None
    start = time.monotonic()
    for n in range(1, requests + 1):
        request = traffic.next()
        status, _ = yield request
        unexpected += not _check(request, status)
        if n % SOAK_POLL_EVERY == 0 or n == requests:
            _, body = yield _get("/memwatch/report.json")
            poll = poll_from_report(json.loads(body), n, time.monotonic() - start)
            if poll.suspected and first_flagged is None:
                first_flagged = n
            print(json.dumps({"poll": poll.brief()}), flush=True)
            del body, poll
    _, metrics = yield _get("/metrics")
    return {
        "case": case.name,
        "requests": requests,
        "seconds": round(time.monotonic() - start, 1),
        "unexpected_statuses": unexpected,
        "first_flagged": first_flagged,
        "alerts_total": metric_value(metrics.decode(), "memwatch_leak_alerts_total"),
    }


# --- measure ---------------------------------------------------------------------------------


def measure(case: Case, warmup: int, requests: int, seed: int, *, traced: bool) -> dict[str, Any]:
    """What the unwrapped app retains per request after ``warmup`` requests.

    Always the Python heap-block count (``sys.getallocatedblocks()`` after a full collection:
    cheap, exact for small objects, blind to buffers above 512 bytes); with ``traced`` also the
    bytes tracemalloc sees, which is what the catalogue's leak sizes are.

    Growth is taken between two points ``requests`` apart, after a first stretch of ``requests``:
    bounded structures that churn (an LRU cache, a capped deque) replace objects made before
    tracing with traced ones during that first stretch, which would otherwise count as growth.
    """
    module = importlib.import_module(case.module_name)
    app = getattr(module.app, "app", module.app)  # memwatch's middleware keeps the app in .app
    return run_script(app, _measure_script(case, warmup, requests, seed, traced))


def _measure_script(case: Case, warmup: int, requests: int, seed: int, traced: bool) -> Script:
    traffic = Traffic(case, seed=seed)
    for _ in range(warmup):
        yield traffic.next()
    leak_key = case.leak.route if case.leak else None
    if traced:
        tracemalloc.start(1)
        for _ in range(requests):
            yield traffic.next()
    gc.collect()
    blocks = sys.getallocatedblocks()
    before = tracemalloc.get_traced_memory()[0]
    on_route = 0
    for _ in range(requests):
        request = traffic.next()
        yield request
        on_route += request.key == leak_key
    gc.collect()
    blocks = sys.getallocatedblocks() - blocks
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    result: dict[str, Any] = {
        "case": case.name,
        "requests": requests,
        "leaking_route_requests": on_route,
        "blocks_per_request": blocks / requests,
    }
    if traced:
        result["bytes_per_request"] = grown / requests
        result["bytes_per_leaking_request"] = grown / on_route if on_route else None
    return result


def run_in_subprocess(args: list[str], timeout: float) -> dict[str, Any]:
    from tests.corpus.servers import ROOT, server_environment

    completed = subprocess.run(
        [sys.executable, "-m", "tests.corpus.inprocess", *args],
        cwd=ROOT,
        env=server_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"tests.corpus.inprocess {' '.join(args)} exited {completed.returncode}:\n"
            f"{completed.stderr[-3000:]}"
        )
    *lines, last = completed.stdout.strip().splitlines()
    result: dict[str, Any] = json.loads(last)
    polls = [json.loads(line)["poll"] for line in lines if line.startswith('{"poll":')]
    if polls:
        result["polls"] = polls
    return result


def soak_in_subprocess(
    case: Case, requests: int, seed: int = 7, timeout: float = 280
) -> dict[str, Any]:
    twin = ["--fixed"] if case.module == fixed_twin(BY_NAME[case.name]).module else []
    return run_in_subprocess(
        ["soak", case.name, str(requests), "--seed", str(seed), *twin], timeout
    )


def measure_in_subprocess(
    case: Case, warmup: int = 3000, requests: int = 2000, seed: int = 3, *, traced: bool = True
) -> dict[str, Any]:
    args = ["measure", case.name, str(requests), "--warmup", str(warmup), "--seed", str(seed)]
    return run_in_subprocess([*args, "--traced" if traced else "--blocks"], 280)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Drive a corpus app in process.")
    parser.add_argument("mode", choices=("soak", "measure"))
    parser.add_argument("case", choices=sorted(BY_NAME))
    parser.add_argument("requests", type=int)
    parser.add_argument("--warmup", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--traced", dest="traced", action="store_true", default=True)
    parser.add_argument("--blocks", dest="traced", action="store_false", help="no tracemalloc")
    parser.add_argument("--fixed", action="store_true", help="the case's fixed twin")
    args = parser.parse_args(argv)
    case = fixed_twin(BY_NAME[args.case]) if args.fixed else BY_NAME[args.case]
    if args.mode == "soak":
        result = soak(case, args.requests, args.seed)
    else:
        result = measure(case, args.warmup, args.requests, args.seed, traced=args.traced)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
