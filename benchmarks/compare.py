"""memwatch side by side with what a user would otherwise pick, in one run, in process.

The in-process harness's apps, requests and drivers (``benchmarks/inprocess.py``), with more
variants interleaved in every round (same requests, the order rotating from round to round):

- Flask (WSGI): bare; ``memwatch.wrap``; Dozer (WSGI memory-leak middleware, ``Dozer(app)``);
  bare under always-on ``tracemalloc.start(1)``.
- Starlette (ASGI): bare; ``memwatch.wrap``; starlette-exporter (``PrometheusMiddleware``, its
  defaults); prometheus-fastapi-instrumentator (``Instrumentator().instrument(app)``, its
  defaults); bare under ``tracemalloc.start(1)``.

What is timed is the thread that runs the requests (``time.thread_time``), per request. Dozer
also runs a thread of its own that, every 5 seconds, runs a full collection and counts every
object in the heap by type; that CPU is not on the request thread, so it is measured apart
(the thread's CPU per tick, and per second) and reported next to the per-request figures.
tracemalloc is started right before each of its batches and stopped after, outside the timer
(the objects alive before the batch are not traced; the requests' own allocations are).

The report: per variant, the median CPU µs per request and its IQR over rounds, the added time
(median of the per-round differences with the bare app) and how many times memwatch's added
time each alternative's is.

Usage::

    .venv/bin/python benchmarks/compare.py                       # ~3 minutes
    .venv/bin/python benchmarks/compare.py --rounds 20 --extra-objects 0 --json compare.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import statistics
import sys
import threading
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import inprocess as bench

import memwatch

TOOL_DISTRIBUTIONS = (
    "memwatch",
    "flask",
    "starlette",
    "Dozer",
    "starlette-exporter",
    "prometheus-fastapi-instrumentator",
    "prometheus-client",
)


@dataclass
class Variant:
    name: str
    driver: Any
    around: Callable[[], contextlib.AbstractContextManager[None]]
    times_us: list[float] = field(default_factory=list)


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextlib.contextmanager
def _traced() -> Iterator[None]:
    tracemalloc.start(1)
    try:
        yield
    finally:
        tracemalloc.stop()


class DozerTicks:
    """Times Dozer's background tick (a full collection and a count of every object) in the
    tick thread's own CPU time."""

    def __init__(self, dozer: Any) -> None:
        self.cpu_seconds: list[float] = []
        self.started = time.monotonic()
        original = dozer.tick

        def timed_tick() -> None:
            begin = time.thread_time()
            original()
            self.cpu_seconds.append(time.thread_time() - begin)

        dozer.tick = timed_tick


def build_variants(app: str, loop: asyncio.AbstractEventLoop) -> tuple[list[Variant], Any, Any]:
    """The variants for one app; returns (variants, memwatch's middleware, Dozer's ticks)."""
    memwatch_callbacks: list[Any] = []

    @contextlib.contextmanager
    def without_memwatch_gc() -> Iterator[None]:
        # memwatch counts collections with a gc callback (process-wide): out of the other
        # variants' batches, so that it counts as memwatch's.
        for callback in memwatch_callbacks:
            gc.callbacks.remove(callback)
        try:
            yield
        finally:
            gc.callbacks.extend(memwatch_callbacks)

    @contextlib.contextmanager
    def traced_without_memwatch_gc() -> Iterator[None]:
        with without_memwatch_gc(), _traced():
            yield

    ticks = None
    if app == "flask":
        mw = memwatch.wrap(bench.make_flask_app().wsgi_app)
        memwatch_callbacks.extend(cb for cb in gc.callbacks if bench._is_memwatch(cb))
        from dozer import Dozer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "PIL is not installed, cannot show charts"
            dozer = Dozer(bench.make_flask_app().wsgi_app)
        ticks = DozerTicks(dozer)
        drivers = {
            "bare": bench.WSGIDriver(bench.make_flask_app().wsgi_app),
            "memwatch": bench.WSGIDriver(mw),
            "Dozer": bench.WSGIDriver(dozer),
            "tracemalloc.start(1)": bench.WSGIDriver(bench.make_flask_app().wsgi_app),
        }
        for driver in drivers.values():
            # Dozer refuses multi-process servers; the same environ for every variant.
            driver.base["wsgi.multiprocess"] = False
    elif app == "starlette":
        mw = memwatch.wrap(bench.make_starlette_app())
        memwatch_callbacks.extend(cb for cb in gc.callbacks if bench._is_memwatch(cb))
        from prometheus_client import CollectorRegistry
        from prometheus_fastapi_instrumentator import Instrumentator
        from starlette_exporter import PrometheusMiddleware

        exporter_app = bench.make_starlette_app()
        exporter_app.add_middleware(PrometheusMiddleware)
        instrumented_app = bench.make_starlette_app()
        # A registry of its own, so that a second heap size can build another one.
        Instrumentator(registry=CollectorRegistry()).instrument(instrumented_app)
        drivers = {
            "bare": bench.ASGIDriver(bench.make_starlette_app(), loop),
            "memwatch": bench.ASGIDriver(mw, loop),
            "starlette-exporter": bench.ASGIDriver(exporter_app, loop),
            "prometheus-fastapi-instrumentator": bench.ASGIDriver(instrumented_app, loop),
            "tracemalloc.start(1)": bench.ASGIDriver(bench.make_starlette_app(), loop),
        }
    else:
        raise ValueError(f"unknown app {app!r}")
    variants = [
        Variant(
            name,
            driver,
            _nothing
            if name == "memwatch"
            else traced_without_memwatch_gc
            if name.startswith("tracemalloc")
            else without_memwatch_gc,
        )
        for name, driver in drivers.items()
    ]
    return variants, mw, ticks


@dataclass
class AppResult:
    app: str
    extra_objects: int
    requests_per_batch: int
    rounds: int
    rounds_excluded: int
    variants: dict[str, dict[str, Any]]
    dozer_background: dict[str, Any] | None
    memwatch_requests: int


def measure(
    app: str,
    *,
    requests: int,
    rounds: int,
    extra_objects: int,
    timer: Callable[[], float],
    loop: asyncio.AbstractEventLoop,
) -> AppResult:
    variants, mw, ticks = build_variants(app, loop)
    start = 0
    for variant in variants:  # warm-up: first-request set-up, memwatch's calibration
        with variant.around():
            variant.driver.measure(bench.request_specs(requests, start), timer)
    start += requests
    excluded = 0
    kept: list[dict[str, float]] = []
    for index in range(rounds):
        specs = bench.request_specs(requests, start)
        start += requests
        shift = index % len(variants)
        order = variants[shift:] + variants[:shift]
        times: dict[str, float] = {}
        memwatch_traced = False
        for variant in order:
            with variant.around():
                times[variant.name] = variant.driver.measure(specs, timer) / requests * 1e6
            if variant.name == "memwatch":
                memwatch_traced = tracemalloc.is_tracing()
        if memwatch_traced or mw.monitor.diagnosis.window is not None:
            excluded += 1  # memwatch opened a diagnosis window: the duty cycle's cost
            continue
        kept.append(times)
        for variant in variants:
            variant.times_us.append(times[variant.name])
        if (index + 1) % 10 == 0 or index + 1 == rounds:
            common.progress(
                f"  {app:9} heap+{extra_objects:>9,}: round {index + 1:3}/{rounds}  "
                + "  ".join(f"{v.name} {statistics.median(v.times_us):.1f}" for v in variants)
                + " µs"
            )
    if not kept:
        raise RuntimeError("every round ran inside a memwatch diagnosis window")
    bare = [t["bare"] for t in kept]
    memwatch_added = [t["memwatch"] - t["bare"] for t in kept]
    results: dict[str, dict[str, Any]] = {}
    for variant in variants:
        added = [t[variant.name] - t["bare"] for t in kept]
        ratios = [t["bare"] / t[variant.name] for t in kept]
        results[variant.name] = {
            "us": common.summary(variant.times_us),
            "added_us": common.summary(added),
            "ratio": statistics.median(bare) / statistics.median(variant.times_us),
            "paired_ratio": statistics.median(ratios),
            "times_us": variant.times_us,
        }
    m = statistics.median(memwatch_added)
    for variant in variants:
        added = results[variant.name]["added_us"]["median"]
        results[variant.name]["times_memwatch_added"] = added / m if m > 0 else None
    background = None
    if ticks is not None:
        elapsed = time.monotonic() - ticks.started
        background = {
            "ticks": len(ticks.cpu_seconds),
            "tick_cpu_ms": common.summary([s * 1e3 for s in ticks.cpu_seconds]),
            "cpu_ms_per_second": sum(ticks.cpu_seconds) / elapsed * 1e3 if elapsed else 0.0,
        }
    return AppResult(
        app=app,
        extra_objects=extra_objects,
        requests_per_batch=requests,
        rounds=len(kept),
        rounds_excluded=excluded,
        variants=results,
        dozer_background=background,
        memwatch_requests=mw.monitor.snapshot().requests,
    )


def table(results: Sequence[AppResult]) -> str:
    lines = [
        "| app | heap | variant | µs/request (IQR) | added µs (IQR) | ratio bare/variant | × memwatch's added |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        for name, v in r.variants.items():
            times = v["times_memwatch_added"]
            added = (
                ""
                if name == "bare"
                else f"{v['added_us']['median']:.2f} ({v['added_us']['iqr']:.2f})"
            )
            factor = "" if name in ("bare", "memwatch") or times is None else f"{times:.2f}×"
            lines.append(
                f"| {r.app} | +{r.extra_objects:,} | {name} | {v['us']['median']:.2f} ({v['us']['iqr']:.2f}) "
                f"| {added} | {v['ratio']:.3f} / {v['paired_ratio']:.3f} | {factor} |"
            )
    for r in results:
        notes = [f"{r.rounds} rounds of {r.requests_per_batch} requests"]
        if r.rounds_excluded:
            notes.append(f"{r.rounds_excluded} rounds left out (memwatch diagnosis window)")
        if r.dozer_background is not None:
            b = r.dozer_background
            notes.append(
                f"Dozer's background thread: {b['ticks']} ticks, "
                f"{b['tick_cpu_ms']['median']:.1f} ms CPU per tick (median), "
                f"{b['cpu_ms_per_second']:.1f} ms CPU per second"
            )
        lines.append(f"\n{r.app}, +{r.extra_objects:,} objects: " + "; ".join(notes) + ".")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=1000, help="requests per batch")
    parser.add_argument("--rounds", type=int, default=30, help="rounds (every variant once each)")
    parser.add_argument("--extra-objects", default="0,2000000", help="comma-separated heap sizes")
    parser.add_argument("--apps", default="flask,starlette")
    parser.add_argument("--timer", choices=sorted(bench.TIMERS), default="thread")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    logging.getLogger("memwatch").setLevel(logging.WARNING)
    timer = bench.TIMERS[args.timer]
    info = common.machine()
    common.progress(
        f"compare: memwatch {memwatch.__version__} against the alternatives; Python {info['python']}, "
        f"{info['cpus']} CPUs; {args.rounds} rounds x {args.requests} requests per variant"
    )
    loop = asyncio.new_event_loop()
    results: list[AppResult] = []
    held: list[object] = []
    began = time.perf_counter()
    try:
        for size in common.parse_sizes(args.extra_objects):
            if size != len(held):
                common.progress(f"holding {size:,} extra live objects ...")
                held = []
                held = bench.hold_extra_objects(size)
                gc.collect()
            for app in [a.strip() for a in args.apps.split(",") if a.strip()]:
                results.append(
                    measure(
                        app,
                        requests=args.requests,
                        rounds=args.rounds,
                        extra_objects=size,
                        timer=timer,
                        loop=loop,
                    )
                )
    finally:
        loop.close()
    common.progress(
        f"done in {time.perf_counter() - began:.0f} s ({threading.active_count()} threads)"
    )
    print(table(results))
    common.write_json(
        args.json,
        {
            "benchmark": "compare",
            "machine": info,
            "versions": common.versions(*TOOL_DISTRIBUTIONS),
            "settings": vars(args),
            "results": [r.__dict__ for r in results],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
