"""A clean bare WSGI app for the soak test (tests/integration/test_soak.py).

Every path answers ``ok`` and keeps nothing, except ``GET /debug/memory``, which reports the
worker's memory after a full collection: Python heap blocks, resident set size, glibc's bytes in
use (``mallinfo2``, where there is one) and the sizes of memwatch's own structures. The app
itself holds nothing per request, so whatever grows is the server's or memwatch's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import sys
import typing as t
from collections.abc import Iterable
from typing import Any

import memwatch

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

WRAPPED: Any = None  # the middleware made by wrapped(), for /debug/memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo2() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    function = getattr(ctypes.CDLL(name), "mallinfo2", None)
    if function is None:
        return None
    function.restype = _MallInfo2
    return function


_MALLINFO2 = _mallinfo2()


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def memory() -> dict[str, Any]:
    gc.collect()
    info = _MALLINFO2() if _MALLINFO2 is not None else None
    report: dict[str, Any] = {
        "pid": os.getpid(),
        "heap_blocks": sys.getallocatedblocks(),
        "rss_bytes": _rss_bytes(),
        "malloc_in_use_bytes": info.uordblks if info is not None else None,
        "malloc_free_bytes": info.fordblks if info is not None else None,
    }
    if WRAPPED is not None:
        monitor = WRAPPED.monitor
        snapshot = monitor.snapshot()
        report["memwatch"] = {
            "requests": snapshot.requests,
            "route_labels": len(monitor.routes),
            "counter_keys": len(snapshot.counts),
            "history_samples": len(monitor.history),
            "delta_histograms": len(snapshot.deltas),
            "attribution_keys": sum(len(a.by_key) for a in monitor.attribution.values()),
            "internal_errors": snapshot.internal_errors,
            "status": snapshot.verdict.status,
            "alerts": snapshot.verdict.alerts,
        }
    return report


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO") or "/"
    status, body = "200 OK", b"ok"
    if path == "/debug/memory":
        body = json.dumps(memory()).encode()
    elif path.startswith("/memwatch/"):
        # memwatch answers these itself; the bare twin answers them as memwatch would.
        status, body = "404 Not Found", b"Not Found"
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def wrapped() -> memwatch.WSGIMiddleware | memwatch.ASGIMiddleware:
    global WRAPPED
    WRAPPED = memwatch.wrap(app)
    return WRAPPED


def bare() -> Any:
    """The same app without memwatch: the twin whose memory is the baseline."""
    return app
