"""End to end: wrk against real servers, bare and wrapped, measured in alternation.

Set-ups (one worker each, so that the server has one core and wrk the other):

- ``gunicorn-sync``: gunicorn, one sync worker, the in-process harness's Flask JSON endpoint
  (a sync worker closes the connection after each request, as behind a proxy);
- ``gunicorn-gthread``: gunicorn, one gthread worker with 4 threads, the same Flask app;
- ``uvicorn``: uvicorn (httptools when installed), the Starlette JSON endpoint.

For each set-up a bare and a wrapped server (``memwatch.wrap``, default settings) run side by
side; each round runs wrk once against each, the order alternating. Requests are the in-process
harness's: ``/items/<id>`` over 1000 ids, a query string, nine ordinary headers, a cookie and a
JWT-sized Bearer token that changes every 4 requests (``common.WRK_LUA``).

Wall-clock throughput on a shared machine swings by ±15 %, so each run also reads the server's
own CPU time (user + system of the server's processes, all workers and threads, from
``/proc/<pid>/stat``) before and after wrk: **server CPU per request** is the figure to compare;
requests/s and latency percentiles are reported next to it.

Usage::

    .venv/bin/python benchmarks/e2e.py                     # ~4 minutes
    .venv/bin/python benchmarks/e2e.py --setups uvicorn --rounds 9 --seconds 8 --json e2e.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

TARGET = 0.97  # server CPU per request, bare / wrapped

SETUPS: dict[str, dict[str, Any]] = {
    "gunicorn-sync": {
        "argv": lambda app: common.gunicorn_argv(f"bench_apps:flask_{app}()"),
        "workers": 1,
        "connections": 4,
    },
    "gunicorn-gthread": {
        "argv": lambda app: common.gunicorn_argv(
            f"bench_apps:flask_{app}()", "--worker-class", "gthread", "--threads", "4"
        ),
        "workers": 1,
        "connections": 8,
    },
    "uvicorn": {
        "argv": lambda app: common.uvicorn_argv(f"bench_apps:starlette_{app}"),
        "workers": 0,  # one process, no master
        "connections": 8,
    },
}


def one_run(
    server: common.Server, script: Path, seconds: float, connections: int
) -> dict[str, Any]:
    pids = server.pids()
    cpu_before = common.cpu_seconds(pids)
    result = common.run_wrk(
        server.port, script, seconds=seconds, threads=1, connections=connections
    )
    cpu = common.cpu_seconds(pids) - cpu_before
    requests = result["requests"]
    errors = sum(v for k, v in result.items() if k.startswith("errors_"))
    return {
        "requests": requests,
        "errors": errors,
        "rps": requests / (result["duration_us"] / 1e6),
        "cpu_us_per_request": cpu / requests * 1e6 if requests else float("nan"),
        "p50_ms": result["latency_p50_us"] / 1e3,
        "p90_ms": result["latency_p90_us"] / 1e3,
        "p99_ms": result["latency_p99_us"] / 1e3,
    }


def memwatch_state(server: common.Server) -> dict[str, float]:
    """A few of memwatch's own figures from the wrapped server's /metrics."""
    status, body = server.request("GET", "/metrics", timeout=30)
    if status != 200:
        return {}
    wanted = {
        "memwatch_leak_suspected": 0.0,
        "memwatch_tracemalloc_active": 0.0,
        "memwatch_internal_errors_total": 0.0,
        "memwatch_requests_total": 0.0,
    }
    for line in body.decode().splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            wanted[name] += float(line.rsplit(" ", 1)[1])
    return wanted


def measure(setup: str, args: argparse.Namespace, script: Path, log_dir: Path) -> dict[str, Any]:
    spec = SETUPS[setup]
    servers = {}
    try:
        for variant in ("bare", "wrapped"):
            env = {"MEMWATCH_LOG_STARTUP": "0"}
            server = common.Server(
                f"e2e-{setup}-{variant}",
                spec["argv"](variant),
                log_dir,
                env=env,
                ready_path="/items/1?fields=name",
            )
            servers[variant] = server
        for server in servers.values():
            server.wait_ready(workers=spec["workers"])
        # Warm-up: imports, first requests, memwatch's calibration and its detector's warm-up.
        for server in servers.values():
            one_run(server, script, args.warmup, spec["connections"])
        runs: dict[str, list[dict[str, Any]]] = {"bare": [], "wrapped": []}
        for index in range(args.rounds):
            order = ("bare", "wrapped") if index % 2 == 0 else ("wrapped", "bare")
            for variant in order:
                runs[variant].append(
                    one_run(servers[variant], script, args.seconds, spec["connections"])
                )
            b, w = runs["bare"][-1], runs["wrapped"][-1]
            common.progress(
                f"  {setup:16} round {index + 1}/{args.rounds}: "
                f"bare {b['rps']:7.0f} req/s {b['cpu_us_per_request']:6.1f} µs CPU/req | "
                f"wrapped {w['rps']:7.0f} req/s {w['cpu_us_per_request']:6.1f} µs CPU/req"
            )
        state = memwatch_state(servers["wrapped"])
    finally:
        for server in servers.values():
            server.stop()
    out: dict[str, Any] = {"setup": setup, "memwatch": state}
    for variant, items in runs.items():
        out[variant] = {
            key: common.summary([r[key] for r in items])
            for key in ("rps", "cpu_us_per_request", "p50_ms", "p90_ms", "p99_ms")
        }
        out[variant]["errors"] = sum(r["errors"] for r in items)
        out[variant]["requests"] = sum(r["requests"] for r in items)
        out[variant]["runs"] = items
    bare_cpu = [r["cpu_us_per_request"] for r in runs["bare"]]
    wrapped_cpu = [r["cpu_us_per_request"] for r in runs["wrapped"]]
    out["cpu_ratio"] = statistics.median(bare_cpu) / statistics.median(wrapped_cpu)
    out["cpu_paired_ratio"] = statistics.median(
        b / w for b, w in zip(bare_cpu, wrapped_cpu, strict=True)
    )
    out["cpu_added_us"] = common.summary(
        [w - b for b, w in zip(bare_cpu, wrapped_cpu, strict=True)]
    )
    out["rps_ratio"] = out["wrapped"]["rps"]["median"] / out["bare"]["rps"]["median"]
    return out


def table(results: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| set-up | variant | requests/s (IQR) | p50 / p90 / p99 ms | server CPU µs/request (IQR) | added µs (IQR) | CPU ratio bare/wrapped | target ≥ 0.97 |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        for variant in ("bare", "wrapped"):
            v = r[variant]
            added = ratio = met = ""
            if variant == "wrapped":
                a = r["cpu_added_us"]
                added = f"{a['median']:.1f} ({a['iqr']:.1f})"
                ratio = f"{r['cpu_ratio']:.3f} / {r['cpu_paired_ratio']:.3f}"
                met = "yes" if min(r["cpu_ratio"], r["cpu_paired_ratio"]) >= TARGET else "NO"
            lines.append(
                f"| {r['setup']} | {variant} | {v['rps']['median']:.0f} ({v['rps']['iqr']:.0f}) "
                f"| {v['p50_ms']['median']:.2f} / {v['p90_ms']['median']:.2f} / {v['p99_ms']['median']:.2f} "
                f"| {v['cpu_us_per_request']['median']:.1f} ({v['cpu_us_per_request']['iqr']:.1f}) "
                f"| {added} | {ratio} | {met} |"
            )
    for r in results:
        errors = r["bare"]["errors"] + r["wrapped"]["errors"]
        state = r["memwatch"]
        lines.append(
            f"\n{r['setup']}: throughput wrapped/bare {r['rps_ratio']:.3f}; "
            f"{r['bare']['requests']:,} + {r['wrapped']['requests']:,} requests, {errors} errors; "
            f"memwatch counted {state.get('memwatch_requests_total', 0):,.0f}, leak suspected "
            f"{state.get('memwatch_leak_suspected', 0):.0f}, tracing at the end "
            f"{state.get('memwatch_tracemalloc_active', 0):.0f}, internal errors "
            f"{state.get('memwatch_internal_errors_total', 0):.0f}."
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--setups", default=",".join(SETUPS), help=", ".join(SETUPS))
    parser.add_argument("--rounds", type=int, default=6, help="runs per variant, alternating")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds of warm-up per server")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    logging.getLogger("memwatch").setLevel(logging.WARNING)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        parser.error(f"unknown set-up {unknown}; known: {', '.join(SETUPS)}")
    if not common.have_wrk():
        parser.error("wrk is not installed (Debian package wrk)")
    info = common.machine()
    common.progress(
        f"e2e: {', '.join(setups)}; {args.rounds} rounds x {args.seconds:.0f} s per variant; "
        f"load average {info['load_average_at_start']}"
    )
    results = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="memwatch-e2e-") as tmp:
        script = Path(tmp) / "requests.lua"
        script.write_text(common.WRK_LUA)
        for setup in setups:
            results.append(measure(setup, args, script, Path(tmp)))
    common.progress(f"done in {time.monotonic() - began:.0f} s")
    print(table(results))
    common.write_json(
        args.json,
        {
            "benchmark": "e2e",
            "machine": info,
            "versions": common.versions(
                "memwatch", "gunicorn", "uvicorn", "httptools", "flask", "starlette"
            ),
            "settings": vars(args),
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
