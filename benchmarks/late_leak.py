"""How many requests memwatch needs to flag a leak that starts late, after its first verdict.

A leak present from the start is judged on the early phase's dense samples. One that starts
once the detector has settled into its steady state (``steady_budget_us``: sparser samples and
evaluations) waits for those sparser samples, unless it is fast enough to trip the steady
state's sentinel. This harness measures that delay, in process: the in-process benchmark's
Starlette app (``benchmarks/inprocess.py``), wrapped at default settings, driven by its
requests; from request ``--start`` on, every request of the endpoint keeps about ``--bytes``
bytes (64-byte ``str`` objects appended to a module-level list: one heap block each, so the
bytes are those memwatch's heap signal counts, at ``heap_block_bytes`` = 64). The verdict is read every 500 requests.

    .venv/bin/python benchmarks/late_leak.py                         # 260, 55 and 27 B/request
    .venv/bin/python benchmarks/late_leak.py --bytes 27 --start 30000 --max 120000

Prints one line per leak size: the requests from the leak's start to the first suspected
verdict (or "not flagged").
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inprocess as bench

import memwatch

POLL_EVERY = 500
# One kept object: a 15-character str, 64 bytes with its header, one Python heap block of the
# size memwatch assumes (heap_block_bytes): the leak's bytes per request are the heap signal's.
# (Its slot in the list's item array, 8 bytes, is in a large malloc'ed array, not a block.)
UNIT = "x" * 15
UNIT_BYTES = sys.getsizeof(UNIT)


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
    parser.add_argument(
        "--extra-objects", type=int, default=0, help="live objects held in the heap (default 0)"
    )
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.getLogger("memwatch").setLevel(logging.ERROR)  # no alert lines in the output
    sizes = args.bytes or [260.0, 55.0, 27.0]
    if args.one:  # the child: one leak size, the result on stdout
        held = bench.hold_extra_objects(args.extra_objects)  # noqa: F841 - kept alive
        gc.collect()
        print(json.dumps(run(sizes[0], args.start, args.max)))
        return 0
    print(
        f"leak starting at request {args.start:,}; verdict read every {POLL_EVERY} requests; "
        f"{args.extra_objects:,} extra live objects"
    )
    for size in sizes:
        # One process per run: a flagged leak opens a diagnosis window, and tracemalloc, which
        # it starts, is process-wide.
        began = time.perf_counter()
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                "--bytes",
                str(size),
                "--start",
                str(args.start),
                "--max",
                str(args.max),
                "--extra-objects",
                str(args.extra_objects),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        found = json.loads(child.stdout.strip().splitlines()[-1])
        took = time.perf_counter() - began
        verdict = "not flagged" if found is None else f"flagged {found:,} requests after its start"
        print(f"{size:g} B/request: {verdict} ({took:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
