"""The ``memwatch`` command.

``memwatch report URL [--token T] [--json]`` fetches ``URL/memwatch/report.json`` (or the URL as
given when it already ends in ``report.json``) and prints it as a terminal table.
``memwatch demo`` runs the demo service (the same as ``make demo``).
``memwatch run -- COMMAND`` runs a gunicorn or uvicorn command with its application watched, without
changing its code (:mod:`memwatch.launcher`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any


def _fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def fetch_report(url: str, token: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """GETs the report JSON from a running service."""
    if not url.endswith("report.json"):
        url = url.rstrip("/") + (
            "/report.json" if url.rstrip("/").endswith("memwatch") else "/memwatch/report.json"
        )
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data: dict[str, Any] = json.load(response)
    return data


def format_report(report: dict[str, Any]) -> str:
    """The report as plain text: verdict, routes, sites, holders."""
    leak = report.get("leak") or {}
    lines: list[str] = []
    if leak.get("suspected"):
        lines.append(
            f"LEAK SUSPECTED on {leak.get('signal')}: "
            f"{_fmt_bytes(leak.get('growth_bytes_per_request'))}/request, "
            f"{_fmt_bytes(leak.get('growth_bytes_per_second'))}/s, "
            f"confidence {float(leak.get('confidence') or 0):.3f}, since {leak.get('since')}, "
            f"scales with {leak.get('scales_with')}"
        )
    else:
        lines.append(f"No leak suspected (status: {leak.get('status', 'unknown')})")
    if leak.get("advice"):
        lines.append(f"Advice: {leak['advice']}")
        detail = leak.get("advice_detail") or {}
        for item in (detail.get("evidence") or [])[:6]:
            lines.append(f"  - {item}")
        if detail.get("stopgap"):
            lines.append(f"  {detail['stopgap']}")
    routes = report.get("routes") or []
    if routes:
        lines.append("")
        header = f"{'route':<40} {'method':<7} {'auth':<10} {'requests':>9} {'B/request':>10}  leak"
        lines.append(header)
        lines.append("-" * len(header))
        for r in routes[:30]:
            retained = r.get("retained_bytes_per_request")
            lines.append(
                f"{str(r.get('route'))[:40]:<40} {r.get('method', ''):<7} {r.get('auth', ''):<10} "
                f"{int(r.get('requests', 0)):>9} "
                f"{'-' if retained is None else f'{retained:.1f}':>10}  "
                f"{'yes' if r.get('suspected') else ''}"
            )
    sites = report.get("sites") or []
    if sites:
        lines.append("")
        lines.append("Top allocation sites:")
        for s in sites[:5]:
            lines.append(
                f"  {s.get('file')}:{s.get('line')}  +{_fmt_bytes(s.get('size_diff_bytes'))} "
                f"({s.get('count_diff')} objects)"
            )
    roots = report.get("roots") or []
    if roots:
        lines.append("")
        lines.append("Holders:")
        for root in roots[:5]:
            lines.append(
                f"  {root.get('path')} ({root.get('type')}, length {root.get('length')}, "
                f"growth {root.get('growth')})"
            )
            if root.get("advice"):
                lines.append(f"    advice: {root['advice']}")
    return "\n".join(lines)


def _base(url: str) -> str:
    url = url.rstrip("/")
    for suffix in ("/report.json", "/memwatch"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url


def _refused(exc: urllib.error.HTTPError) -> str:
    """The message for a 429 from POST /memwatch/diagnose (the duty-cycle pause)."""
    try:
        answer = json.loads(exc.read() or b"{}")
    except ValueError:
        answer = {}
    seconds = answer.get("retry_after_seconds") or exc.headers.get("Retry-After") or "?"
    when = f" (at {answer['not_before']})" if answer.get("not_before") else ""
    return (
        "memwatch: the service refused a new diagnosis window: memwatch's duty-cycle pause "
        f"after the last window lasts {seconds} s more{when}. Try again then, or pass --force "
        "to open one anyway (inside a window requests cost many times their usual CPU)."
    )


def _diagnose(url: str, token: str | None, timeout: float, force: bool = False) -> int:
    """POSTs to /memwatch/diagnose, then polls the report until the window has finished."""
    base = _base(url)
    try:
        before = (fetch_report(base, token).get("diagnosis") or {}).get("windows", 0)
        target = base + "/memwatch/diagnose" + ("?force=1" if force else "")
        request = urllib.request.Request(target, data=b"", method="POST")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code == 429:
            print(_refused(exc), file=sys.stderr)
            return 1
        hint = " (from a non-loopback address, pass --token)" if exc.code == 404 else ""
        print(
            f"memwatch: cannot start a diagnosis window at {base}: HTTP {exc.code}{hint}",
            file=sys.stderr,
        )
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"memwatch: cannot start a diagnosis window at {base}: {exc}", file=sys.stderr)
        return 1
    if not answer.get("started") and not answer.get("active"):
        print("memwatch: the service did not open a window", file=sys.stderr)
        return 1
    print("memwatch: diagnosis window open; it needs traffic to finish", file=sys.stderr)
    spinner = "|/-\\"
    deadline = time.monotonic() + timeout
    tick = 0
    while time.monotonic() < deadline:
        report = fetch_report(base, token)
        info = report.get("diagnosis") or {}
        if info.get("windows", 0) > before and not info.get("active"):
            print("\r" + " " * 60 + "\r", end="", file=sys.stderr)
            print(format_report(report))
            return 0
        print(f"\r{spinner[tick % 4]} waiting for the window to finish", end="", file=sys.stderr)
        sys.stderr.flush()
        tick += 1
        time.sleep(0.5)
    print(
        "\nmemwatch: the window did not finish in time (is the service getting traffic?)",
        file=sys.stderr,
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memwatch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="print a running service's leak report")
    rep.add_argument("url", help="base URL of the service, e.g. http://127.0.0.1:8000")
    rep.add_argument("--token", help="report token (needed from non-loopback addresses)")
    rep.add_argument("--json", action="store_true", help="print the raw JSON")
    diag = sub.add_parser("diagnose", help="open a diagnosis window and wait for its result")
    diag.add_argument("url", help="base URL of the service, e.g. http://127.0.0.1:8000")
    diag.add_argument("--token", help="report token (needed from non-loopback addresses)")
    diag.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (120)")
    diag.add_argument(
        "--force",
        action="store_true",
        help="open a window even while memwatch's duty-cycle pause after the last one runs",
    )
    sub.add_parser("demo", help="run the demo service (same as make demo)")
    run = sub.add_parser(
        "run",
        help="run a gunicorn or uvicorn command with its application watched",
        description="Runs COMMAND with memwatch wrapping the application that gunicorn or "
        "uvicorn loads; configure it with MEMWATCH_* environment variables.",
        usage="memwatch run [-h] -- COMMAND [ARGS ...]",
        epilog="example: memwatch run -- gunicorn myapp:app --workers 4",
    )
    run.add_argument(
        "argv", nargs=argparse.REMAINDER, metavar="COMMAND", help="the server command line"
    )
    args = parser.parse_args(argv)

    if args.command == "report":
        try:
            report = fetch_report(args.url, args.token)
        except urllib.error.HTTPError as exc:
            hint = " (from a non-loopback address, pass --token)" if exc.code == 404 else ""
            print(f"memwatch: {args.url}: HTTP {exc.code}{hint}", file=sys.stderr)
            return 1
        except (urllib.error.URLError, OSError, ValueError) as exc:
            print(f"memwatch: cannot fetch the report from {args.url}: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(report, indent=1) if args.json else format_report(report))
        return 0
    if args.command == "diagnose":
        return _diagnose(args.url, args.token, args.timeout, args.force)
    if args.command == "demo":
        from memwatch.demo import main as demo_main

        return demo_main()
    if args.command == "run":
        from memwatch.launcher import run as run_command

        return run_command(args.argv)  # returns only if the command could not be run
    return 2  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
