"""In-process benchmark: CPU time per request of a Flask and a Starlette JSON endpoint, bare and
wrapped by ``memwatch.wrap`` (default settings).

No server and no HTTP client sit in the measured path: WSGI apps are called through a minimal
PEP 3333 driver (``app(environ, start_response)``, the body iterated, ``close()`` called, which is
where memwatch records), ASGI apps through ``await app(scope, receive, send)`` in a loop inside one
event loop. Requests are realistic for a JSON API behind a proxy: a route with a path parameter
and a varying id (so route templating runs), a query string, a cookie, about ten headers, and a
Bearer token that changes every few requests (so the distinct-credential sketch does real work).

Bare and wrapped batches are interleaved (their order alternates from batch to batch) so that the
drift of a shared, noisy machine hits both alike; each batch gives one CPU time per request
(``time.thread_time``, or ``time.process_time`` with ``--timer process``), and the report gives the
median and interquartile range over batches, the added time and the bare/wrapped ratio. The run is
repeated with ``--extra-objects`` live objects held in the heap (default: none, then 2,000,000, a
production-sized process), because some of memwatch's readings cost more as the heap grows.

memwatch's start-up (the requests its detector ignores while the app warms up, then the denser
samples and measured requests of its first verdict: about 12,000 requests on the benchmark's own
heap, 20,000 with 2,000,000 extra objects, once per process) costs several times its steady
state. By default (``--start-up separate``) rounds are run, timed alike, until memwatch reaches
its steady state, and reported apart (their rounds, the added time per request, the CPU added in
all, and both ratios as they would be with those rounds counted); the measured rounds follow.
``--start-up include`` measures from the first round, as the harness did before.

Usage::

    .venv/bin/python benchmarks/inprocess.py                 # defaults, about a minute
    .venv/bin/python benchmarks/inprocess.py --batches 61 --requests 2000 --json out.json
    .venv/bin/python benchmarks/inprocess.py --apps starlette --extra-objects 0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import json
import logging
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import memwatch

# How many requests share one Bearer token: a token per user session, not per request.
REQUESTS_PER_TOKEN = 4
DISTINCT_ITEMS = 1000
# The most start-up rounds run before the measured ones (memwatch's first verdict comes after
# about 12 of them on the benchmark's own heap, 20 with 2,000,000 extra objects).
START_UP_MAX = 100

TIMERS: dict[str, Callable[[], float]] = {
    "thread": time.thread_time,
    "process": time.process_time,
}


# --- the applications ------------------------------------------------------------------------


def _item(item_id: int) -> dict[str, Any]:
    return {
        "id": item_id,
        "name": f"item {item_id}",
        "price": round(item_id * 0.25, 2),
        "tags": ["catalogue", "public"],
        "in_stock": item_id % 3 != 0,
    }


def make_flask_app() -> Any:
    """A Flask app with one JSON endpoint on a route with an int path parameter."""
    from flask import Flask, request

    app = Flask("bench_flask")

    @app.get("/items/<int:item_id>")
    def get_item(item_id: int) -> dict[str, Any]:
        body = _item(item_id)
        body["fields"] = request.args.get("fields", "")
        return body

    return app


def make_starlette_app() -> Any:
    """A Starlette app with one JSON endpoint on a route with an int path parameter."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def get_item(request: Request) -> JSONResponse:
        body = _item(request.path_params["item_id"])
        body["fields"] = request.query_params.get("fields", "")
        return JSONResponse(body)

    return Starlette(routes=[Route("/items/{item_id:int}", get_item)])


# --- the requests ----------------------------------------------------------------------------


def _token(n: int) -> str:
    """A JWT-shaped Bearer token, distinct for each n (about 150 characters, like real ones)."""
    return (
        "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9."
        f"eyJzdWIiOiJ1c2VyLXtuOjA4ZH0iLCJpYXQiOjE3MDAwMDAwMDAsInNlcSI6{n:012d}fQ."
        f"c2lnbmF0dXJlLXRoYXQtbG9va3MtcmVhbC1lbm91Z2gtZm9yLWEtYmVuY2htYXJr{n:08x}"
    )


@dataclass(frozen=True)
class RequestSpec:
    """What varies between requests: the item id and the credential."""

    path: str
    token: str


def request_specs(count: int, start: int) -> list[RequestSpec]:
    return [
        RequestSpec(
            path=f"/items/{(start + i) % DISTINCT_ITEMS}",
            token=_token((start + i) // REQUESTS_PER_TOKEN),
        )
        for i in range(count)
    ]


QUERY = "fields=name,price&page=2"
COOKIE = "theme=dark; csrftoken=Zm9vYmFyYmF6cXV4cXV1eA; _ga=GA1.2.123456789.1700000000"
COMMON_HEADERS = (
    ("host", "api.example.com"),
    ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36"),
    ("accept", "application/json"),
    ("accept-encoding", "gzip, deflate, br"),
    ("accept-language", "en-GB,en;q=0.9"),
    ("x-forwarded-for", "203.0.113.7"),
    ("x-request-id", "5f0c6a4e-3b7d-4a3b-9a51-7c1f0d2e8b44"),
)


class _FileWrapper:
    """A server's ``wsgi.file_wrapper`` (a class, as gunicorn's is); never used by the app."""

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike = filelike


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return _write


def _write(data: bytes) -> None:
    pass


# Requests are built CHUNK at a time, just before they are timed, as a server builds each
# request just before calling the app. Building a whole batch beforehand would make every request
# start on cold memory. With 32 (the default) most of a request's objects have left the L1 cache
# by the time it runs (31 requests of application work come between); ``--chunk 1`` builds each
# request right before its call, as a server does, and times the calls one by one.
CHUNK = 32
_OVERHEAD: dict[Callable[[], float], float] = {}


def timer_overhead(timer: Callable[[], float]) -> float:
    """What one timed segment's two readings of ``timer`` add to it (the median of back-to-back
    differences, seconds; ``time.thread_time`` is a system call of about 0.2 µs here): taken
    off every segment, so that timing requests one by one does not inflate them."""
    if timer not in _OVERHEAD:
        differences = []
        for _ in range(2001):
            first = timer()
            differences.append(timer() - first)
        _OVERHEAD[timer] = statistics.median(differences)
    return _OVERHEAD[timer]


class Driver(Protocol):
    """Runs requests through an app; only the app's calls are timed."""

    def measure(self, specs: Sequence[RequestSpec], timer: Callable[[], float]) -> float:
        """CPU seconds spent in the app for these requests."""
        ...


class WSGIDriver:
    """Calls a WSGI app as a server would: environ, start_response, iterate the body, close()."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.base: dict[str, Any] = {
            "REQUEST_METHOD": "GET",
            "SCRIPT_NAME": "",
            "QUERY_STRING": QUERY,
            "SERVER_NAME": "api.example.com",
            "SERVER_PORT": "443",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "10.0.0.7",
            "REMOTE_PORT": "51234",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": _FileWrapper,
            "HTTP_COOKIE": COOKIE,
        }
        for name, value in COMMON_HEADERS:
            self.base["HTTP_" + name.upper().replace("-", "_")] = value

    def prepare(self, specs: Sequence[RequestSpec]) -> list[dict[str, Any]]:
        environs = []
        for spec in specs:
            environ = dict(self.base)
            environ["PATH_INFO"] = spec.path
            environ["RAW_URI"] = spec.path + "?" + QUERY
            environ["HTTP_AUTHORIZATION"] = "Bearer " + spec.token
            environ["wsgi.input"] = io.BytesIO(b"")
            environs.append(environ)
        return environs

    def measure(self, specs: Sequence[RequestSpec], timer: Callable[[], float]) -> float:
        app = self.app
        total = 0.0
        overhead = timer_overhead(timer)
        for i in range(0, len(specs), CHUNK):
            environs = self.prepare(specs[i : i + CHUNK])
            begin = timer()
            for environ in environs:
                result = app(environ, _start_response)
                try:
                    for _chunk in result:
                        pass
                finally:
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
            total += timer() - begin - overhead
        return total


_RECEIVE_MESSAGE = {"type": "http.request", "body": b"", "more_body": False}


async def _receive() -> dict[str, Any]:
    return _RECEIVE_MESSAGE


async def _send(message: dict[str, Any]) -> None:
    pass


class ASGIDriver:
    """Calls an ASGI app as a server would, one request after another in one event loop."""

    def __init__(self, app: Callable[..., Any], loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.loop = loop
        self.headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in COMMON_HEADERS]
        self.cookie = COOKIE.encode("latin-1")

    def prepare(self, specs: Sequence[RequestSpec]) -> list[dict[str, Any]]:
        scopes = []
        for spec in specs:
            # New bytes objects for every request, as a server's parser makes them (their
            # hashes are not cached yet).
            headers = [(bytes(bytearray(k)), bytes(bytearray(v))) for k, v in self.headers]
            headers.append((b"authorization", b"Bearer " + spec.token.encode("ascii")))
            headers.append((b"cookie", bytes(bytearray(self.cookie))))
            scopes.append(
                {
                    "type": "http",
                    "asgi": {"version": "3.0", "spec_version": "2.3"},
                    "http_version": "1.1",
                    "server": ("10.0.0.2", 8000),
                    "client": ("10.0.0.7", 51234),
                    "scheme": "https",
                    "method": "GET",
                    "root_path": "",
                    "path": spec.path,
                    "raw_path": spec.path.encode("ascii"),
                    "query_string": QUERY.encode("ascii"),
                    "headers": headers,
                    "state": {},
                }
            )
        return scopes

    def measure(self, specs: Sequence[RequestSpec], timer: Callable[[], float]) -> float:
        return self.loop.run_until_complete(self._measure(specs, timer))

    async def _measure(self, specs: Sequence[RequestSpec], timer: Callable[[], float]) -> float:
        app = self.app
        total = 0.0
        overhead = timer_overhead(timer)
        for i in range(0, len(specs), CHUNK):
            scopes = self.prepare(specs[i : i + CHUNK])
            begin = timer()
            for scope in scopes:
                await app(scope, _receive, _send)
            total += timer() - begin - overhead
        return total


# --- measuring -------------------------------------------------------------------------------


def _iqr(values: Sequence[float]) -> float:
    if len(values) < 4:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


@dataclass
class Result:
    """One app at one heap size. Times are CPU microseconds per request."""

    app: str
    extra_objects: int
    heap_blocks: int  # sys.getallocatedblocks() at the end of the run
    requests_per_batch: int
    rounds: int  # rounds measured (one bare and one wrapped batch each)
    rounds_excluded: int  # rounds during which tracemalloc ran (a diagnosis window)
    bare_median_us: float
    bare_iqr_us: float
    wrapped_median_us: float
    wrapped_iqr_us: float
    added_us: float  # median of the per-round differences, wrapped - bare
    added_iqr_us: float
    ratio: float  # bare median / wrapped median
    paired_ratio: float  # median of the per-round ratios bare / wrapped
    memwatch_requests: int  # requests memwatch counted: a check that it recorded them all
    leak_suspected: bool  # memwatch's verdict on the benchmark process at the end
    diagnosis_windows: int
    bare_us: list[float]
    wrapped_us: list[float]
    # Whether memwatch's periodic work ran on its steady-state budget at the end of each round
    # (the detector has judged a full window and suspects nothing); the early phase before.
    steady: list[bool]
    # "separate": the rounds before memwatch's steady state (its start-up, once per process)
    # were run first and are these lists, not part of the figures above; "include": they are
    # among the measured rounds (``steady`` tells them apart) and these lists are empty.
    start_up: str = "separate"
    start_up_reached: bool = True  # steady state reached within --start-up-max rounds
    start_up_bare_us: list[float] = field(default_factory=list)
    start_up_wrapped_us: list[float] = field(default_factory=list)

    def start_up_summary(self) -> tuple[int, float, float, float] | None:
        """(rounds, median µs added per request, ratio of the medians, CPU added in all, ms)
        of the start-up rounds run apart, or None."""
        pairs = list(zip(self.start_up_bare_us, self.start_up_wrapped_us, strict=True))
        if not pairs:
            return None
        bare = [b for b, _ in pairs]
        wrapped = [w for _, w in pairs]
        added = statistics.median(w - b for b, w in pairs)
        total_ms = sum(w - b for b, w in pairs) * self.requests_per_batch / 1000.0
        return len(pairs), added, statistics.median(bare) / statistics.median(wrapped), total_ms

    def ratios_with_start_up(self) -> tuple[float, float]:
        """Both ratios over the start-up rounds and the measured ones together, as a run that
        began measuring at once would give them."""
        bare = self.start_up_bare_us + self.bare_us
        wrapped = self.start_up_wrapped_us + self.wrapped_us
        paired = statistics.median(b / w for b, w in zip(bare, wrapped, strict=True))
        return statistics.median(bare) / statistics.median(wrapped), paired


def build_apps(name: str, loop: asyncio.AbstractEventLoop) -> tuple[Driver, Driver, Any]:
    """Two independent instances of the app: one bare, one wrapped (Flask route hooks are
    installed on the wrapped one only). Returns (bare, wrapped, the wrapped middleware)."""
    if name == "flask":
        wrapped_mw = memwatch.wrap(make_flask_app().wsgi_app)
        assert isinstance(wrapped_mw, memwatch.WSGIMiddleware)
        return WSGIDriver(make_flask_app().wsgi_app), WSGIDriver(wrapped_mw), wrapped_mw
    if name == "starlette":
        wrapped_mw = memwatch.wrap(make_starlette_app())
        return (
            ASGIDriver(make_starlette_app(), loop),
            ASGIDriver(wrapped_mw, loop),
            wrapped_mw,
        )
    raise ValueError(f"unknown app {name!r}")


def _round(
    bare: Driver,
    wrapped: Driver,
    specs: Sequence[RequestSpec],
    order: Sequence[str],
    timer: Callable[[], float],
    memwatch_callbacks: Sequence[Any],
) -> tuple[float, float, bool]:
    """One bare and one wrapped batch of the same requests, in ``order``: (bare µs per
    request, wrapped µs per request, whether tracemalloc ran during the round)."""
    traced = tracemalloc.is_tracing()
    times = {}
    for variant in order:
        if variant == "bare":
            with _without_gc_callbacks(memwatch_callbacks):
                times[variant] = bare.measure(specs, timer)
        else:
            times[variant] = wrapped.measure(specs, timer)
        traced = traced or tracemalloc.is_tracing()
    per_request = 1e6 / len(specs)
    return times["bare"] * per_request, times["wrapped"] * per_request, traced


def measure(
    name: str,
    *,
    requests: int,
    batches: int,
    extra_objects: int,
    timer: Callable[[], float],
    loop: asyncio.AbstractEventLoop,
    progress: Callable[[str], None],
    start_up: str = "separate",
    start_up_max: int = START_UP_MAX,
) -> Result:
    """Interleaved rounds of one bare and one wrapped batch of the same requests, the order
    alternating from round to round.

    ``start_up="separate"``: rounds are run, timed the same way, until memwatch is in its steady
    state (its first verdict given), at most ``start_up_max`` of them; they are reported apart
    (:class:`Result`'s ``start_up_*`` fields) and the ``batches`` measured rounds follow.
    ``"include"``: the measured rounds begin at once, the start-up among them."""
    bare, wrapped, middleware = build_apps(name, loop)
    monitor = middleware.monitor
    # memwatch counts garbage collections with a gc callback: a process-wide cost that would
    # land on the bare app too. It is taken out during bare batches so that it counts as
    # memwatch's.
    memwatch_callbacks = [cb for cb in gc.callbacks if _is_memwatch(cb)]
    start = 0
    # Warm-up: first-request set-up (Starlette builds its middleware stack, Flask its URL map
    # adapter) and memwatch's first samples, which calibrate the cost of heap readings.
    for driver in (bare, wrapped):
        driver.measure(request_specs(requests, start), timer)
    start += requests
    start_bare: list[float] = []
    start_wrapped: list[float] = []

    def in_steady_state() -> bool:
        return bool(getattr(monitor, "_steady", False))

    reached = True
    if start_up == "separate":
        # memwatch's start-up (the warm-up it ignores, then the first verdict's dense samples,
        # once per process): timed like the measured rounds and reported apart from them.
        while len(start_bare) < start_up_max and not in_steady_state():
            order = ("bare", "wrapped") if len(start_bare) % 2 == 0 else ("wrapped", "bare")
            b, w, _traced = _round(
                bare, wrapped, request_specs(requests, start), order, timer, memwatch_callbacks
            )
            start += requests
            start_bare.append(b)
            start_wrapped.append(w)
        reached = in_steady_state()
        progress(
            f"  {name:9} heap+{extra_objects:>9,}: start-up {len(start_bare)} rounds"
            + ("" if reached else f" (steady state not reached within {start_up_max})")
        )
    bare_us: list[float] = []
    wrapped_us: list[float] = []
    steady: list[bool] = []
    excluded = 0
    for batch in range(batches):
        specs = request_specs(requests, start)
        start += requests
        order = ("bare", "wrapped") if batch % 2 == 0 else ("wrapped", "bare")
        b, w, traced = _round(bare, wrapped, specs, order, timer, memwatch_callbacks)
        if traced:
            # A diagnosis window (tracemalloc on, process-wide) slows both apps several times
            # over: its cost is the duty cycle's, not the always-on path's.
            excluded += 1
        else:
            bare_us.append(b)
            wrapped_us.append(w)
            steady.append(in_steady_state())
        if bare_us and ((batch + 1) % 10 == 0 or batch + 1 == batches):
            progress(
                f"  {name:9} heap+{extra_objects:>9,}: round {batch + 1:3}/{batches}  "
                f"bare {statistics.median(bare_us):7.2f} µs  "
                f"wrapped {statistics.median(wrapped_us):7.2f} µs"
                + (f"  ({excluded} rounds in diagnosis windows)" if excluded else "")
            )
    if not bare_us:
        raise RuntimeError("every round ran inside a diagnosis window: nothing to report")
    differences = [w - b for b, w in zip(bare_us, wrapped_us, strict=True)]
    ratios = [b / w for b, w in zip(bare_us, wrapped_us, strict=True)]
    snapshot = monitor.snapshot()
    verdict = getattr(snapshot, "verdict", None)
    return Result(
        app=name,
        extra_objects=extra_objects,
        heap_blocks=sys.getallocatedblocks(),
        requests_per_batch=requests,
        rounds=len(bare_us),
        rounds_excluded=excluded,
        bare_median_us=statistics.median(bare_us),
        bare_iqr_us=_iqr(bare_us),
        wrapped_median_us=statistics.median(wrapped_us),
        wrapped_iqr_us=_iqr(wrapped_us),
        added_us=statistics.median(differences),
        added_iqr_us=_iqr(differences),
        ratio=statistics.median(bare_us) / statistics.median(wrapped_us),
        paired_ratio=statistics.median(ratios),
        memwatch_requests=snapshot.requests,
        leak_suspected=bool(getattr(verdict, "suspected", False)),
        diagnosis_windows=int(getattr(snapshot, "diagnosis_windows", 0)),
        bare_us=bare_us,
        wrapped_us=wrapped_us,
        steady=steady,
        start_up=start_up,
        start_up_reached=reached,
        start_up_bare_us=start_bare,
        start_up_wrapped_us=start_wrapped,
    )


def by_phase(result: Result) -> list[tuple[str, int, float, float]]:
    """(phase, rounds, added µs, ratio bare/wrapped) for the early rounds and the steady ones:
    medians over that phase's rounds, as for the whole run."""
    rows = []
    for phase, wanted in (("early", False), ("steady", True)):
        pairs = [
            (b, w)
            for b, w, s in zip(result.bare_us, result.wrapped_us, result.steady, strict=True)
            if s is wanted
        ]
        if pairs:
            bare = [b for b, _ in pairs]
            wrapped = [w for _, w in pairs]
            added = statistics.median(w - b for b, w in pairs)
            rows.append(
                (phase, len(pairs), added, statistics.median(bare) / statistics.median(wrapped))
            )
    return rows


def _is_memwatch(callback: object) -> bool:
    return str(getattr(callback, "__module__", "")).startswith("memwatch")


@contextlib.contextmanager
def _without_gc_callbacks(callbacks: Sequence[Any]) -> Iterator[None]:
    for callback in callbacks:
        gc.callbacks.remove(callback)
    try:
        yield
    finally:
        gc.callbacks.extend(callbacks)


def hold_extra_objects(count: int) -> list[object]:
    """``count`` live objects, as a production process holds them: half short strings (plain
    pymalloc blocks), half 1-tuples (containers the garbage collector tracks)."""
    strings = [f"cached-value-{i:09d}" for i in range(count // 2)]
    return [*strings, *((s,) for s in strings[: count - len(strings)])]


# --- reporting -------------------------------------------------------------------------------

TARGETS = {"flask": 0.96, "starlette": 0.92}


def machine() -> dict[str, Any]:
    import os

    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


def table(results: Sequence[Result]) -> str:
    lines = [
        "| app | extra objects | bare µs (IQR) | wrapped µs (IQR) | added µs (IQR) | ratio bare/wrapped | paired ratio | target | met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        target = TARGETS.get(r.app, 0.0)
        lines.append(
            f"| {r.app} | {r.extra_objects:,} | {r.bare_median_us:.2f} ({r.bare_iqr_us:.2f}) "
            f"| {r.wrapped_median_us:.2f} ({r.wrapped_iqr_us:.2f}) "
            f"| {r.added_us:.2f} ({r.added_iqr_us:.2f}) | {r.ratio:.3f} | {r.paired_ratio:.3f} "
            f"| ≥ {target:.2f} | {'yes' if min(r.ratio, r.paired_ratio) >= target else 'NO'} |"
        )
    for r in results:
        notes = [f"{r.rounds} rounds of {r.requests_per_batch} requests"]
        if r.rounds_excluded:
            notes.append(f"{r.rounds_excluded} rounds left out (tracemalloc on: diagnosis window)")
        summary = r.start_up_summary()
        if summary is not None:
            n, added, ratio, total_ms = summary
            with_ratio, with_paired = r.ratios_with_start_up()
            notes.append(
                f"memwatch's start-up (before its first verdict, once per process) run apart "
                f"first: {n} rounds, {added:.2f} µs added per request (ratio {ratio:.3f}), "
                f"{total_ms:.0f} ms of CPU added in all"
                + ("" if r.start_up_reached else ", steady state NOT reached")
                + f"; counted with the measured rounds the ratios would be {with_ratio:.3f} / "
                f"{with_paired:.3f}"
            )
        phases = by_phase(r)
        if len(phases) > 1 or (phases and phases[0][0] == "early"):
            notes.append(
                "by memwatch's phase (early: the first verdict's samples, denser; steady: "
                "periodic work on steady_budget_us): "
                + ", ".join(
                    f"{phase} {n} rounds, {added:.2f} µs added, ratio {ratio:.3f}"
                    for phase, n, added, ratio in phases
                )
            )
        if r.leak_suspected or r.diagnosis_windows:
            notes.append(
                f"memwatch's verdict on this process: leak suspected {r.leak_suspected}, "
                f"{r.diagnosis_windows} diagnosis windows"
            )
        lines.append(f"\n{r.app}, {r.extra_objects:,} extra objects: " + "; ".join(notes) + ".")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=1000, help="requests per batch")
    parser.add_argument(
        "--batches",
        type=int,
        default=80,
        help="measured rounds (one bare and one wrapped batch each)",
    )
    parser.add_argument(
        "--extra-objects",
        default="0,2000000",
        help="comma-separated heap sizes to run at: extra live objects held (default 0,2000000)",
    )
    parser.add_argument(
        "--apps", default="flask,starlette", help="comma-separated: flask, starlette"
    )
    parser.add_argument("--timer", choices=sorted(TIMERS), default="thread")
    parser.add_argument(
        "--chunk",
        type=int,
        default=CHUNK,
        help=f"requests built and timed together (default {CHUNK}; 1: each built right before "
        "its call, as a server does)",
    )
    parser.add_argument(
        "--start-up",
        choices=("separate", "include"),
        default="separate",
        help="memwatch's start-up (the rounds before its first verdict, once per process): run "
        "first and reported apart (separate, the default) or among the measured rounds (include)",
    )
    parser.add_argument(
        "--start-up-max",
        type=int,
        default=START_UP_MAX,
        help=f"the most start-up rounds run apart (default {START_UP_MAX})",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    global CHUNK
    CHUNK = max(1, args.chunk)
    logging.getLogger("memwatch").setLevel(logging.WARNING)  # no start-up line per wrap
    apps = [a.strip() for a in args.apps.split(",") if a.strip()]
    sizes = [int(s.replace("_", "")) for s in args.extra_objects.split(",") if s.strip()]
    timer = TIMERS[args.timer]

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    info = machine()
    progress(
        f"memwatch {memwatch.__version__} in-process benchmark: Python {info['python']}, "
        f"{info['cpus']} CPUs ({info['cpu_model']}); {args.batches} batches x "
        f"{args.requests} requests per variant, timer {args.timer}_time, chunks of {CHUNK}"
    )
    loop = asyncio.new_event_loop()
    results: list[Result] = []
    held: list[object] = []
    began = time.perf_counter()
    try:
        for size in sizes:
            if size != len(held):
                progress(f"holding {size:,} extra live objects ...")
                held = []
                held = hold_extra_objects(size)
                gc.collect()
            for name in apps:
                results.append(
                    measure(
                        name,
                        requests=args.requests,
                        batches=args.batches,
                        extra_objects=size,
                        timer=timer,
                        loop=loop,
                        progress=progress,
                        start_up=args.start_up,
                        start_up_max=args.start_up_max,
                    )
                )
    finally:
        loop.close()
    progress(f"done in {time.perf_counter() - began:.0f} s")
    print(table(results))
    if args.json:
        document = {
            "benchmark": "inprocess",
            "command": " ".join([sys.executable, *sys.argv]),
            "machine": info,
            "settings": {
                "requests": args.requests,
                "rounds": args.batches,
                "timer": args.timer,
                "chunk": CHUNK,
                "requests_per_token": REQUESTS_PER_TOKEN,
                "start_up": args.start_up,
                "start_up_max": args.start_up_max,
            },
            "targets": TARGETS,
            "results": [asdict(r) for r in results],
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
