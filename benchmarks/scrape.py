"""Scrape cost: ``GET /metrics`` with every label set memwatch allows present.

Full cardinality is the route cap (``max_routes``, default 200) × the 7 auth schemes × the 4
outcomes of ``memwatch_requests_total`` (5,600 series), plus, for every (route, auth) pair, the
per-request delta histogram (10 buckets, ``_sum``, ``_count``), and the per-route gauges. To get
the histograms and route estimates filled for every pair, the servers run with every request
measured (``request_sample_rate=1.0``, ``pair_budget_us=1000``, ``warmup_requests=0``): the
worst case a long-running process reaches.

Three set-ups:

- ``inprocess``: one process, the app wrapped with ``memwatch.wrap`` and called through a
  minimal WSGI driver; the scrape is timed in wall and thread-CPU time around the middleware's
  answer (collection and text encoding; no socket). ``--profile`` adds a cProfile of scrapes.
- ``single``: gunicorn, one sync worker, no multiprocess mode; scrapes over HTTP.
- ``mpN``: gunicorn with N sync workers and ``PROMETHEUS_MULTIPROC_DIR`` (memwatch's multiprocess
  mode, ``memwatch.gunicorn.child_exit`` installed); every scrape aggregates all workers' files.

Servers are filled by ``wrk`` cycling through every (route, auth, outcome) combination with a new
credential each time; then scrapes go one after another over HTTP, each timed as the client sees
it (wall), and the server's CPU per scrape is read from /proc (all its processes) around them.

Usage::

    .venv/bin/python benchmarks/scrape.py                     # ~3 minutes
    .venv/bin/python benchmarks/scrape.py --setups inprocess --profile
    .venv/bin/python benchmarks/scrape.py --setups mp2,mp4 --scrapes 50 --json scrape.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import random
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

import memwatch

WORST_CASE = {
    "request_sample_rate": 1.0,
    "pair_budget_us": 1000.0,
    "warmup_requests": 0,
    # The fill itself grows the heap (every new label set is new memory): no diagnosis window
    # (tracemalloc on) while scrapes are timed.
    "diagnosis": "off",
}


# --- in process ------------------------------------------------------------------------------


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


def _call(app: Any, environ: dict[str, Any]) -> tuple[str, bytes]:
    status: list[str] = []

    def start_response(s: str, headers: Any, exc_info: Any = None) -> Any:
        status.append(s)
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return status[0], body


def fill_inprocess(app: Any, max_routes: int, passes: int) -> int:
    everything = common.combos(max_routes)
    rng = random.Random(13)
    n = 0
    for _ in range(passes):
        rng.shuffle(everything)
        for path, scheme, status in everything:
            n += 1
            _call(app, _environ(path, f"s={status}", common.auth_headers(scheme, n)))
    return n


def exposition_stats(body: bytes) -> dict[str, Any]:
    lines = [line for line in body.decode().splitlines() if line and not line.startswith("#")]
    families: dict[str, int] = {}
    for line in lines:
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        for suffix in ("_bucket", "_sum", "_count", "_total", "_created"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        families[name] = families.get(name, 0) + 1
    return {"bytes": len(body), "samples": len(lines), "samples_by_family": families}


def measure_inprocess(args: argparse.Namespace) -> dict[str, Any]:
    app = memwatch.wrap(common.cardinality_app, max_routes=args.max_routes, **WORST_CASE)
    began = time.perf_counter()
    sent = fill_inprocess(app, args.max_routes, args.passes)
    app.monitor.evaluate()  # route estimates for every key, as the next evaluation would make
    common.progress(
        f"  inprocess: filled with {sent:,} requests in {time.perf_counter() - began:.1f} s"
    )
    scrape = _environ("/metrics", "", {})
    status, body = _call(app, dict(scrape))
    assert status.startswith("200"), status
    stats = exposition_stats(body)
    wall_ms: list[float] = []
    cpu_ms: list[float] = []
    for _ in range(args.scrapes):
        environ = dict(scrape)
        w0, c0 = time.perf_counter(), time.thread_time()
        _call(app, environ)
        cpu_ms.append((time.thread_time() - c0) * 1e3)
        wall_ms.append((time.perf_counter() - w0) * 1e3)
    common.progress(
        f"  inprocess: {stats['samples']:,} samples, {stats['bytes']:,} bytes; "
        f"scrape wall {common.fmt(wall_ms)} ms, CPU {common.fmt(cpu_ms)} ms"
    )
    profile = None
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(10):
            _call(app, dict(scrape))
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
        profile = out.getvalue()
        print(profile)
    return {
        "setup": "inprocess",
        "workers": 1,
        "requests_sent": sent,
        "exposition": stats,
        "wall_ms": common.summary(wall_ms),
        "cpu_ms": common.summary(cpu_ms),
        "wall_ms_all": wall_ms,
        "profile": profile,
    }


# --- real servers ----------------------------------------------------------------------------

# Cycles through every (route, auth, outcome) combination; a new credential for each request.
FILL_LUA = (
    common.WRK_DONE_LUA
    + r"""
local words = {}
local consonants = "ghjklmnprstvwz"
local vowels = "oui"
for i = 1, #consonants do
  for j = 1, #vowels do
    table.insert(words, consonants:sub(i, i) .. vowels:sub(j, j))
  end
end
local routes = 200
local statuses = {"200", "401", "404", "500"}
local counter = 0
local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("id", #threads)
end
function init(args)
  routes = tonumber(args[1]) or 200
  counter = (tonumber(wrk.thread:get("id")) or 1) * 7919
end
local function b64(s)
  local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  return ((s:gsub(".", function(x)
    local r, b = "", x:byte()
    for i = 8, 1, -1 do r = r .. (b % 2 ^ i - b % 2 ^ (i - 1) > 0 and "1" or "0") end
    return r
  end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
    if #x < 6 then return "" end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
    return chars:sub(c + 1, c + 1)
  end) .. ({"", "==", "="})[#s % 3 + 1])
end
function request()
  counter = counter + 1
  local combo = counter % (routes * 28)
  local route = math.floor(combo / 28)
  local scheme = math.floor(combo / 4) % 7
  local status = statuses[combo % 4 + 1]
  local word = words[math.floor(route / #words) % #words + 1] .. words[route % #words + 1]
  local headers = {}
  if scheme == 0 then headers["Authorization"] = "Bearer tok-" .. counter
  elseif scheme == 1 then headers["Authorization"] = "Basic " .. b64("user" .. counter .. ":pw")
  elseif scheme == 2 then headers["Authorization"] = 'Digest username="user' .. counter .. '", realm="r", nonce="' .. counter .. '", uri="/"'
  elseif scheme == 3 then headers["X-API-Key"] = "key-" .. counter
  elseif scheme == 4 then headers["Cookie"] = "theme=dark; sessionid=s" .. counter
  elseif scheme == 5 then headers["Authorization"] = "Negotiate neg-" .. counter
  end
  return wrk.format("GET", "/api/" .. word .. "?s=" .. status, headers)
end
"""
)


GUNICORN_CONF = """\
from memwatch.gunicorn import child_exit  # noqa: F401  (the multiprocess clean-up hook)
control_socket_disable = True
"""


def measure_server(setup: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    workers = 1 if setup == "single" else int(setup[2:])
    env = {f"MEMWATCH_{k.upper()}": str(v) for k, v in WORST_CASE.items()}
    env["MEMWATCH_MAX_ROUTES"] = str(args.max_routes)
    env["MEMWATCH_LOG_STARTUP"] = "0"
    multiproc_dir = None
    if setup != "single":
        multiproc_dir = tempfile.mkdtemp(prefix="memwatch-scrape-", dir=log_dir)
        env["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    conf = log_dir / "gunicorn_scrape.conf.py"
    conf.write_text(GUNICORN_CONF)
    server = common.Server(
        f"scrape-{setup}",
        common.gunicorn_argv("bench_apps:cardinality_wrapped()", "-c", str(conf), workers=workers),
        log_dir,
        env=env,
    )
    try:
        server.wait_ready(workers=workers)
        script = log_dir / "fill.lua"
        script.write_text(FILL_LUA)
        fill_seconds = args.fill_seconds * workers
        common.progress(
            f"  {setup}: {workers} worker(s), filling for {fill_seconds:.0f} s with wrk ..."
        )
        fill = common.run_wrk(
            server.port,
            script,
            seconds=fill_seconds,
            threads=2,
            connections=8,
            script_args=[str(args.max_routes)],
        )
        time.sleep(2.5)  # every worker publishes what it counted (at most once a second)
        status, body = server.request("GET", "/metrics", timeout=60)
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}:\n{server.logs()[-3000:]}")
        stats = exposition_stats(body)
        pids = server.pids()
        wall_ms: list[float] = []
        cpu_before = common.cpu_seconds(pids)
        began = time.monotonic()
        for _ in range(args.scrapes):
            w0 = time.perf_counter()
            status, body = server.request("GET", "/metrics", timeout=60)
            wall_ms.append((time.perf_counter() - w0) * 1e3)
            assert status == 200, status
        elapsed = time.monotonic() - began
        cpu_total = common.cpu_seconds(pids) - cpu_before
        # What the workers burn when nobody scrapes (publishing loops), over as long.
        idle_before = common.cpu_seconds(pids)
        time.sleep(min(elapsed, 5.0))
        idle_rate = (common.cpu_seconds(pids) - idle_before) / min(elapsed, 5.0)
        cpu_per_scrape_ms = (cpu_total - idle_rate * elapsed) / args.scrapes * 1e3
        files = sorted(Path(multiproc_dir).glob("*.db")) if multiproc_dir else []
        common.progress(
            f"  {setup}: {fill['requests']:,} fill requests; {stats['samples']:,} samples, "
            f"{stats['bytes']:,} bytes; scrape wall {common.fmt(wall_ms)} ms; "
            f"server CPU {cpu_per_scrape_ms:.1f} ms per scrape"
        )
        return {
            "setup": setup,
            "workers": workers,
            "requests_sent": fill["requests"],
            "fill": fill,
            "exposition": stats,
            "wall_ms": common.summary(wall_ms),
            "wall_ms_all": wall_ms,
            "server_cpu_ms_per_scrape": cpu_per_scrape_ms,
            "multiprocess_files": {f.name: f.stat().st_size for f in files},
        }
    finally:
        server.stop()


def table(results: Sequence[dict[str, Any]], max_routes: int) -> str:
    lines = [
        f"Full cardinality: {max_routes} routes x 7 auth schemes x 4 outcomes.",
        "",
        "| set-up | workers | samples in the scrape | bytes | scrape wall ms: median (IQR) [min–max] | CPU ms per scrape | under 20 ms |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        w = r["wall_ms"]
        cpu = r["cpu_ms"]["median"] if "cpu_ms" in r else r["server_cpu_ms_per_scrape"]
        lines.append(
            f"| {r['setup']} | {r['workers']} | {r['exposition']['samples']:,} "
            f"| {r['exposition']['bytes']:,} | {w['median']:.1f} ({w['iqr']:.1f}) "
            f"[{w['min']:.1f}–{w['max']:.1f}] | {cpu:.1f} | {'yes' if w['median'] < 20 else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--setups", default="inprocess,single,mp2,mp4", help="inprocess, single, mpN"
    )
    parser.add_argument("--max-routes", type=int, default=200)
    parser.add_argument(
        "--passes", type=int, default=3, help="in-process fill: passes over every combination"
    )
    parser.add_argument("--fill-seconds", type=float, default=10.0, help="wrk fill time per worker")
    parser.add_argument("--scrapes", type=int, default=40)
    parser.add_argument("--profile", action="store_true", help="cProfile 10 in-process scrapes")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    logging.getLogger("memwatch").setLevel(logging.WARNING)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    if any(s != "inprocess" for s in setups) and not common.have_wrk():
        parser.error("wrk is not installed (Debian package wrk); use --setups inprocess")
    info = common.machine()
    common.progress(
        f"scrape: memwatch {memwatch.__version__}, Python {info['python']}, setups {setups}"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="memwatch-scrape-") as tmp:
        for setup in setups:
            if setup == "inprocess":
                results.append(measure_inprocess(args))
            elif setup == "single" or re.fullmatch(r"mp\d+", setup):
                results.append(measure_server(setup, args, Path(tmp)))
            else:
                parser.error(f"unknown set-up {setup!r}")
    print(table(results, args.max_routes))
    common.write_json(
        args.json,
        {
            "benchmark": "scrape",
            "machine": info,
            "versions": common.versions("memwatch", "prometheus-client", "gunicorn"),
            "settings": vars(args),
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
