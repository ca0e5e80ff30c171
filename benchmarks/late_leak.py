"""How many requests memwatch needs to flag a leak that starts late, after its first verdict.

A leak present from the start is judged on the early phase's dense samples. One that starts
once the detector has settled into its steady state (``steady_budget_us``: sparser samples and
evaluations) waits for those sparser samples, unless it is fast enough to trip the steady
state's sentinel. This harness measures that delay, in process: the in-process benchmark's
Starlette app (``benchmarks/inprocess.py``), wrapped at default settings, driven by its
requests; from request ``--start`` on, every request of the endpoint keeps about ``--bytes``
bytes (small ``str`` objects appended to a module-level list, the shape of most leaks of the
detection corpus). The verdict is read every 500 requests.

    .venv/bin/python benchmarks/late_leak.py                         # 260, 55 and 27 B/request
    .venv/bin/python benchmarks/late_leak.py --bytes 27 --start 30000 --max 120000

Prints one line per leak size: the requests from the leak's start to the first suspected
verdict (or "not flagged").
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inprocess as bench

import memwatch

POLL_EVERY = 500
# One kept object: a 64-character str (113 bytes with its header) and its list slot.
UNIT = "x" * 64
UNIT_BYTES = sys.getsizeof(UNIT) + 8


class LeakAfter:
    """An ASGI wrapper (inside memwatch) that keeps ``per_request`` bytes per request once
    ``start`` requests have passed."""

    def __init__(self, app: Any, start: int, per_request: float) -> None:
        self.app = app
        self.start = start
        self.per_request = per_request
        self.requests = 0
        self.debt = 0.0
        self.kept: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.requests += 1
        if self.requests > self.start:
            self.debt += self.per_request
            while self.debt >= UNIT_BYTES:
                self.debt -= UNIT_BYTES
                self.kept.append(UNIT[:-1] + chr(65 + len(self.kept) % 26))  # a new object
        await self.app(scope, receive, send)


def run(per_request: float, start: int, limit: int) -> int | None:
    """Requests from the leak's start to the first suspected verdict, or None."""
    loop = asyncio.new_event_loop()
    try:
        leaky = LeakAfter(bench.make_starlette_app(), start, per_request)
        middleware = memwatch.wrap(leaky)
        driver = bench.ASGIDriver(middleware, loop)
        done = 0
        while done < limit:
            driver.measure(bench.request_specs(POLL_EVERY, done), time.thread_time)
            done += POLL_EVERY
            if middleware.monitor.detector.verdict.suspected:
                return done - start if done > start else 0
        return None
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--bytes", type=float, action="append", help="bytes kept per request (repeatable)"
    )
    parser.add_argument("--start", type=int, default=30_000, help="request the leak starts at")
    parser.add_argument("--max", type=int, default=150_000, help="requests at most per run")
    args = parser.parse_args(argv)
    logging.getLogger("memwatch").setLevel(logging.ERROR)  # no alert lines in the output
    sizes = args.bytes or [260.0, 55.0, 27.0]
    print(f"leak starting at request {args.start:,}; verdict read every {POLL_EVERY} requests")
    for size in sizes:
        began = time.perf_counter()
        found = run(size, args.start, args.max)
        took = time.perf_counter() - began
        verdict = "not flagged" if found is None else f"flagged {found:,} requests after its start"
        print(f"{size:g} B/request: {verdict} ({took:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
