"""Instructions per request, bare and wrapped, counted under valgrind: a noise-free complement to
the CPU times of ``inprocess.py`` on machines too noisy to show a change of a few hundred ns.

Each figure is ``(I(warm-up + N requests) - I(warm-up only)) / N`` where ``I`` is the number of
instructions valgrind's cachegrind counts for a whole interpreter run, with ``PYTHONHASHSEED=0``
so that two runs execute the same code. Instructions are not time (cache misses and branch
mispredictions are not in them) but they move with every change of the Python code on the path.

Usage (needs the ``valgrind`` Debian package; about 3 minutes)::

    .venv/bin/python benchmarks/instructions.py
    .venv/bin/python benchmarks/instructions.py --apps starlette --requests 1000
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


def child(app: str, variant: str, requests: int) -> None:
    """Runs ``WARM_UP + requests`` requests through the app; valgrind counts."""
    import logging

    import inprocess as ip

    import memwatch

    logging.getLogger("memwatch").setLevel(logging.WARNING)
    loop = asyncio.new_event_loop()
    driver: ip.Driver
    if app == "flask":
        wsgi = ip.make_flask_app().wsgi_app
        if variant == "wrapped":
            wsgi = memwatch.wrap(wsgi)
            assert isinstance(wsgi, memwatch.WSGIMiddleware)
        driver = ip.WSGIDriver(wsgi)
    else:
        asgi = ip.make_starlette_app()
        driver = ip.ASGIDriver(memwatch.wrap(asgi) if variant == "wrapped" else asgi, loop)
    driver.measure(ip.request_specs(WARM_UP + requests, 0), time.perf_counter)


def count(app: str, variant: str, requests: int) -> int:
    command = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        app,
        variant,
        str(requests),
    ]
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    found = _REFS.search(done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_request(app: str, variant: str, requests: int) -> float:
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        full = pool.submit(count, app, variant, requests)
        base = pool.submit(count, app, variant, 0)
        return (full.result() - base.result()) / requests


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--apps", default="flask,starlette")
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per run")
    parser.add_argument("--child", nargs=3, metavar=("APP", "VARIANT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        app, variant, n = args.child
        child(app, variant, int(n))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian package valgrind)", file=sys.stderr)
        return 2
    print("| app | bare instructions/request | wrapped | added | ratio bare/wrapped |")
    print("|---|---:|---:|---:|---:|")
    for app in [a.strip() for a in args.apps.split(",") if a.strip()]:
        print(f"counting {app} ...", file=sys.stderr, flush=True)
        bare = per_request(app, "bare", args.requests)
        wrapped = per_request(app, "wrapped", args.requests)
        print(
            f"| {app} | {bare:,.0f} | {wrapped:,.0f} | {wrapped - bare:,.0f} "
            f"| {bare / wrapped:.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
