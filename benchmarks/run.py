"""Runs memwatch's benchmark harnesses, each in a fresh interpreter, and collects their results.

Usage (from the repository root; ``make bench`` runs the default)::

    .venv/bin/python benchmarks/run.py                 # the default harnesses, ~30 minutes
    .venv/bin/python benchmarks/run.py --out results/  # also keep each harness's JSON
    .venv/bin/python benchmarks/run.py --only scrape --only e2e
    .venv/bin/python benchmarks/run.py --all           # and the detection corpus (~6 minutes)

Harnesses that need wrk (e2e, scrape's servers) fail with a message when it is missing
(Debian package wrk; ``make bench`` installs it as root).

Exit status: non-zero if any harness failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Harness:
    name: str
    script: str
    summary: str
    default: bool  # part of a plain run
    json_flag: str = "--json"


HARNESSES = (
    Harness(
        "inprocess",
        "inprocess.py",
        "CPU per request, bare and wrapped, Flask and Starlette, small and 2 M-object heaps",
        default=True,
    ),
    Harness(
        "compare",
        "compare.py",
        "side by side with Dozer, starlette-exporter, prometheus-fastapi-instrumentator, tracemalloc",
        default=True,
    ),
    Harness(
        "e2e",
        "e2e.py",
        "wrk against gunicorn sync/gthread and uvicorn, bare and wrapped: req/s, latency, CPU/request",
        default=True,
    ),
    Harness(
        "scrape",
        "scrape.py",
        "/metrics at full cardinality, in process, one worker, multiprocess with 2 and 4 workers",
        default=True,
    ),
    Harness(
        "own_memory",
        "own_memory.py",
        "memwatch's own memory at full cardinality, and over 1,000,000 requests",
        default=True,
    ),
    Harness(
        "diagnosis_cost",
        "diagnosis_cost.py",
        "CPU per request inside a diagnosis window, and the duty cycle",
        default=True,
    ),
    Harness(
        "detection_corpus",
        "detection_corpus.py",
        "requests to detect each leak of the corpus under real servers",
        default=False,
    ),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--all", action="store_true", help="run every harness")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="run this harness (repeatable)"
    )
    parser.add_argument("--out", type=Path, help="directory for each harness's JSON results")
    args = parser.parse_args(argv)

    known = {h.name: h for h in HARNESSES}
    if args.only:
        unknown = [n for n in args.only if n not in known]
        if unknown:
            parser.error(f"unknown harness {', '.join(unknown)}; known: {', '.join(known)}")
        chosen = [known[n] for n in args.only]
    else:
        chosen = [h for h in HARNESSES if args.all or h.default]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)

    failed = []
    for harness in chosen:
        command = [sys.executable, str(HERE / harness.script)]
        if args.out:
            command += [harness.json_flag, str(args.out / f"{harness.name}.json")]
        print(f"== {harness.name}: {harness.summary}", flush=True)
        print(f"   $ {' '.join(command)}", flush=True)
        began = time.perf_counter()
        code = subprocess.call(command)
        print(
            f"== {harness.name}: exit {code} after {time.perf_counter() - began:.0f} s", flush=True
        )
        if code != 0:
            failed.append(harness.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
