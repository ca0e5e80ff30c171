"""memwatch's own memory: at full cardinality, and over a million requests.

1. **Full cardinality.** Three fresh interpreters run the same requests through the same bare WSGI
   app (``common.cardinality_app``): every (route, auth, outcome) label set, 200 routes x 7
   auth schemes x 4 outcomes, a new credential each time, ``--passes`` times over, then one
   scrape of ``/metrics`` and a full collection.

   - ``bare``: the app alone (memwatch not even imported);
   - ``wrapped``: ``memwatch.wrap(app)``, every request measured (``request_sample_rate=1``,
     so that a delta histogram exists for every route and auth scheme: the worst case);
   - ``traced``: as ``wrapped``, under ``tracemalloc.start(25)`` from before memwatch is
     imported; the live allocations whose traceback passes through memwatch's code (or its
     imports: prometheus_client, psutil, objgraph) are memwatch's.

   Resident memory attributable to memwatch = RSS(wrapped) - RSS(bare).

2. **A million requests** (``--soak``) with distinct credentials (Bearer, API key, ``Token``
   header, session cookie by turns) and distinct paths (``/users/<n>``: one label;
   ``/<letters>/<n>``: new labels up to the route cap), in process, memwatch at its default
   settings; after every tenth, the process's RSS and Python heap blocks after a full collection.
   The tests' gunicorn soak (``make soak``, docs/security.md) does the same through a server.

Usage::

    .venv/bin/python benchmarks/own_memory.py                  # ~3 minutes
    .venv/bin/python benchmarks/own_memory.py --soak 200000 --json own_memory.json
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

MB = 1024 * 1024


def _environ(path: str, query: str, headers: dict[str, str]) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


def _start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
    return lambda data: None


def _call(app: Any, environ: dict[str, Any]) -> bytes:
    result = app(environ, _start_response)
    try:
        return b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()


def _rss() -> int:
    return common.rss_bytes(os.getpid())


def child_cardinality(mode: str, passes: int, max_routes: int) -> dict[str, Any]:
    """Runs in a fresh interpreter: fills every label set, returns the process's memory."""
    import random

    if mode == "traced":
        import tracemalloc

        tracemalloc.start(25)
    if mode == "bare":
        app: Any = common.cardinality_app  # memwatch is not even imported
    else:
        import logging

        import memwatch

        logging.getLogger("memwatch").setLevel(logging.WARNING)
        app = memwatch.wrap(
            common.cardinality_app,
            max_routes=max_routes,
            request_sample_rate=1.0,
            pair_budget_us=1000.0,
            warmup_requests=0,
            diagnosis="off",
        )
    everything = common.combos(max_routes)
    rng = random.Random(13)
    n = 0
    for _ in range(passes):
        rng.shuffle(everything)
        for path, scheme, status in everything:
            n += 1
            _call(app, _environ(path, f"s={status}", common.auth_headers(scheme, n)))
    if mode != "bare":
        app.monitor.evaluate()
        _call(app, _environ("/metrics", "", {}))
    gc.collect()
    out: dict[str, Any] = {
        "mode": mode,
        "requests": n,
        "rss_bytes": _rss(),
        "heap_blocks": sys.getallocatedblocks(),
    }
    if mode == "traced":
        import tracemalloc

        snapshot = tracemalloc.take_snapshot()
        tracemalloc.stop()
        here = str(Path(__file__).resolve().parent)
        package = str(common.REPO_ROOT / "memwatch")
        markers = (package, "prometheus_client", "psutil", "objgraph")
        own = by_module = 0
        top: dict[str, int] = {}
        for trace in snapshot.traces:
            files = [f.filename for f in trace.traceback]
            if any(f.startswith(package) for f in files):
                own += trace.size
                first = next(f for f in files if f.startswith(package))
                key = os.path.relpath(first, common.REPO_ROOT)
                top[key] = top.get(key, 0) + trace.size
            elif any(m in f for f in files for m in markers[1:]) and not any(
                f.startswith(here) and not f.endswith("scrape.py") for f in files[:1]
            ):
                by_module += trace.size
        out["traced_memwatch_bytes"] = own
        out["traced_memwatch_imports_bytes"] = by_module
        out["traced_by_file"] = dict(sorted(top.items(), key=lambda kv: -kv[1])[:10])
    return out


def child_soak(requests: int, checkpoint_every: int) -> dict[str, Any]:
    import logging

    import memwatch

    logging.getLogger("memwatch").setLevel(logging.WARNING)
    app = memwatch.wrap(common.cardinality_app)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def word(n: int) -> str:
        s = ""
        while True:
            s += letters[n % 26]
            n //= 26
            if n == 0:
                return s

    schemes = (
        lambda n: {"Authorization": f"Bearer soak-{n}-tok"},
        lambda n: {"X-API-Key": f"soak-key-{n}"},
        lambda n: {"Authorization": f"Token soak-{n}"},
        lambda n: {"Cookie": f"theme=dark; sessionid=soak-{n}"},
    )
    checkpoints = []
    began = time.monotonic()
    for n in range(1, requests + 1):
        path = f"/users/{n}" if n % 2 == 0 else f"/{word(n)}/{n}"
        _call(app, _environ(path, f"page={n}", schemes[n % 4](n)))
        if n % checkpoint_every == 0:
            gc.collect()
            snap = app.monitor.snapshot()
            checkpoints.append(
                {
                    "requests": n,
                    "seconds": round(time.monotonic() - began, 1),
                    "rss_bytes": _rss(),
                    "heap_blocks": sys.getallocatedblocks(),
                    "route_labels": len(app.monitor.routes),
                    "counter_keys": len(snap.counts),
                    "leak_suspected": bool(snap.verdict.suspected),
                    "internal_errors": snap.internal_errors,
                    "diagnosis_windows": snap.diagnosis_windows,
                }
            )
            print(json.dumps(checkpoints[-1]), file=sys.stderr, flush=True)
    return {"requests": requests, "checkpoints": checkpoints}


def run_child(args: list[str], timeout: float) -> dict[str, Any]:
    env = common.server_env()
    result = subprocess.run(
        [sys.executable, __file__, *args],
        env=env,
        cwd=common.REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
        timeout=timeout,
        check=True,
    )
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--max-routes", type=int, default=200)
    parser.add_argument("--passes", type=int, default=3, help="passes over every label set")
    parser.add_argument("--repeats", type=int, default=3, help="bare/wrapped process pairs")
    parser.add_argument("--soak", type=int, default=1_000_000, help="requests (0: skip)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.child == "soak":
            result = child_soak(args.soak, max(args.soak // 10, 1))
        else:
            result = child_cardinality(args.child, args.passes, args.max_routes)
        print(json.dumps(result))
        return 0

    info = common.machine()
    common.progress(
        f"own_memory: full cardinality ({args.max_routes} routes), then {args.soak:,} requests"
    )
    common_args = ["--passes", str(args.passes), "--max-routes", str(args.max_routes)]
    pairs = []
    for i in range(args.repeats):
        order = ("bare", "wrapped") if i % 2 == 0 else ("wrapped", "bare")
        pair = {mode: run_child(["--child", mode, *common_args], 900) for mode in order}
        pairs.append(pair)
        common.progress(
            f"  pair {i + 1}/{args.repeats}: RSS bare {pair['bare']['rss_bytes'] / MB:.1f} MB, "
            f"wrapped {pair['wrapped']['rss_bytes'] / MB:.1f} MB"
        )
    traced = run_child(["--child", "traced", *common_args], 1800)
    added = [(p["wrapped"]["rss_bytes"] - p["bare"]["rss_bytes"]) / MB for p in pairs]
    common.progress(
        f"  traced: memwatch's live allocations {traced['traced_memwatch_bytes'] / MB:.2f} MB"
    )
    soak = None
    if args.soak:
        common.progress(f"  soak: {args.soak:,} requests in process (checkpoint every tenth) ...")
        soak = run_child(["--child", "soak", "--soak", str(args.soak)], 3600)
    lines = [
        "| figure | value |",
        "|---|---:|",
        f"| RSS attributable to memwatch, wrapped - bare, MB: median (IQR) over {len(added)} pairs "
        f"| {common.fmt(added)} |",
        f"| memwatch's live allocations (tracemalloc, frames in memwatch/), MB "
        f"| {traced['traced_memwatch_bytes'] / MB:.2f} |",
        f"| heap blocks, wrapped - bare (median) "
        f"| {common.median([p['wrapped']['heap_blocks'] - p['bare']['heap_blocks'] for p in pairs]):,.0f} |",
        "",
        "Largest of memwatch's live allocations by first memwatch frame: "
        + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in traced["traced_by_file"].items()),
    ]
    if soak:
        lines += [
            "",
            "| requests | RSS MB | heap blocks | route labels | counter keys | leak suspected | internal errors |",
            "|---:|---:|---:|---:|---:|---|---:|",
        ]
        for c in soak["checkpoints"]:
            lines.append(
                f"| {c['requests']:,} | {c['rss_bytes'] / MB:.1f} | {c['heap_blocks']:,} "
                f"| {c['route_labels']} | {c['counter_keys']} | {c['leak_suspected']} "
                f"| {c['internal_errors']} |"
            )
        first, last = soak["checkpoints"][0], soak["checkpoints"][-1]
        lines.append(
            f"\nFrom {first['requests']:,} to {last['requests']:,} requests: RSS "
            f"{(last['rss_bytes'] - first['rss_bytes']) / MB:+.2f} MB, heap blocks "
            f"{last['heap_blocks'] - first['heap_blocks']:+,}."
        )
    print("\n".join(lines))
    common.write_json(
        args.json,
        {
            "benchmark": "own_memory",
            "machine": info,
            "settings": {k: v for k, v in vars(args).items() if k != "child"},
            "pairs": pairs,
            "traced": traced,
            "soak": soak,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
