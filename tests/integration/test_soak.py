"""Soak: 1,000,000 requests with distinct tokens and distinct paths through a real server, and
memwatch's own memory stays flat, with no leak alert for a clean app.

Skipped unless ``MEMWATCH_SOAK=1`` (``make soak`` sets it). Needs ``wrk`` (Debian ``wrk``,
installed by ``make system-deps``). Figures of the last run are in docs/security.md ("Soak").

Setup: gunicorn, one gthread worker with 4 threads, serving :mod:`tests.apps.soak_app` (a clean
bare WSGI app) behind memwatch at its default settings; ``wrk`` with 2 threads and 8 keep-alive
connections drives it in segments of 100,000 requests. Every request carries a credential seen
once (a Bearer token, an API key, a ``Token`` header or a session cookie, by turns) and a path
seen once: ``/users/<n>`` (one route label, ``/users/{id}``) or ``/<letters of n>/<n>`` (new
labels until the route cap, then ``__other__``), with ``?page=<n>``. After each segment the
worker reports its memory after a full collection (``/debug/memory``).

Checks: every request answered, counted exactly; Python heap blocks flat after the first segment
(memwatch's structures fill during it: the route table, the path cache, the sample ring), RSS
growth bounded; memwatch's structures at their caps; no internal error; no leak alert.
``MEMWATCH_SOAK_REQUESTS`` changes the number of requests (a multiple of the segment size).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.apps.support import metric_samples
from tests.integration.conftest import Server, Servers, gunicorn

REQUESTS = int(os.environ.get("MEMWATCH_SOAK_REQUESTS", "1000000"))
SEGMENT = 100_000
WRK_THREADS = 2
WRK_CONNECTIONS = 8
SEGMENT_DEADLINE = 900.0  # seconds for one segment (about 60 s at 1,700 requests/s)
SOAK_DEADLINE = 3 * 3600.0

pytestmark = [
    pytest.mark.integration,
    pytest.mark.soak,
    pytest.mark.timeout(SOAK_DEADLINE + 600),
    pytest.mark.skipif(os.environ.get("MEMWATCH_SOAK") != "1", reason="set MEMWATCH_SOAK=1"),
]

# wrk's Lua script. Each thread sends exactly `quota` counted requests (200 from the app), then
# only requests memwatch answers itself without counting (a 404 under its report prefix) until
# the driver stops wrk. wrk parses the first request of its first thread without sending it:
# that one is a filler too. `offset` makes every segment's numbers new.
LOAD_LUA = r"""
local quota, offset, id = 0, 0, 0
local sent, done, verified = 0, 0, false
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end
function init(args)
  quota = tonumber(args[1])
  offset = tonumber(args[2])
  id = wrk.thread:get("id")
end
local letters = "abcdefghijklmnopqrstuvwxyz"
local function word(n)
  local s = ""
  repeat
    local r = n % 26
    s = s .. letters:sub(r + 1, r + 1)
    n = math.floor(n / 26)
  until n == 0
  return s
end
local schemes = {
  function(n) return {["Authorization"] = "Bearer soak-" .. n .. "-tok"} end,
  function(n) return {["X-API-Key"] = "soak-key-" .. n} end,
  function(n) return {["Authorization"] = "Token soak-" .. n} end,
  function(n) return {["Cookie"] = "theme=dark; sessionid=soak-" .. n} end,
}
function request()
  if (id == 1 and not verified) or sent >= quota then
    verified = true
    return wrk.format("GET", "/memwatch/soak-idle")
  end
  sent = sent + 1
  local n = offset + id * 100000000 + sent
  local path
  if n % 2 == 0 then path = "/users/" .. n else path = "/" .. word(n) .. "/" .. n end
  return wrk.format("GET", path .. "?page=" .. n, schemes[n % 4 + 1](n))
end
function response(status, headers, body)
  if status == 200 then
    done = done + 1
    if done == quota then
      io.write("SOAK-THREAD-DONE\n")
      io.flush()
    end
  elseif status ~= 404 then
    io.write("SOAK-BAD-STATUS " .. status .. "\n")
    io.flush()
  end
end
"""


def drive_segment(port: int, script: Path, requests: int, offset: int) -> float:
    """Sends ``requests`` counted requests with wrk; returns the seconds it took."""
    start = time.monotonic()
    wrk = subprocess.Popen(
        [
            "wrk",
            "-t",
            str(WRK_THREADS),
            "-c",
            str(WRK_CONNECTIONS),
            "-d",
            f"{int(SEGMENT_DEADLINE)}s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/",
            "--",
            str(requests // WRK_THREADS),
            str(offset),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert wrk.stdout is not None
    finished = 0
    try:
        for line in wrk.stdout:
            assert not line.startswith("SOAK-BAD-STATUS"), line
            if line.startswith("SOAK-THREAD-DONE"):
                finished += 1
                if finished == WRK_THREADS:
                    break
    finally:
        wrk.send_signal(signal.SIGINT)  # wrk's main thread sleeps for -d: this wakes it
        summary, _ = wrk.communicate(timeout=60)
    assert finished == WRK_THREADS, f"wrk stopped before its quota:\n{summary}"
    assert "Socket errors" not in summary, summary
    return time.monotonic() - start


def memory(server: Server) -> dict[str, Any]:
    status, body = server.request("GET", "/debug/memory", timeout=60.0)
    assert status == 200
    return dict(json.loads(body))


def soak(server: Server, tmp_path: Path) -> list[dict[str, Any]]:
    """Drives REQUESTS through the server; the memory report after each segment."""
    script = tmp_path / "soak.lua"
    script.write_text(LOAD_LUA)
    deadline = time.monotonic() + SOAK_DEADLINE
    checkpoints = []
    for segment in range(REQUESTS // SEGMENT):
        seconds = drive_segment(server.port, script, SEGMENT, segment * SEGMENT)
        reading = memory(server)
        reading.update(sent=(segment + 1) * SEGMENT, seconds=round(seconds, 1))
        checkpoints.append(reading)
        print(json.dumps(reading), flush=True)  # shown with -s; kept in the test's report
        assert time.monotonic() < deadline, "the soak ran past its deadline"
    return checkpoints


def start(servers: Servers, factory: str) -> Server:
    return servers.start(
        f"soak-{factory}",
        gunicorn(
            f"tests.apps.soak_app:{factory}()",
            "--worker-class",
            "gthread",
            "--threads",
            "4",
            "--no-control-socket",
        ),
    )


@pytest.fixture(autouse=True)
def _needs_wrk() -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (Debian package wrk; `make system-deps`)")


def test_a_million_requests_leave_memwatch_flat_and_quiet(servers: Servers, tmp_path: Path) -> None:
    # GIVEN a clean app behind memwatch under gunicorn
    server = start(servers, "wrapped")
    # WHEN a million requests with distinct tokens and paths go through it
    checkpoints = soak(server, tmp_path)

    # THEN every request was counted exactly once (the /debug/memory readings are requests too)
    debug_reads = len(checkpoints)
    status, body = server.request("GET", "/metrics")
    assert status == 200
    text = body.decode()
    counted = sum(v for _, v in metric_samples(text, "memwatch_requests_total"))
    assert counted == REQUESTS + debug_reads
    # AND memwatch failed nowhere and raised no alert: the app is clean
    assert metric_samples(text, "memwatch_internal_errors_total") == [({}, 0.0)]
    assert metric_samples(text, "memwatch_leak_alerts_total") == [({}, 0.0)]
    assert metric_samples(text, "memwatch_leak_suspected") == [({}, 0.0)]
    last = checkpoints[-1]["memwatch"]
    assert last["status"] == "ok" and last["alerts"] == 0, last
    # AND its structures are at their caps, not growing with tokens or paths
    assert last["route_labels"] == 200
    assert last["history_samples"] == 1024
    assert last["counter_keys"] <= 2 * (200 + 1)  # (route, method, auth, outcome) per label
    # AND the worker's Python heap is flat after the first segment: under 0.002 blocks per
    # request at every later checkpoint (a structure that grew by one block per distinct token
    # or path would add 0.25 to 1 per request)
    first = checkpoints[0]
    for reading in checkpoints[1:]:
        growth = reading["heap_blocks"] - first["heap_blocks"]
        assert growth < 0.002 * (reading["sent"] - first["sent"]), (first, reading)
    # AND its resident set grows by at most 8 MiB after the first segment (allocator arenas of
    # four threads settle slowly; a leak of 8 bytes per request would be 7 MiB)
    assert checkpoints[-1]["rss_bytes"] - first["rss_bytes"] < 8 * 2**20, (first, checkpoints[-1])
    server.stop()
    assert "memwatch internal error" not in server.logs()
    assert "leak suspected" not in server.logs()


def test_the_bare_twin_under_the_same_load(servers: Servers, tmp_path: Path) -> None:
    """The same load on the same app without memwatch: the baseline for the figures."""
    server = start(servers, "bare")
    checkpoints = soak(server, tmp_path)
    assert checkpoints[-1]["sent"] == REQUESTS
