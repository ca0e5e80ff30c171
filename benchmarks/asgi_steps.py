"""Where memwatch's added time goes on the ASGI path, one piece at a time.

A pass-through ASGI middleware is grown one piece of memwatch at a time (route template, auth
classification, the monitor's request record, the credential sketches, the pair probes) and
every variant runs the benchmark's Starlette endpoint in interleaved rounds, so that each step's
cost is measured in place (with the app's working set around it), not in a tight loop.

    .venv/bin/python benchmarks/asgi_steps.py [--rounds 14]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inprocess as bench

import memwatch
from memwatch.routes import starlette_template


class Step:
    """memwatch's ASGI work up to ``level`` (0: a trivial observer ... 5: everything)."""

    def __init__(self, app: Any, level: int, monitor: Any) -> None:
        self.app = app
        self.level = level
        self.monitor = monitor
        self.lock = threading.Lock()
        self.counts: dict[tuple[Any, ...], int] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        status = 0
        entry = self.monitor.request_entry() if self.level >= 5 else None

        def send_status(message: Any) -> Any:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.finish(scope, status, entry)

    def finish(self, scope: Any, status: int, entry: Any) -> None:
        mon, level = self.monitor, self.level
        route = scope.get("path")
        if level >= 1:
            route = mon.routes.label(starlette_template(scope, "") or "/x")
        auth, credential = mon.auth.from_scope(scope) if level >= 2 else ("anonymous", None)
        if level >= 3:
            credential = credential if level >= 4 else None
            mon.request_exit(route, scope.get("method"), auth, credential, status, entry)
            return
        key = (route, scope.get("method"), auth, status)
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1


STEPS = (
    "trivial observer",
    "+ route template",
    "+ auth classification",
    "+ request record",
    "+ credential sketches",
    "+ pair probes",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=14)
    args = parser.parse_args()
    loop = asyncio.new_event_loop()
    lender = memwatch.wrap(bench.make_starlette_app(), log_startup=False)
    variants: dict[str, Any] = {"bare Starlette": bench.make_starlette_app()}
    for level, name in enumerate(STEPS):
        variants[name] = Step(bench.make_starlette_app(), level, lender.monitor)
    variants["memwatch.wrap (shipped)"] = memwatch.wrap(
        bench.make_starlette_app(), log_startup=False
    )
    drivers = {name: bench.ASGIDriver(app, loop) for name, app in variants.items()}
    results: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        specs = bench.request_specs(1000, r * 1000)
        for name, driver in drivers.items():
            results[name].append(driver.measure(specs, time.process_time) / 1000 * 1e6)
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    previous = None
    print("| step | µs per request (median) | added by the step |")
    print("|---|---:|---:|")
    for name, values in results.items():
        median = statistics.median(values[2:])
        added = "" if previous is None or "shipped" in name else f"{median - previous:.1f}"
        print(f"| {name} | {median:.1f} | {added} |")
        previous = median
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
