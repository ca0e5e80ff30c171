"""Where memwatch's added time goes, in place: the shipped middleware with one part taken out.

Each variant serves the in-process harness's endpoint and requests (``benchmarks/inprocess.py``)
in the same interleaved rounds (the order shuffled every round, seeded), so that what a part
costs is measured with the application's working set around it, not in a tight loop:

- ``bare``: the application alone;
- ``trivial``: a pass-through observer (status captured, one dict increment per request), the
  least any middleware costs;
- ``memwatch``: ``memwatch.wrap(app)``, default settings;
- ``python``: memwatch with ``speedups=False`` (the pure-Python path, without the compiled
  module ``memwatch._speedups``);
- ``no-record``: memwatch with a recorder that records nothing (no route template, no auth
  classification, no fingerprint, no count): the request skeleton and the periodic work remain;
- ``no-pairs``: ``request_sample_rate=0`` (no measured requests);
- ``sparse-samples``: ``sample_every_requests=1000`` and no pairs (periodic readings and detector
  evaluations twenty times rarer than the default);
- ``unbatched`` (Starlette, compiled module built): memwatch with its recorder's
  ``batch_limit`` at 0, each request recorded at its end instead of in batches of
  ``_speedups.BATCH_SIZE``.

The added time of a variant is the median over rounds of (variant - bare); differences between
variants are what the part costs. Each wrapped variant has its own monitor, but they share one
process and heap.

    .venv/bin/python benchmarks/ablation.py --app starlette --rounds 20
    .venv/bin/python benchmarks/ablation.py --app flask --rounds 20
    .venv/bin/python benchmarks/ablation.py --variants bare,memwatch,unbatched \
        --warm-up 40000 --rounds 400 --requests 250 --extra-objects 2000000

``--warm-up`` serves each wrapped variant that many requests first (steady state: the detector
has judged a full window); ``--extra-objects`` holds that many live objects, as
``inprocess.py`` does. Besides the medians, the table gives the 10th percentile of each
variant's rounds: the rounds least disturbed by the rest of a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inprocess as bench

import memwatch
from memwatch.recorder import compiled_available


class TrivialASGI:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.counts: dict[tuple[Any, ...], int] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        def send_status(message: Any) -> Any:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            key = (scope.get("path"), status)
            self.counts[key] = self.counts.get(key, 0) + 1


class TrivialWSGI:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.counts: dict[tuple[Any, ...], int] = {}

    def __call__(self, environ: Any, start_response: Any) -> Any:
        seen: list[str] = []

        def record_status(status: str, headers: Any, exc_info: Any = None) -> Any:
            seen.append(status)
            return start_response(status, headers, exc_info)

        return _Closing(self, self.app(environ, record_status), seen, environ)


class _Closing:
    __slots__ = ("environ", "iterable", "observer", "seen")

    def __init__(self, observer: TrivialWSGI, iterable: Any, seen: list[str], environ: Any):
        self.observer, self.iterable, self.seen, self.environ = observer, iterable, seen, environ

    def __iter__(self) -> Any:
        return iter(self.iterable)

    def close(self) -> None:
        close = getattr(self.iterable, "close", None)
        if close is not None:
            close()
        key = (self.environ.get("PATH_INFO"), self.seen[0] if self.seen else None)
        counts = self.observer.counts
        counts[key] = counts.get(key, 0) + 1


class NullRecorder:
    """A recorder that records nothing: what the request's end costs without the route
    template, the auth scheme, the fingerprint and the count (the skeleton remains)."""

    def record_scope(self, *args: Any) -> None:
        pass

    def record_environ(self, *args: Any) -> None:
        pass

    def take(self) -> tuple[dict[Any, int], list[int], int]:
        return {}, [], 0

    def flush(self) -> None:
        pass


def variants(app_name: str) -> dict[str, Any]:
    asgi = app_name == "starlette"
    make = bench.make_starlette_app if asgi else (lambda: bench.make_flask_app().wsgi_app)
    no_record = memwatch.wrap(make())
    no_record.monitor.recorder = NullRecorder()
    extra: dict[str, Any] = {}
    if asgi and compiled_available():
        extra["unbatched"] = unbatched = memwatch.wrap(make())
        unbatched.monitor.recorder.batch_limit = 0
    return {
        "bare": make(),
        "trivial": (TrivialASGI if asgi else TrivialWSGI)(make()),
        "memwatch": memwatch.wrap(make()),
        "python": memwatch.wrap(make(), speedups=False),
        "no-record": no_record,
        "no-pairs": memwatch.wrap(make(), request_sample_rate=0.0),
        "sparse-samples": memwatch.wrap(
            make(), request_sample_rate=0.0, sample_every_requests=1000
        ),
        **extra,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", choices=("flask", "starlette"), default="starlette")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--variants", default="", help="comma-separated names to run (default: all; bare always)"
    )
    parser.add_argument(
        "--warm-up", type=int, default=0, help="requests each wrapped variant serves first"
    )
    parser.add_argument("--extra-objects", type=int, default=0, help="extra live objects held")
    args = parser.parse_args()
    logging.getLogger("memwatch").setLevel(logging.ERROR)
    held = bench.hold_extra_objects(args.extra_objects) if args.extra_objects else []
    loop = asyncio.new_event_loop()
    apps = variants(args.app)
    if args.variants:
        wanted = {"bare", *args.variants.split(",")}
        unknown = wanted - set(apps)
        if unknown:
            parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
        apps = {name: app for name, app in apps.items() if name in wanted}
    drivers: dict[str, Any] = {
        name: bench.ASGIDriver(app, loop) if args.app == "starlette" else bench.WSGIDriver(app)
        for name, app in apps.items()
    }
    times: dict[str, list[float]] = {name: [] for name in drivers}
    rng = random.Random(args.seed)
    start = 0
    for name, driver in drivers.items():
        if name == "bare" or not args.warm_up:
            continue
        print(f"warming up {name}: {args.warm_up:,} requests", file=sys.stderr)
        for _ in range(0, args.warm_up, 1000):
            driver.measure(bench.request_specs(1000, start), time.thread_time)
            start += 1000
    for n in range(args.rounds):
        order = list(drivers)
        rng.shuffle(order)
        for name in order:
            specs = bench.request_specs(args.requests, start)
            start += args.requests
            cpu = drivers[name].measure(specs, time.thread_time)
            times[name].append(cpu / args.requests * 1e6)
        if (n + 1) % 10 == 0 or n + 1 == args.rounds:
            print(f"round {n + 1}/{args.rounds}", file=sys.stderr)
    bare = times["bare"]
    print(
        f"| {args.app} variant (heap + {len(held):,}) | µs per request (median) "
        "| added µs (median of rounds) | 10th percentile µs |"
    )
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        added = statistics.median(v - b for v, b in zip(values, bare, strict=True))
        low = sorted(values)[len(values) // 10]
        print(f"| {name} | {statistics.median(values):.2f} | {added:.2f} | {low:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
