"""The diagnosis window's cost: CPU per request inside a window, and the duty cycle.

Real apps: the in-process harness's Flask and Starlette JSON endpoints and its requests.

1. **Inside a window.** Rounds of: a bare batch, a wrapped batch (no window), then
   ``memwatch.diagnose()`` (a window opens: tracemalloc on, every request through a trampoline)
   and a wrapped batch inside it; then requests go on until the window has finished (snapshots,
   census and analysis run on memwatch's diagnosis thread). Reported: CPU per request of each
   (thread time of the requests), and the CPU of the whole window on every thread (process time
   minus the requests' own), i.e. what the snapshots and the analysis cost.
2. **Duty cycle.** Requests run without pause for ``--duty-seconds`` against an app wrapped with
   ``diagnosis="always"`` (windows back to back, as far as ``diagnosis_duty_cycle`` allows: 5 % by
   default, and 2 % as configured cap), and with ``memwatch.diagnose()`` called again as soon as
   a window ends: refused during the pause after a window, like automatic windows (the first
   on-demand window always opens), and with ``force=True``, which bypasses the pause (not
   capped). The duty cycle is the fraction of wall time
   during which tracemalloc traced; a run shorter than about 20 window lengths over-states it
   (it starts with a window), so the pause memwatch imposes after each window is read too
   (window / (window + pause), the steady-state duty cycle).

Usage::

    .venv/bin/python benchmarks/diagnosis_cost.py                 # ~8 minutes
    .venv/bin/python benchmarks/diagnosis_cost.py --apps starlette --duty-seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import inprocess as bench

import memwatch

WINDOW_DEADLINE = 120.0  # seconds a window may take to finish before the harness gives up


def _wrap(app_name: str, loop: asyncio.AbstractEventLoop, **options: Any) -> tuple[Any, Any]:
    if app_name == "flask":
        mw = memwatch.wrap(bench.make_flask_app().wsgi_app, **options)
        return bench.WSGIDriver(mw), mw
    mw = memwatch.wrap(bench.make_starlette_app(), **options)
    return bench.ASGIDriver(mw, loop), mw


def _bare(app_name: str, loop: asyncio.AbstractEventLoop) -> Any:
    if app_name == "flask":
        return bench.WSGIDriver(bench.make_flask_app().wsgi_app)
    return bench.ASGIDriver(bench.make_starlette_app(), loop)


def inside_window(
    app_name: str, args: argparse.Namespace, loop: asyncio.AbstractEventLoop
) -> dict[str, Any]:
    timer = time.thread_time
    bare = _bare(app_name, loop)
    wrapped, mw = _wrap(app_name, loop)
    start = 0

    def specs(n: int) -> list[bench.RequestSpec]:
        nonlocal start
        start += n
        return bench.request_specs(n, start - n)

    for driver in (bare, wrapped):
        driver.measure(specs(args.requests), timer)  # warm-up
    rows: dict[str, list[float]] = {"bare": [], "wrapped": [], "in_window": []}
    window_cpu_ms: list[float] = []
    window_seconds: list[float] = []
    for index in range(args.rounds):
        batch = specs(args.requests)
        rows["bare"].append(bare.measure(batch, timer) / args.requests * 1e6)
        rows["wrapped"].append(wrapped.measure(batch, timer) / args.requests * 1e6)
        process0, thread0, wall0 = time.process_time(), 0.0, time.monotonic()
        # force: back-to-back windows on purpose (the pause after each would refuse them)
        if not mw.memwatch.diagnose("benchmark", force=True):
            raise RuntimeError("memwatch.diagnose() did not open a window")
        assert tracemalloc.is_tracing()
        # Within the window's first half (diagnosis_requests / 2 requests by default).
        inside = wrapped.measure(specs(args.requests), timer)
        rows["in_window"].append(inside / args.requests * 1e6)
        thread0 += inside
        deadline = time.monotonic() + WINDOW_DEADLINE
        while mw.monitor.diagnosis.window is not None and time.monotonic() < deadline:
            thread0 += wrapped.measure(specs(32), timer)  # requests drive the window on
        if mw.monitor.diagnosis.window is not None:
            raise RuntimeError("the diagnosis window did not finish in time")
        window_seconds.append(time.monotonic() - wall0)
        window_cpu_ms.append((time.process_time() - process0 - thread0) * 1e3)
        common.progress(
            f"  {app_name:9} round {index + 1}/{args.rounds}: bare {rows['bare'][-1]:.1f} µs, "
            f"wrapped {rows['wrapped'][-1]:.1f} µs, in a window {rows['in_window'][-1]:.1f} µs; "
            f"window {window_seconds[-1]:.2f} s, {window_cpu_ms[-1]:.0f} ms CPU besides requests"
        )
    return {
        "app": app_name,
        "bare_us": common.summary(rows["bare"]),
        "wrapped_us": common.summary(rows["wrapped"]),
        "in_window_us": common.summary(rows["in_window"]),
        "in_window_over_bare": common.median(rows["in_window"]) / common.median(rows["bare"]),
        "window_seconds": common.summary(window_seconds),
        "window_other_cpu_ms": common.summary(window_cpu_ms),
        "rows": rows,
    }


def duty_cycle(
    app_name: str,
    label: str,
    seconds: float,
    loop: asyncio.AbstractEventLoop,
    on_demand: bool = False,
    force: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Requests without pause for ``seconds``; the share of wall time spent tracing."""
    wrapped, mw = _wrap(app_name, loop, **options)
    timer: Callable[[], float] = time.thread_time
    traced = untraced = 0.0
    traced_requests = untraced_requests = 0
    cpu_traced = cpu_untraced = 0.0
    start = 0
    enforced: list[float] = []  # window length / (length + the pause memwatch then imposed)
    diagnosis = mw.monitor.diagnosis
    open_before = False
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        is_open = diagnosis.window is not None
        if open_before and not is_open and diagnosis.last is not None:
            length = diagnosis.last.duration_seconds
            pause = max(diagnosis._not_before - time.monotonic(), 0.0)
            enforced.append(length / (length + pause) if length + pause > 0 else 0.0)
        open_before = is_open
        if on_demand and mw.monitor.diagnosis.window is None:
            mw.memwatch.diagnose("benchmark, again", force=force)
        tracing = tracemalloc.is_tracing()
        w0 = time.monotonic()
        cpu = wrapped.measure(bench.request_specs(64, start), timer)
        start += 64
        wall = time.monotonic() - w0
        if tracing or tracemalloc.is_tracing():
            traced += wall
            traced_requests += 64
            cpu_traced += cpu
        else:
            untraced += wall
            untraced_requests += 64
            cpu_untraced += cpu
    # A window still open at the end: let it finish (bounded) so that it does not leak into the
    # next measurement.
    deadline = time.monotonic() + WINDOW_DEADLINE
    while mw.monitor.diagnosis.window is not None and time.monotonic() < deadline:
        wrapped.measure(bench.request_specs(32, start), timer)
        start += 32
    if tracemalloc.is_tracing() and mw.monitor.diagnosis.window is None:
        tracemalloc.stop()
    total = traced + untraced
    result = {
        "enforced_duty_cycle": enforced,
        "app": app_name,
        "variant": label,
        "seconds": total,
        "windows": diagnosis.windows,
        "duty_cycle": traced / total if total else 0.0,
        "duty_cycle_memwatch": diagnosis.busy_seconds / total if total else 0.0,
        "requests": traced_requests + untraced_requests,
        "cpu_us_traced": cpu_traced / traced_requests * 1e6 if traced_requests else None,
        "cpu_us_untraced": cpu_untraced / untraced_requests * 1e6 if untraced_requests else None,
        "cpu_us_average": (cpu_traced + cpu_untraced)
        / max(traced_requests + untraced_requests, 1)
        * 1e6,
    }
    common.progress(
        f"  {app_name:9} {label:28} duty cycle {result['duty_cycle']:.1%} "
        f"({result['windows']} windows in {total:.0f} s); CPU/request {result['cpu_us_average']:.1f} µs "
        f"(traced {result['cpu_us_traced'] or 0:.1f}, untraced {result['cpu_us_untraced'] or 0:.1f})"
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--apps", default="flask,starlette")
    parser.add_argument("--rounds", type=int, default=5, help="windows measured per app")
    parser.add_argument(
        "--requests", type=int, default=400, help="requests per batch (< diagnosis_requests / 2)"
    )
    parser.add_argument(
        "--duty-seconds", type=float, default=60.0, help="seconds per duty-cycle run"
    )
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    logging.getLogger("memwatch").setLevel(logging.WARNING)
    info = common.machine()
    apps = [a.strip() for a in args.apps.split(",") if a.strip()]
    common.progress(
        f"diagnosis_cost: {apps}, {args.rounds} windows each, duty cycles over {args.duty_seconds:.0f} s"
    )
    loop = asyncio.new_event_loop()
    windows, duties = [], []
    try:
        for app_name in apps:
            windows.append(inside_window(app_name, args, loop))
        for app_name in apps:
            duties.append(
                duty_cycle(
                    app_name,
                    "always, default cap (5 %)",
                    args.duty_seconds,
                    loop,
                    diagnosis="always",
                )
            )
            duties.append(
                duty_cycle(
                    app_name,
                    "always, cap 2 %",
                    args.duty_seconds,
                    loop,
                    diagnosis="always",
                    diagnosis_duty_cycle=0.02,
                )
            )
            duties.append(
                duty_cycle(
                    app_name,
                    "diagnose() again and again",
                    args.duty_seconds / 2,
                    loop,
                    on_demand=True,
                )
            )
            duties.append(
                duty_cycle(
                    app_name,
                    "diagnose(force=True) again and again",
                    args.duty_seconds / 2,
                    loop,
                    on_demand=True,
                    force=True,
                )
            )
    finally:
        loop.close()
    lines = [
        "| app | bare µs (IQR) | wrapped µs (IQR) | in a window µs (IQR) | in a window / bare | window length s | window CPU besides requests, ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for w in windows:
        lines.append(
            f"| {w['app']} | {w['bare_us']['median']:.1f} ({w['bare_us']['iqr']:.1f}) "
            f"| {w['wrapped_us']['median']:.1f} ({w['wrapped_us']['iqr']:.1f}) "
            f"| {w['in_window_us']['median']:.1f} ({w['in_window_us']['iqr']:.1f}) "
            f"| {w['in_window_over_bare']:.2f}× | {w['window_seconds']['median']:.2f} "
            f"| {w['window_other_cpu_ms']['median']:.0f} ({w['window_other_cpu_ms']['iqr']:.0f}) |"
        )
    lines += [
        "",
        "| app | windows | seconds | measured duty cycle | enforced (window / (window + pause)) | CPU µs/request: average (traced / untraced) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for d in duties:
        lines.append(
            f"| {d['app']} | {d['variant']} ({d['windows']} windows) | {d['seconds']:.0f} "
            f"| {d['duty_cycle']:.1%} | {', '.join(f'{e:.1%}' for e in d['enforced_duty_cycle']) or '–'} "
            f"| {d['cpu_us_average']:.1f} "
            f"({d['cpu_us_traced'] or 0:.1f} / {d['cpu_us_untraced'] or 0:.1f}) |"
        )
    print("\n".join(lines))
    common.write_json(
        args.json,
        {
            "benchmark": "diagnosis_cost",
            "machine": info,
            "settings": vars(args),
            "windows": windows,
            "duty": duties,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
