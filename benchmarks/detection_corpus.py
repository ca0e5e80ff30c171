"""Requests-to-detect over the detection corpus: every case under its real server, memwatch at
default settings, the verdict read from ``/memwatch/report.json`` every 500 requests.

Prints a Markdown table (case, framework, server, leaking route and auth, leak size, requests to
detect, routes marked, scales_with, result) and writes every poll and the final history of each
case as JSON, for tuning the detector.

Usage (from the repository root)::

    .venv/bin/python benchmarks/detection_corpus.py                       # all cases, ~6 min
    .venv/bin/python benchmarks/detection_corpus.py --case flask_basic_audit --case fastapi_plain
    .venv/bin/python benchmarks/detection_corpus.py --json out.json --markdown out.md
    .venv/bin/python benchmarks/detection_corpus.py --measure   # leak sizes in process (tracemalloc)
    .venv/bin/python benchmarks/detection_corpus.py --no-stop --max-requests 30000  # full series

Exit status 1 if any case fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.corpus import inprocess  # noqa: E402
from tests.corpus.catalog import BY_NAME, CASES, Case  # noqa: E402
from tests.corpus.harness import CaseResult, run_case  # noqa: E402


def _route(key: tuple[str, str, str] | None) -> str:
    if key is None:
        return "—"
    route, method, auth = key
    return f"`{method} {route}` {auth}"


def _size(case: Case) -> str:
    if case.leak is None:
        return "—"
    b = case.leak.bytes_per_request
    return f"{b / 1024:.0f} KiB" if b >= 8192 else f"{b:.0f}"


def markdown(cases: list[Case], results: list[CaseResult]) -> str:
    lines = [
        "| case | framework | server | leaking route / auth | leak (B/request) "
        "| first verdict | requests to detect | routes marked | scales_with | result |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, r in zip(cases, results, strict=True):
        if case.leak is None:
            detect = (
                "not flagged"
                if r.first_flagged is None
                else f"**false alarm at {r.first_flagged:,}**"
            )
        elif r.detected is not None:
            detect = f"{r.detected:,}"
        elif r.first_flagged is not None:
            detect = f"flagged at {r.first_flagged:,}, route not marked"
        else:
            detect = f"not flagged ({r.requests:,})"
        marked = "<br>".join(_route(k) for k in r.routes_marked) or "—"
        verdict = "never" if r.first_verdict is None else f"{r.first_verdict:,}"
        lines.append(
            f"| {case.name} | {case.framework} | {case.server} | {_route(r.leaking_route)} "
            f"| {_size(case)} | {verdict} | {detect} | {marked} | {r.scales_with or '—'} "
            f"| {'pass' if r.passed else 'FAIL'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", choices=sorted(BY_NAME), help="run only these")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-requests", type=int, default=None, help="override every case's cap")
    parser.add_argument("--no-stop", action="store_true", help="do not stop at detection")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "detection_corpus.json")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="replace the results table in docs/detection.md with this run's",
    )
    parser.add_argument("--measure", action="store_true", help="measure leak sizes in process")
    parser.add_argument("--quiet", action="store_true", help="no per-poll progress lines")
    args = parser.parse_args(argv)

    cases = [BY_NAME[name] for name in args.case] if args.case else list(CASES)
    if args.measure:
        return _measure(cases)
    results: list[CaseResult] = []
    started = time.monotonic()
    for case in cases:
        result = run_case(
            case,
            seed=args.seed,
            max_requests=args.max_requests,
            stop_when_detected=not args.no_stop,
            progress=None if args.quiet else lambda line: print(line, flush=True),
        )
        print(result.summary(), f"({result.requests} requests, {result.seconds} s)", flush=True)
        results.append(result)
    table = markdown(cases, results)
    print()
    print(table)
    failed = [r.case for r in results if not r.passed]
    print(
        f"\n{len(results) - len(failed)}/{len(results)} passed in {time.monotonic() - started:.0f} s"
    )
    payload: dict[str, Any] = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "memwatch": _memwatch_state(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "seed": args.seed,
        "command": " ".join(["benchmarks/detection_corpus.py", *(argv or sys.argv[1:])]),
        "table": table,
        "results": [dataclasses.asdict(r) for r in results],
    }
    args.json.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.json}")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.update_docs:
        update_docs(payload, DOCS)
        print(f"updated {DOCS}")
    return 1 if failed else 0


DOCS = ROOT / "docs" / "detection.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def update_docs(payload: dict[str, Any], path: Path) -> None:
    """Replaces the text between the results markers of ``path`` with this run's table."""
    results = payload["results"]
    passed = sum(r["passed"] for r in results)
    state = payload["memwatch"]
    head = (
        f"Run of {payload['generated'][:10]} against memwatch `{state['commit']}` (sources "
        f"digest `{state['sources_sha256']}`), seed {payload['seed']}, Python {payload['python']}: "
        f"**{passed}/{len(results)} cases pass**."
    )
    text = path.read_text()
    before, _, rest = text.partition(START)
    _, _, after = rest.partition(END)
    if not rest:
        raise SystemExit(f"{path} has no {START} ... {END} markers")
    path.write_text(f"{before}{START}\n{head}\n\n{payload['table']}\n{END}{after}")


def _memwatch_state() -> dict[str, str]:
    """The commit and a digest of memwatch's sources as they were run (the tree may be dirty)."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "memwatch").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        head = ""
    return {"commit": head, "sources_sha256": digest.hexdigest()[:16]}


def _measure(cases: list[Case]) -> int:
    print(
        "| case | leaking route | retained B per leaking-route request "
        "| retained B per request (all) | heap blocks per request |"
    )
    print("|---|---|---|---|---|")
    for case in cases:
        m = inprocess.measure_in_subprocess(case)
        per_route = m.get("bytes_per_leaking_request")
        print(
            f"| {case.name} | {_route(case.leak.route if case.leak else None)} "
            f"| {'—' if per_route is None else f'{per_route:.0f}'} | {m['bytes_per_request']:.1f} "
            f"| {m['blocks_per_request']:.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
