"""The report page: every value escaped, no external asset, the parts of the report shown."""

from __future__ import annotations

import random
import re
from html.parser import HTMLParser

import pytest

from memwatch import html
from memwatch.config import Config
from memwatch.monitor import Monitor
from memwatch.report import HistoryPoint, Leak, Report, Root, RouteStat, Site, build_report
from tests.fixtures import FakeClock, make_signals

SCRIPT = "<script>alert(1)</script>"
ATTRIBUTE = "\"'><img src=x onerror=alert(document.cookie)>"
PAYLOADS = [SCRIPT, ATTRIBUTE, "</code></td></tr></table><iframe src=//evil.example>"]

# Every tag the page uses for its own layout.
OWN_TAGS = {
    "html",
    "head",
    "meta",
    "title",
    "style",
    "body",
    "main",
    "h1",
    "h2",
    "section",
    "strong",
    "p",
    "div",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "code",
    "br",
    "ul",  # the advice's evidence
    "li",
    "svg",
    "rect",
    "line",
    "path",
    "text",
}


class Tags(HTMLParser):
    """Collects the tags and attributes a browser would build from the page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.extend(attrs)


def parse(page: str) -> Tags:
    parser = Tags()
    parser.feed(page)
    parser.close()
    return parser


def hostile_report(payload: str) -> Report:
    """A report with the payload in every field that can carry text."""
    return Report(
        leak=Leak(
            suspected=True,
            status="suspected",
            signal=payload,
            growth_bytes_per_request=812.0,
            growth_bytes_per_second=40500.0,
            confidence=0.999,
            since=payload,
            scales_with=payload,
            advice=payload,
        ),
        routes=[
            RouteStat(
                route=f"/search/{payload}",
                method=payload,
                auth=payload,
                requests=3,
                retained_bytes_per_request=240.5,
                suspected=True,
            ),
            RouteStat(route=payload, method="GET", auth="bearer", requests=1),
        ],
        sites=[
            Site(
                file=payload,
                line=42,
                traceback=[payload, f"app.py:{payload}"],
                size_diff_bytes=1234,
                count_diff=5,
            )
        ],
        roots=[Root(path=payload, type=payload, length=5000, growth=4000, advice=payload)],
        history=[HistoryPoint(0.0, 0, 1000, 10), HistoryPoint(5.0, 100, 5000, 40)],
        generated_at=payload,
        version=payload,
    )


@pytest.mark.parametrize(
    "payload", PAYLOADS, ids=["script", "attribute breakout", "table breakout"]
)
def test_hostile_values_are_escaped(payload: str) -> None:
    page = html.render(hostile_report(payload))
    # The raw payload never appears; its escaped form does.
    assert payload not in page
    assert "&lt;" in page
    parsed = parse(page)
    # No tag and no attribute came from the data.
    assert set(parsed.tags) <= OWN_TAGS, set(parsed.tags) - OWN_TAGS
    assert not any(name.startswith("on") for name, _ in parsed.attributes)
    assert "<script" not in page.lower()


def test_escaped_text_reads_back_as_the_original() -> None:
    page = html.render(hostile_report(SCRIPT))
    # The browser shows the route as text: the route is unchanged once unescaped.
    texts: list[str] = []

    class Text(HTMLParser):
        def handle_data(self, data: str) -> None:
            texts.append(data)

    Text(convert_charrefs=True).feed(page)
    assert any(SCRIPT in t for t in texts)


def test_page_is_self_contained() -> None:
    page = html.render(hostile_report("x"))
    assert not re.search(r"\b(src|href|action|formaction)\s*=", page, re.IGNORECASE)
    assert "@import" not in page and "url(" not in page
    assert not re.search(r"https?://", page)
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert '<meta name="viewport"' in page


def test_page_shows_the_report() -> None:
    # GIVEN a real report from a monitor that saw traffic and took samples
    clock = FakeClock()
    heap = iter(range(10_000, 10_000_000, 777))
    monitor = Monitor(
        Config(sample_every_requests=10**9, sample_every_seconds=10**9, request_sample_rate=0.0),
        signals=make_signals(heap=lambda: next(heap)),
        clock=clock,
        rng=random.Random(3),
    )
    for i in range(30):
        monitor.request_exit("/reports/<int:rid>", "GET", "basic", f"user{i}", 200, None)
        clock.advance(1.0)
        if i % 10 == 0:
            monitor.take_sample()
    report = build_report(monitor.snapshot(), now=1_800_000_000.0)
    # WHEN it is rendered
    page = html.render(report)
    # THEN the verdict, the route row and both charts are there
    assert 'id="verdict"' in page and 'id="routes"' in page
    assert "<code>/reports/&lt;int:rid&gt;</code>" in page
    assert "<td class=num>30</td>" in page
    assert page.count("<svg") == 2
    assert "Not enough samples yet" not in page


def test_empty_report_renders() -> None:
    page = html.render(Report(leak=Leak(), routes=[]))
    assert "Warming up" in page
    assert page.count("Not enough samples yet") == 2
    assert "None yet" in page
    assert set(parse(page).tags) <= OWN_TAGS


def test_suspected_leak_states_its_numbers() -> None:
    report = hostile_report("heap")
    page = html.render(report)
    assert "Leak suspected" in page
    assert 'class="verdict suspected"' in page
    assert "99.9 %" in page
    assert "39.6 KiB/s" in page  # 40500 B/s
