"""Instructions per request, bare and wrapped, counted under valgrind: a noise-free complement to
the CPU times of ``inprocess.py`` on machines too noisy to show a change of a few hundred ns.

Each figure is ``(I(warm-up + N requests) - I(warm-up only)) / N`` where ``I`` is the number of
instructions valgrind's cachegrind counts for a whole interpreter run, with ``PYTHONHASHSEED=0``
so that two runs execute the same code. Instructions are not time (cache misses and branch
mispredictions are not in them) but they move with every change of the Python code on the path.

Usage (needs the ``valgrind`` Debian package; about 3 minutes)::

    .venv/bin/python benchmarks/instructions.py
    .venv/bin/python benchmarks/instructions.py --apps starlette --requests 1000
    .venv/bin/python benchmarks/instructions.py --apps starlette --requests 4000 \
        --per-request-only --cache-sim --reference   # the per-request path, L1 misses
    PYTHONPATH=/path/to/other/tree .venv/bin/python benchmarks/instructions.py  # another memwatch
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

WARM_UP = 500
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")
_I1 = re.compile(r"I1\s+misses:\s+([\d,]+)")
_D1 = re.compile(r"D1\s+misses:\s+([\d,]+)")


def child(app: str, variant: str, requests: int, per_request_only: bool) -> None:
    """Runs ``WARM_UP`` requests, then ``requests`` more through the app; valgrind counts.

    ``variant``: ``bare``, ``wrapped`` (``memwatch.wrap``) or, for Starlette, ``reference``
    (``ASGIMiddleware`` with its Python coroutine ``__call__`` instead of the compiled one).
    ``per_request_only``: after the warm-up, memwatch's periodic work (drains, samples,
    evaluations, measured requests) is switched off, so that the count is the per-request path
    alone.
    """
    import logging

    import inprocess as ip

    import memwatch
    from memwatch.asgi import ASGIMiddleware

    logging.getLogger("memwatch").setLevel(logging.WARNING)
    loop = asyncio.new_event_loop()
    driver: ip.Driver
    middleware: object = None
    if app == "flask":
        wsgi = ip.make_flask_app().wsgi_app
        if variant != "bare":
            wsgi = middleware = memwatch.wrap(wsgi)
            assert isinstance(wsgi, memwatch.WSGIMiddleware)
        driver = ip.WSGIDriver(wsgi)
    else:
        asgi = ip.make_starlette_app()
        if variant == "reference":

            class Reference(ASGIMiddleware):
                __call__ = getattr(ASGIMiddleware.__call__, "__wrapped__", ASGIMiddleware.__call__)

            asgi = middleware = Reference(asgi)
        elif variant == "wrapped":
            asgi = middleware = memwatch.wrap(asgi)
        driver = ip.ASGIDriver(asgi, loop)
    driver.measure(ip.request_specs(WARM_UP, 0), time.perf_counter)
    monitor = getattr(middleware, "monitor", None)
    if per_request_only and monitor is not None:
        monitor.drain()
        monitor._gate.next_event = 10**15  # no request is ever due for periodic work
    if requests:
        driver.measure(ip.request_specs(requests, WARM_UP), time.perf_counter)


def count(
    app: str, variant: str, requests: int, per_request_only: bool, cache_sim: bool
) -> tuple[int, int, int]:
    """(instructions, I1 misses, D1 misses) of a whole child run (misses 0 without cache_sim)."""
    command = [
        "valgrind",
        "--tool=cachegrind",
        f"--cache-sim={'yes' if cache_sim else 'no'}",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        app,
        variant,
        str(requests),
        "1" if per_request_only else "0",
    ]
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    figures = []
    for pattern in (_REFS, _I1, _D1):
        found = pattern.search(done.stderr)
        if found is None and (pattern is _REFS or cache_sim):
            raise RuntimeError(f"no count in valgrind's output:\n{done.stderr[-2000:]}")
        figures.append(int(found.group(1).replace(",", "")) if found else 0)
    return figures[0], figures[1], figures[2]


def per_request(
    app: str, variant: str, requests: int, per_request_only: bool, cache_sim: bool
) -> tuple[float, float, float]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        full = pool.submit(count, app, variant, requests, per_request_only, cache_sim)
        base = pool.submit(count, app, variant, 0, per_request_only, cache_sim)
        a, b = full.result(), base.result()
        return (
            (a[0] - b[0]) / requests,
            (a[1] - b[1]) / requests,
            (a[2] - b[2]) / requests,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--apps", default="flask,starlette")
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per run")
    parser.add_argument(
        "--per-request-only",
        action="store_true",
        help="switch memwatch's periodic work off after the warm-up: the per-request path alone",
    )
    parser.add_argument(
        "--cache-sim", action="store_true", help="also count L1 instruction and data misses"
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="Starlette: also the middleware with its Python coroutine __call__",
    )
    parser.add_argument(
        "--child", nargs=4, metavar=("APP", "VARIANT", "N", "P"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        app, variant, n, only = args.child
        child(app, variant, int(n), only == "1")
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian package valgrind)", file=sys.stderr)
        return 2
    header = "| app | variant | instructions/request | added | ratio bare/variant |"
    rule = "|---|---|---:|---:|---:|"
    if args.cache_sim:
        header += " I1 misses/request (added) | D1 misses/request (added) |"
        rule += "---:|---:|"
    print(header)
    print(rule)
    for app in [a.strip() for a in args.apps.split(",") if a.strip()]:
        variants = ["bare", "wrapped"]
        if args.reference and app == "starlette":
            variants.append("reference")
        bare: tuple[float, float, float] | None = None
        for variant in variants:
            print(f"counting {app} {variant} ...", file=sys.stderr, flush=True)
            got = per_request(app, variant, args.requests, args.per_request_only, args.cache_sim)
            if bare is None:
                bare = got
            line = (
                f"| {app} | {variant} | {got[0]:,.0f} | {got[0] - bare[0]:,.0f} "
                f"| {bare[0] / got[0]:.3f} |"
            )
            if args.cache_sim:
                line += (
                    f" {got[1]:,.1f} ({got[1] - bare[1]:+,.1f}) "
                    f"| {got[2]:,.1f} ({got[2] - bare[2]:+,.1f}) |"
                )
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
