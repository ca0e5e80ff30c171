"""The report page: one self-contained HTML document (inline CSS and SVG, no external assets).

Every value is escaped on the way in: route labels come from request paths, and a path may carry
``<script>``. The page reads well on a phone (a single column, tables that scroll sideways).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape as _html_escape
from typing import Any

from memwatch.report import HistoryPoint, Report

# C0 controls other than tab, line feed and carriage return, DEL and the C1 controls: HTML forbids
# them in text, and a browser shows them as boxes or drops them (NUL becomes U+FFFD).
_CONTROLS = dict.fromkeys(
    [*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0)], 0xFFFD
)


def escape(text: str) -> str:
    """Text for the page: HTML-escaped, control characters as U+FFFD, and encodable as UTF-8.

    Data can hold lone surrogates (a file name or a dict key decoded with ``surrogateescape``):
    they become backslash escapes, or the page could not be encoded for sending.
    """
    text = text.translate(_CONTROLS)
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _html_escape(text)


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232a;
background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:16px}
h1{font-size:1.35rem;margin:.2rem 0 1rem}h2{font-size:1.1rem;margin:1.6rem 0 .5rem}
.verdict{padding:12px 16px;border-radius:8px;border:1px solid #c9d1d9;background:#fff}
.verdict.suspected{border-color:#d1242f;background:#fff5f5}
.verdict.ok{border-color:#1a7f37;background:#f3fbf5}
.verdict strong{font-size:1.15rem}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:12px}
.card{background:#fff;border:1px solid #d8dee4;border-radius:8px;padding:10px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;background:#fff;font-size:.92rem}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #e5e8eb;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr.suspected td{background:#fff0f0}
code{font:.88rem ui-monospace,SFMono-Regular,Menlo,monospace}
.muted{color:#59636e}
svg{width:100%;height:auto}
ul.evidence{margin:.2rem 0 .4rem 1.2rem;padding:0;font-size:.92rem}
td.advice{white-space:normal;min-width:320px}
"""


def _fmt_bytes(value: float | None) -> str:
    if value is None:
        return "–"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


def _chart(title: str, points: Sequence[HistoryPoint], attr: str, unit: str) -> str:
    values = [(p.seconds, getattr(p, attr)) for p in points if getattr(p, attr) is not None]
    head = f'<div class="card"><div><strong>{escape(title)}</strong></div>'
    if len(values) < 2:
        return head + '<p class="muted">Not enough samples yet.</p></div>'
    width, height, pad = 560, 180, 34
    xs = [v[0] for v in values]
    ys = [float(v[1]) for v in values]
    x0, x1 = min(xs), max(xs) or 1.0
    y0, y1 = min(ys), max(ys)
    if y1 == y0:
        y1 = y0 + 1
    sx = (width - 2 * pad) / ((x1 - x0) or 1.0)
    sy = (height - 2 * pad) / (y1 - y0)
    path = " ".join(
        f"{'M' if i == 0 else 'L'}{pad + (x - x0) * sx:.1f},{height - pad - (y - y0) * sy:.1f}"
        for i, (x, y) in enumerate(zip(xs, ys, strict=True))
    )
    label = _fmt_bytes if unit == "bytes" else (lambda v: f"{v:,.0f}")
    return (
        head
        + f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        'stroke="#d0d7de"/>'
        f'<path d="{path}" fill="none" stroke="#0969da" stroke-width="2"/>'
        f'<text x="{pad}" y="16" font-size="12" fill="#59636e">{escape(label(y1))}</text>'
        f'<text x="{pad}" y="{height - 8}" font-size="12" fill="#59636e">'
        f"{escape(label(y0))} · {x1 - x0:.0f} s</text></svg></div>"
    )


_SITE_HEAD = (
    "<th>Site</th><th class=num>Growth</th><th class=num>Objects</th><th>Traceback</th>"
)
_TYPE_HEAD = "<th>Type</th><th class=num>Objects gained</th>"
_ROOT_HEAD = (
    "<th>Holder</th><th>Type</th><th class=num>Length</th><th class=num>Growth</th>"
    "<th>Advice</th>"
)


def _advice_block(line: str | None, detail: dict[str, Any] | None) -> str:
    """The leak's advice: the sentence, its confidence, the evidence, and the stopgap."""
    if not line:
        return ""
    if not detail:
        return f'<div id="advice"><p><strong>Advice:</strong> {escape(line)}</p></div>'
    evidence = "".join(f"<li>{escape(str(e))}</li>" for e in detail.get("evidence") or [])
    stopgap = detail.get("stopgap")
    return (
        f'<div id="advice"><p><strong>Advice</strong> ({escape(str(detail.get("confidence")))})'
        f": {escape(str(detail.get('text') or line))}</p>"
        + (f'<ul class="evidence">{evidence}</ul>' if evidence else "")
        + (f'<p class="muted">{escape(str(stopgap))}</p>' if stopgap else "")
        + "</div>"
    )


def _table(table_id: str, head: str, rows: str) -> str:
    return (
        f'<div class="scroll"><table id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{rows}</tbody></table></div>"
    )


def render(report: Report) -> str:
    leak = report.leak
    state = "suspected" if leak.suspected else ("ok" if leak.status == "ok" else "")
    if leak.suspected:
        headline = "Leak suspected"
        detail = (
            f"{escape(leak.signal or '')} grows by {_fmt_bytes(leak.growth_bytes_per_request)}"
            f" per request ({_fmt_bytes(leak.growth_bytes_per_second)}/s), confidence "
            f"{(leak.confidence or 0) * 100:.1f} %, since {escape(leak.since or '?')}; scales "
            f"with {escape(leak.scales_with or '?')}."
        )
    else:
        headline = {
            "ok": "No leak",
            "warming_up": "Warming up",
            "unknown": "Unknown",
        }.get(leak.status, escape(leak.status))
        detail = {
            "warming_up": "Not enough samples after the warm-up for a verdict yet.",
            "unknown": "memwatch cannot read any memory signal (resident set size, Python heap) "
            "in this process, so it cannot tell whether it leaks: see internal errors below and "
            "memwatch's log.",
        }.get(leak.status, "No memory growth that looks like a leak has been detected.")
    advice = _advice_block(leak.advice, leak.advice_detail)
    proc = report.process
    proc_line = (
        f"pid {proc.pid} · Python {escape(proc.python)} · {proc.requests:,} requests · RSS "
        f"{_fmt_bytes(proc.rss_bytes)} · heap {proc.heap_blocks or 0:,} blocks · internal errors "
        f"{proc.internal_errors}"
        if proc
        else ""
    )
    rows = "".join(
        f'<tr class="{"suspected" if r.suspected else ""}"><td><code>{escape(r.route)}</code></td>'
        f"<td>{escape(r.method)}</td><td>{escape(r.auth)}</td><td class=num>{r.requests:,}</td>"
        f"<td class=num>{_fmt_bytes(r.retained_bytes_per_request)}</td>"
        f"<td>{'yes' if r.suspected else ''}</td></tr>"
        for r in report.routes
    )
    sites = "".join(
        f"<tr><td><code>{escape(s.file)}:{s.line}</code></td>"
        f"<td class=num>{_fmt_bytes(s.size_diff_bytes)}</td><td class=num>{s.count_diff:,}</td>"
        f"<td><code>{'<br>'.join(escape(t) for t in s.traceback[:12])}</code></td></tr>"
        for s in report.sites
    )
    roots = "".join(
        f"<tr><td><code>{escape(r.path)}</code></td><td>{escape(r.type)}</td>"
        f"<td class=num>{'' if r.length is None else f'{r.length:,}'}</td>"
        f"<td class=num>{'' if r.growth is None else f'{r.growth:,}'}</td>"
        f"<td class=advice>{escape(r.advice or '')}</td></tr>"
        for r in report.roots
    )
    none = '<p class="muted">None yet: a diagnosis window fills this in.</p>'
    type_rows = "".join(
        f"<tr><td><code>{escape(t.type)}</code></td><td class=num>+{t.growth:,}</td></tr>"
        for t in report.types
    )
    diag = report.diagnosis
    if diag is not None and diag.last_started:
        diag_line = (
            f"{diag.windows} window(s); last {escape(diag.last_started)} "
            f"({escape(diag.last_reason or '')}): {diag.last_requests or 0:,} requests in "
            f"{diag.last_duration_seconds or 0:.1f} s, {diag.frames} frames per traceback"
            + (
                " · holder search cut short by its time budget"
                if diag.holder_search_partial
                else ""
            )
            + (" · a window is running now" if diag.active else "")
        )
    elif diag is not None and diag.active:
        diag_line = "A diagnosis window is running now."
    else:
        diag_line = "No diagnosis window has run yet."
    charts = _chart("Resident memory (RSS)", report.history, "rss_bytes", "bytes") + _chart(
        "Python heap (blocks)", report.history, "heap_blocks", "count"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>memwatch report</title><style>{_CSS}</style></head>
<body><main>
<h1>memwatch report</h1>
<section class="verdict {state}" id="verdict"><strong>{headline}</strong><p>{detail}</p>{advice}
<p class="muted">{proc_line} · generated {escape(report.generated_at)}</p></section>
<h2>Memory over time</h2>
<div class="grid" id="charts">{charts}</div>
<h2>Routes</h2>
<div class="scroll"><table id="routes"><thead><tr><th>Route</th><th>Method</th><th>Auth</th>
<th class=num>Requests</th><th class=num>Retained / request</th><th>Suspected</th></tr></thead>
<tbody>{rows}</tbody></table></div>
<h2>Allocation sites</h2>
{_table("sites", _SITE_HEAD, sites) if sites else none}
<h2>Holders</h2>
{_table("roots", _ROOT_HEAD, roots) if roots else none}
<h2>Object types that grew</h2>
{_table("types", _TYPE_HEAD, type_rows) if type_rows else none}
<p class="muted" id="diagnosis">{diag_line}</p>
<p class="muted">memwatch {escape(report.version)}</p>
</main></body></html>
"""
