"""Fault injection: memwatch's own failures never break the app.

Each fault is injected through a seam memwatch offers (the ``Signals`` sources, the monitor, the
holder-search budget, ``PROMETHEUS_MULTIPROC_DIR``), never by patching the app. In every case:

- the app keeps answering, with its own responses;
- the failure is counted in ``memwatch_internal_errors_total`` and logged once per place, not
  per request, without the exception's message;
- memwatch says what it does not know: the verdict is ``unknown`` when no memory signal can be
  read at all, a scrape still answers, and tracing the user started stays on.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client import CollectorRegistry

from memwatch import ASGIMiddleware, WSGIMiddleware, holders
from memwatch.config import Config
from memwatch.core import Memwatch
from memwatch.monitor import Monitor, Snapshot
from memwatch.signals import Signals
from tests.apps import bare_asgi, bare_wsgi
from tests.apps.support import (
    Reply,
    asgi_reply,
    make_environ,
    make_scope,
    metric_samples,
    run_asgi,
    run_wsgi,
)
from tests.fixtures import FIXTURES

REPO_ROOT = Path(__file__).resolve().parents[1]
CANARY = "fault-canary-Zq81xW"  # in every injected exception's message: it must never be logged
REQUESTS = 300


# --- helpers ------------------------------------------------------------------------------------


def wsgi_app(signals: Signals | None = None, monitor: Monitor | None = None, **options: Any) -> WSGIMiddleware:
    """The bare WSGI app behind memwatch, sampling every 10 requests (so that faults in the
    readings show within a few hundred requests)."""
    options.setdefault("log_startup", False)
    options.setdefault("sample_every_requests", 10)
    options.setdefault("sample_budget_us", 10_000.0)  # a heap walk never stretches sampling
    config = Config(**options)
    instance = Memwatch(config, registry=CollectorRegistry(), signals=signals, monitor=monitor)
    return WSGIMiddleware(bare_wsgi.app, memwatch=instance)


def get(app: Any, path: str) -> Reply:
    return run_wsgi(app, make_environ(path))


def serve(app: Any, n: int = REQUESTS) -> None:
    """n requests to app paths, every one answered by the app itself."""
    for i in range(n):
        reply = get(app, f"/users/{i}")
        assert (reply.status, reply.body) == (200, b"ok")


def error_logs(caplog: pytest.LogCaptureFixture) -> Counter[str]:
    """memwatch's internal-error log lines, counted by the place they name."""
    return Counter(
        str(r.args[0])  # type: ignore[index]
        for r in caplog.records
        if r.name == "memwatch" and str(r.msg).startswith("memwatch internal error")
    )


def internal_errors_metric(app: Any) -> float:
    """memwatch_internal_errors_total as scraped; checked against the monitor's own count (a
    scrape reads the signals too, so failing readings may add to it while it runs)."""
    before = app.monitor.errors.total
    reply = get(app, "/metrics")
    assert reply.status == 200
    ((_, value),) = metric_samples(reply.body.decode(), "memwatch_internal_errors_total")
    assert before <= value <= app.monitor.errors.total
    return value


def assert_logged_once(caplog: pytest.LogCaptureFixture, *places: str) -> None:
    logged = error_logs(caplog)
    for place in places:
        assert logged[place] == 1, logged
    assert all(n == 1 for n in logged.values()), logged
    assert CANARY not in caplog.text


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="memwatch")
    return caplog


class DeniedProcess:
    """A psutil process whose memory can not be read (a hardened /proc, a container sandbox)."""

    def __init__(self) -> None:
        self.calls = 0

    def memory_info(self) -> Any:
        self.calls += 1
        raise psutil.AccessDenied(pid=os.getpid(), name=CANARY)


def failing_heap() -> int:
    raise RuntimeError(f"heap walk failed for {CANARY}")


# --- unreadable /proc and failing signal readers -------------------------------------------------

UNREADABLE_STATM = [
    pytest.param(lambda tmp: str(tmp), id="statm path is a directory"),
    pytest.param(lambda tmp: str(FIXTURES / "statm_garbage"), id="statm holds garbage"),
    pytest.param(lambda tmp: str(FIXTURES / "statm_empty"), id="statm is empty"),
]


@pytest.mark.parametrize("statm", UNREADABLE_STATM)
def test_unreadable_proc_and_failing_psutil(
    statm: Callable[[Path], str], tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    # GIVEN /proc/self/statm that exists but cannot be used, and psutil denied access
    process = DeniedProcess()
    app = wsgi_app(Signals(statm_path=statm(tmp_path), process=process))
    # WHEN the app serves requests
    serve(app)
    # THEN every request was answered by the app and counted by memwatch
    snapshot = app.monitor.snapshot()
    assert snapshot.requests == REQUESTS
    # AND each failed RSS reading is counted, and logged once
    # (a sample is taken at the entry of the request it is due at: the last one after 290)
    assert process.calls >= REQUESTS // 10 - 1
    assert app.monitor.errors.by_where["signals.rss"] == process.calls
    assert internal_errors_metric(app) >= REQUESTS // 10 - 1
    assert_logged_once(logs, "signals.rss")
    # AND the exposition leaves the RSS gauge out rather than report a made-up value, while
    # the heap still reads: the verdict is not "unknown"
    text = get(app, "/metrics").body.decode()
    assert metric_samples(text, "memwatch_process_resident_memory_bytes") == []
    assert metric_samples(text, "memwatch_python_heap_blocks")
    assert json.loads(get(app, "/memwatch/report.json").body)["leak"]["status"] == "warming_up"


def test_failing_heap_reader(logs: pytest.LogCaptureFixture) -> None:
    # GIVEN a heap reading that always raises (and RSS that still reads)
    app = wsgi_app(
        Signals(heap_blocks=failing_heap),
        request_sample_rate=1.0,  # per-request probes read the heap too
        pair_budget_us=1000.0,
    )
    # WHEN the app serves requests
    serve(app)
    # THEN every request is answered and counted; periodic samples keep their RSS
    assert app.monitor.snapshot().requests == REQUESTS
    history = app.monitor.snapshot().history
    assert history and all(s.heap_blocks is None and s.rss_bytes for s in history)
    # AND the failures are counted (periodic and per-request readings) and logged once each
    errors = app.monitor.errors.by_where
    assert errors["signals.heap"] == len(history)
    assert errors["wsgi.entry"] >= 1  # a probe's heap reading, at a request's entry
    assert internal_errors_metric(app) >= len(history) + 1
    assert_logged_once(logs, "signals.heap", "wsgi.entry")
    report = json.loads(get(app, "/memwatch/report.json").body)
    assert report["leak"]["status"] != "unknown"  # RSS is still a memory signal
    assert report["process"]["heap_blocks"] is None


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="before the warm-up ends"),
        pytest.param(
            {"warmup_requests": 0, "window_samples": 48, "envelope_width": 3},
            id="after many evaluations",
        ),
    ],
)
def test_no_memory_signal_at_all_says_unknown(
    options: dict[str, Any], tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    # GIVEN no RSS source (statm unreadable, psutil denied) and no heap reading either
    app = wsgi_app(
        Signals(statm_path=str(tmp_path), process=DeniedProcess(), heap_blocks=failing_heap),
        **options,
    )
    # WHEN the app serves requests
    serve(app, 600)
    # THEN the verdict says unknown rather than guess (and never suspects a leak)
    report = json.loads(get(app, "/memwatch/report.json").body)
    assert report["leak"]["status"] == "unknown"
    assert report["leak"]["suspected"] is False
    assert app.memwatch.verdict().status == "unknown"
    page = get(app, "/memwatch/").body.decode()
    assert "<strong>Unknown</strong>" in page and "cannot read any memory signal" in page
    # AND the app answered everything, the failures are counted and logged once per place
    assert report["process"]["requests"] == 600
    assert internal_errors_metric(app) >= 2 * 600 // 10
    assert_logged_once(logs, "signals.rss", "signals.heap")


def test_a_signal_that_comes_back_ends_unknown() -> None:
    # GIVEN the heap reading fails for a while, with no RSS source either
    broken = [True]

    def heap() -> int:
        if broken[0]:
            raise RuntimeError(CANARY)
        return 50_000

    app = wsgi_app(Signals(statm_path=None, process=DeniedProcess(), heap_blocks=heap))
    serve(app, 50)
    assert app.memwatch.verdict().status == "unknown"
    # WHEN it reads again
    broken[0] = False
    serve(app, 50)
    # THEN memwatch is back to warming up toward a verdict
    assert app.memwatch.verdict().status == "warming_up"


# --- an exception inside the collector ----------------------------------------------------------


class SnapshotFails(Monitor):
    """A monitor whose snapshot raises: every exporter and report fails inside memwatch."""

    def snapshot(self) -> Snapshot:
        raise RuntimeError(f"snapshot failed near {CANARY}")


def broken_instance(**options: Any) -> Memwatch:
    config = Config(log_startup=False, **options)
    return Memwatch(config, registry=CollectorRegistry(), monitor=SnapshotFails(config))


def test_collector_failure_through_wsgi(logs: pytest.LogCaptureFixture) -> None:
    # GIVEN a wrapped app whose monitor cannot build a snapshot
    app = WSGIMiddleware(bare_wsgi.app, memwatch=broken_instance())
    serve(app, 20)
    # WHEN Prometheus scrapes, three times
    scrapes = [get(app, "/metrics") for _ in range(3)]
    # THEN each scrape answers 200 with a degraded exposition: memwatch's own error count
    for n, reply in enumerate(scrapes, start=1):
        assert reply.status == 200
        assert metric_samples(reply.body.decode(), "memwatch_internal_errors_total") == [({}, n)]
        assert metric_samples(reply.body.decode(), "memwatch_requests_total") == []
    # AND the report endpoints answer 500 themselves: the request never reaches the app
    for path in ("/memwatch/report.json", "/memwatch/"):
        reply = get(app, path)
        assert (reply.status, reply.body) == (500, b"Internal Server Error")
    # AND the app keeps answering its own paths, and every request is still counted
    serve(app, 20)
    app.monitor.drain()  # requests wait in the fast path's queue until a drain
    assert app.monitor.requests == 40
    assert app.monitor.errors.by_where == {"exporter.collect": 3, "wsgi.endpoint": 2}
    assert_logged_once(logs, "exporter.collect", "wsgi.endpoint")


def test_collector_failure_through_asgi(logs: pytest.LogCaptureFixture) -> None:
    app = ASGIMiddleware(bare_asgi.app, memwatch=broken_instance())

    def aget(path: str) -> Reply:
        return asgi_reply(run_asgi(app, make_scope(path)))

    for i in range(20):
        assert aget(f"/users/{i}").body == b"ok"
    for n in (1, 2):
        reply = aget("/metrics")
        assert reply.status == 200
        assert metric_samples(reply.body.decode(), "memwatch_internal_errors_total") == [({}, n)]
    reply = aget("/memwatch/report.json")
    assert (reply.status, reply.body) == (500, b"Internal Server Error")
    assert aget("/users/x").body == b"ok"
    app.monitor.drain()  # requests wait in the fast path's queue until a drain
    assert app.monitor.requests == 21
    assert app.monitor.errors.by_where == {"exporter.collect": 2, "asgi.endpoint": 1}
    assert_logged_once(logs, "exporter.collect", "asgi.endpoint")


def test_collector_failure_on_the_users_registry(logs: pytest.LogCaptureFixture) -> None:
    # GIVEN memwatch registered on the application's own registry, next to its metrics
    from prometheus_client import Counter as PromCounter
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    orders = PromCounter("shop_orders", "Orders.", registry=registry)
    orders.inc(3)
    config = Config(log_startup=False)
    Memwatch(config, registry=registry, monitor=SnapshotFails(config))
    # WHEN the application's exposition is generated
    text = generate_latest(registry).decode()
    # THEN the application's metrics are intact and memwatch's failure is counted
    assert metric_samples(text, "shop_orders_total") == [({}, 3.0)]
    assert metric_samples(text, "memwatch_internal_errors_total") == [({}, 1.0)]
    assert_logged_once(logs, "exporter.collect")


# --- diagnosis windows: the user's tracemalloc, a holder search out of time ---------------------


def drive_window(app: Any, timeout: float = 90.0) -> int:
    """Requests until the running diagnosis window has finished (bounded); returns how many."""
    sent = 0
    deadline = time.monotonic() + timeout
    monitor = app.monitor
    while monitor.diagnosis.window is not None and time.monotonic() < deadline:
        assert get(app, f"/items/{sent}").body == b"ok"
        sent += 1
        time.sleep(0.005)
    assert monitor.diagnosis.window is None, "the diagnosis window did not finish in time"
    return sent


@pytest.fixture
def user_tracing() -> Iterator[None]:
    """tracemalloc started by the application itself, with its own traceback depth."""
    assert not tracemalloc.is_tracing()
    tracemalloc.start(7)
    try:
        yield
    finally:
        tracemalloc.stop()


@pytest.mark.slow  # a window's census and snapshots take seconds
@pytest.mark.usefixtures("user_tracing")
def test_a_window_uses_the_users_tracing_and_never_stops_it(logs: pytest.LogCaptureFixture) -> None:
    kept = [bytearray(100) for _ in range(10)]  # traced by the user before memwatch's window
    app = wsgi_app(diagnosis_requests=4)
    assert app.monitor.start_diagnosis("test", force=True)
    sent = drive_window(app)
    # THEN the window ran on the user's tracing, which is still on, unchanged
    assert app.monitor.diagnosis.windows == 1
    assert tracemalloc.is_tracing()
    assert tracemalloc.get_traceback_limit() == 7
    assert app.monitor.diagnosis.last is not None and app.monitor.diagnosis.last.frames == 7
    assert all(tracemalloc.get_object_traceback(b) is not None for b in kept)
    # AND the app answered every request, with nothing failing inside memwatch
    app.monitor.drain()  # requests wait in the fast path's queue until a drain
    assert app.monitor.requests == sent
    assert app.monitor.errors.total == 0
    assert error_logs(logs) == Counter()


@pytest.mark.slow
@pytest.mark.usefixtures("user_tracing")
def test_a_failing_window_leaves_the_users_tracing_on(
    monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture
) -> None:
    # GIVEN a holder census that fails at the end of the window
    calls = [0]
    real = holders.take_census

    def census(*args: Any, **kwargs: Any) -> holders.Census:
        calls[0] += 1
        if calls[0] > 1:
            raise RuntimeError(f"census failed near {CANARY}")
        return real(*args, **kwargs)

    monkeypatch.setattr(holders, "take_census", census)  # diagnosis imports it per window
    app = wsgi_app(diagnosis_requests=4)
    assert app.monitor.start_diagnosis("test", force=True)
    # WHEN traffic drives the window to its end
    drive_window(app)
    # THEN the window is dropped, the failure counted and logged once, and tracing stays on
    assert app.monitor.diagnosis.windows == 0
    assert tracemalloc.is_tracing() and tracemalloc.get_traceback_limit() == 7
    assert app.monitor.errors.by_where == {"diagnosis.finish": 1}
    assert internal_errors_metric(app) == 1
    assert_logged_once(logs, "diagnosis.finish")
    serve(app, 10)


@pytest.mark.slow
def test_a_holder_search_out_of_time_says_partial_and_the_window_finishes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN a holder search (census and back-reference chains) with no time at all (the
    # diagnosis window looks them up in memwatch.holders when it runs)
    monkeypatch.setattr(
        holders, "take_census", functools.partial(holders.take_census, budget_seconds=0.0)
    )
    monkeypatch.setattr(
        holders, "backref_holders", functools.partial(holders.backref_holders, budget_seconds=0.0)
    )
    was_tracing = tracemalloc.is_tracing()
    app = wsgi_app(diagnosis_requests=4)
    assert app.monitor.start_diagnosis("test", force=True)
    # WHEN traffic drives the window
    drive_window(app)
    # THEN the window finished, says its holder search is partial, and left tracing as it was
    result = app.monitor.diagnosis.last
    assert app.monitor.diagnosis.windows == 1 and result is not None
    assert result.holder_search_partial is True
    assert tracemalloc.is_tracing() == was_tracing
    report = json.loads(get(app, "/memwatch/report.json").body)
    assert report["diagnosis"]["holder_search_partial"] is True
    assert "holder search cut short by its time budget" in get(app, "/memwatch/").body.decode()
    assert app.monitor.errors.total == 0


def test_holder_searches_stop_at_their_budget() -> None:
    start = time.thread_time()
    census = holders.take_census(budget_seconds=0.0)
    assert census.partial
    assert time.thread_time() - start < 0.5
    tracemalloc.start(4)
    try:
        objects = [{"n": i, "kind": "held"} for i in range(1000)]
        site = tracemalloc.get_object_traceback(objects[-1])  # past the dict free list
        assert site is not None
        found, partial = holders.backref_holders([(site[-1].filename, site[-1].lineno)], 0.0)
    finally:
        tracemalloc.stop()
    assert partial and found == []


# --- an unwritable multiprocess directory --------------------------------------------------------

# Run in a fresh interpreter: prometheus_client picks its value class (in-process or mmap files)
# when it is first imported, from PROMETHEUS_MULTIPROC_DIR.
MULTIPROCESS_PROBE = """
import json, logging, sys
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("memwatch").addHandler(Keep())
logging.getLogger("memwatch").setLevel(logging.DEBUG)
import memwatch
from tests.apps import bare_wsgi
from tests.apps.support import make_environ, metric_samples, run_wsgi
app = memwatch.wrap(bare_wsgi.app, log_startup=False, sample_every_requests=10)
statuses = [run_wsgi(app, make_environ(f"/users/{i}")).status for i in range(300)]
metrics = [run_wsgi(app, make_environ("/metrics")) for _ in range(3)]
report = run_wsgi(app, make_environ("/memwatch/report.json"))
text = metrics[-1].body.decode()
print(json.dumps({
    "statuses": sorted(set(statuses)),
    "metrics": [m.status for m in metrics],
    "report": report.status,
    "requests": sum(v for _, v in metric_samples(text, "memwatch_requests_total")),
    "errors": sum(v for _, v in metric_samples(text, "memwatch_internal_errors_total")),
    "by_where": app.monitor.errors.by_where,
    "logged": [r for r in records if "internal error" in r],
}))
"""


def _can_create_in(directory: str) -> bool:
    probe = os.path.join(directory, f"memwatch-probe-{os.getpid()}.db")
    try:
        with open(probe, "a+b"):
            pass
    except OSError:
        return False
    os.unlink(probe)
    return True


def _read_only_directory(tmp: Path) -> str:
    directory = tmp / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    # Root ignores permission bits; sysfs refuses to create files, even to root.
    for candidate in (str(directory), "/sys/kernel"):
        if os.path.isdir(candidate) and not _can_create_in(candidate):
            return candidate
    pytest.skip("no directory here refuses to create files (root, and no sysfs)")


@pytest.mark.parametrize(
    "make_dir",
    [
        pytest.param(_read_only_directory, id="read-only directory"),
        pytest.param(lambda tmp: str(tmp / "missing"), id="missing directory"),
        pytest.param(lambda tmp: str(FIXTURES / "statm"), id="a file, not a directory"),
    ],
)
def test_unwritable_multiprocess_directory(make_dir: Callable[[Path], str], tmp_path: Path) -> None:
    # GIVEN PROMETHEUS_MULTIPROC_DIR pointing where no file can be created
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=make_dir(tmp_path), PYTHONPATH=str(REPO_ROOT))
    env = {k: v for k, v in env.items() if not k.startswith("MEMWATCH_")}
    # WHEN a wrapped app serves 300 requests and three scrapes (in a fresh interpreter)
    done = subprocess.run(
        [sys.executable, "-c", MULTIPROCESS_PROBE],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # THEN every request was answered by the app, and every scrape and report by memwatch
    assert result["statuses"] == [200]
    assert result["metrics"] == [200, 200, 200] and result["report"] == 200
    # AND the scrape falls back to this worker's own figures: exact counts, the failure counted
    assert result["requests"] == 300
    assert result["errors"] >= 1
    # AND the failure is logged once, not per request or per sample
    assert len(result["logged"]) == 1, result["logged"]
    assert sum(result["by_where"].values()) == result["errors"]
