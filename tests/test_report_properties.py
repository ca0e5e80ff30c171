"""Property tests of what memwatch renders from data it does not control.

Route labels, auth names, allocation-site file names, holder paths and type names reach the
report; any of them may hold markup, quotes, control characters or lone surrogates (a file name
decoded with ``surrogateescape``, a dict key). Whatever they hold, building the report, its JSON
and its HTML page never raise, stay within their bounds, the JSON reads back as the report, and
the page holds no markup that came from the data. Route labels made from raw paths are, in
addition, printable ASCII: they also reach logs and the Prometheus exposition.
"""

from __future__ import annotations

import html as stdlib_html
import json

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import memwatch
from memwatch import html
from memwatch.attribution import RouteEstimate
from memwatch.detector import Verdict
from memwatch.diagnosis import DiagnosisResult, SiteStat
from memwatch.holders import Holder
from memwatch.monitor import Snapshot
from memwatch.report import (
    MAX_HISTORY_POINTS,
    MAX_ROOTS_IN_REPORT,
    MAX_ROUTES_IN_REPORT,
    MAX_SITES_IN_REPORT,
    MAX_TRACEBACK,
    MAX_TYPES_IN_REPORT,
    build_report,
    to_dict,
    to_json,
)
from memwatch.routes import OTHER, RouteTable, normalize_path
from memwatch.signals import Sample
from tests.apps import bare_wsgi
from tests.apps.support import make_environ, metric_samples, run_wsgi
from tests.test_html import OWN_TAGS, parse
from tests.test_routes import MAX_LABEL

NOW = 1_795_000_000.0

MARKUP = [
    "<script>alert(1)</script>",
    "<ScRiPt src=//evil.example/x.js></sCrIpT>",
    "\"'><img src=x onerror=alert(document.cookie)>",
    "</code></td></tr></table><iframe src=//evil.example>",
    "<svg onload=alert(1)>",
    "<!-- -->",
    "]]><![CDATA[",
    "&lt;script&gt;",
    "\udc80\udcff<script>\ud800",  # lone surrogates around markup
    "\x00\x1b[31m\r\n<script>\x7f\x85",  # control characters (C0, DEL, C1)
    "\u2028\u2029\ufeff",
]
# Any code point, surrogates included (hypothesis' default alphabet for text() leaves them out).
ANY_TEXT = st.text(st.characters(), max_size=40)
hostile = st.one_of(
    ANY_TEXT,
    st.sampled_from(MARKUP),
    st.tuples(ANY_TEXT, st.sampled_from(MARKUP), ANY_TEXT).map("".join),
)
maybe_float = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))
epoch = st.floats(min_value=0.0, max_value=4e9)


def _bounded_ints(high: int = 10**12) -> st.SearchStrategy[int]:
    return st.integers(min_value=-high, max_value=high)


@st.composite
def snapshots(draw: st.DrawFn) -> tuple[Snapshot, int]:
    """A monitor snapshot with hostile text in every field that carries text, and counts of
    routes, history points, sites, holders and types beyond the report's caps. Also returns the
    number of characters of text put in (for the size bounds)."""
    texts: list[str] = []

    def text() -> str:
        value = draw(hostile)
        texts.append(value)
        return value

    counts: dict[tuple[str, str, str, str], int] = {}
    for _ in range(draw(st.integers(0, 12))):
        counts[(text(), text(), text(), text())] = draw(st.integers(1, 10**9))
    # Plain routes beyond the cap, so that the cap is exercised.
    for i in range(draw(st.integers(0, MAX_ROUTES_IN_REPORT + 40))):
        counts[(f"/r{i}", "GET", "anonymous", "ok")] = i + 1
    keys = sorted({(r, m, a) for r, m, a, _ in counts}, key=repr)
    estimates = [
        RouteEstimate(
            key=key,
            pairs=draw(st.integers(0, 10**6)),
            retained_bytes_per_request=draw(maybe_float),
            t=draw(maybe_float),
            significant=draw(st.booleans()),
            suspected=draw(st.booleans()),
        )
        for key in keys[: draw(st.integers(0, 15))]
    ]
    n_history = draw(st.sampled_from([0, 1, 2, 7, MAX_HISTORY_POINTS, 2 * MAX_HISTORY_POINTS + 3]))
    history = [
        Sample(
            time=1000.0 + i,
            wall=NOW + i,
            requests=50 * i,
            rss_bytes=draw(st.one_of(st.none(), st.integers(0, 2**40))) if i < 3 else 10**8 + i,
            heap_blocks=draw(st.one_of(st.none(), st.integers(0, 2**32))) if i < 3 else 10**5,
            gc_pending=7,
            gc_collections=(3, 2, 1),
            traced_bytes=None,
        )
        for i in range(n_history)
    ]
    verdict = Verdict(
        status=draw(st.one_of(st.sampled_from(["warming_up", "ok", "suspected", "unknown"]), hostile)),
        suspected=draw(st.booleans()),
        signal=draw(st.one_of(st.none(), hostile)),
        bytes_per_request=draw(maybe_float),
        bytes_per_second=draw(maybe_float),
        confidence=draw(maybe_float),
        since_wall=draw(st.one_of(st.none(), epoch)),
    )
    diagnosis = None
    if draw(st.booleans()):
        diagnosis = DiagnosisResult(
            reason=text(),
            started_wall=draw(epoch),
            duration_seconds=draw(st.floats(0.0, 1e6)),
            requests=draw(st.integers(0, 10**6)),
            frames=draw(st.integers(1, 256)),
            traced_bytes=draw(st.integers(0, 2**40)),
            sites=[
                SiteStat(
                    file=text(),
                    line=draw(st.integers(0, 10**6)),
                    traceback=[text() for _ in range(draw(st.integers(0, MAX_TRACEBACK + 8)))],
                    size_diff_bytes=draw(_bounded_ints()),
                    count_diff=draw(_bounded_ints()),
                )
                for _ in range(draw(st.integers(0, MAX_SITES_IN_REPORT + 4)))
            ],
            holders=[
                Holder(
                    path=text(),
                    type=text(),
                    length=draw(st.integers(0, 10**9)),
                    growth=draw(_bounded_ints()),
                )
                for _ in range(draw(st.integers(0, MAX_ROOTS_IN_REPORT + 4)))
            ],
            types=[
                (text(), draw(st.integers(1, 10**9)))
                for _ in range(draw(st.integers(0, MAX_TYPES_IN_REPORT + 4)))
            ],
            holder_search_partial=draw(st.booleans()),
        )
    snapshot = Snapshot(
        pid=4242,
        started_wall=NOW - 60.0,
        requests=sum(counts.values()),
        counts=counts,
        deltas={},
        distinct_credentials={text(): draw(st.floats(0.0, 1e12)) for _ in range(draw(st.integers(0, 3)))},
        history=history,
        internal_errors=draw(st.integers(0, 10**9)),
        routes_overflowed=draw(st.integers(0, 10**9)),
        verdict=verdict,
        routes=estimates,
        scales_with=draw(st.one_of(st.none(), hostile)),
        diagnosis=diagnosis,
        diagnosis_windows=draw(st.integers(0, 10**6)),
        diagnosis_active=draw(st.booleans()),
    )
    return snapshot, sum(len(t) for t in texts)


def route_keys(snapshot: Snapshot) -> set[tuple[str, str, str]]:
    return {(r, m, a) for r, m, a, _ in snapshot.counts}


@settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots())
def test_json_never_raises_reads_back_and_stays_bounded(drawn: tuple[Snapshot, int]) -> None:
    snapshot, text_chars = drawn
    # WHEN the report is built and serialised
    report = build_report(snapshot, now=NOW)
    body = to_json(report)
    # THEN the JSON parses back to exactly the report (surrogates and controls as escapes)
    assert json.loads(body) == to_dict(report)
    body.decode("ascii")  # \u escapes only: valid in any charset a client assumes
    # AND every list is within its cap, keeping the busiest routes
    keys = route_keys(snapshot)
    assert len(report.routes) == min(len(keys), MAX_ROUTES_IN_REPORT)
    assert {(r.route, r.method, r.auth) for r in report.routes} <= keys
    assert len(report.history) <= MAX_HISTORY_POINTS
    assert len(report.sites) <= MAX_SITES_IN_REPORT
    assert all(len(s.traceback) <= MAX_TRACEBACK for s in report.sites)
    assert len(report.roots) <= MAX_ROOTS_IN_REPORT
    assert len(report.types) <= MAX_TYPES_IN_REPORT
    # AND no number is NaN or infinite (allow_nan=False would have raised), and the size is
    # linear in the text that went in (at most 12 characters per code point: a \ud83d\ude00)
    assert len(body) <= 200_000 + 12 * text_chars


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots())
@example(drawn=(Snapshot(  # the canonical payloads in every text field
    pid=1, started_wall=NOW, requests=1, counts={(MARKUP[0], MARKUP[2], MARKUP[1], "ok"): 1},
    deltas={}, distinct_credentials={}, history=[], internal_errors=0, routes_overflowed=0,
    verdict=Verdict(status=MARKUP[0]), routes=[], scales_with=None,
    diagnosis=DiagnosisResult(
        reason=MARKUP[0], started_wall=NOW, duration_seconds=1.0, requests=1, frames=1,
        traced_bytes=0, sites=[SiteStat(MARKUP[8], 1, [MARKUP[9]], 1, 1)],
        holders=[Holder(MARKUP[3], MARKUP[4], 1, 1)], types=[(MARKUP[5], 1)],
    ),
), 200))
def test_html_never_raises_holds_no_markup_from_data_and_stays_bounded(
    drawn: tuple[Snapshot, int],
) -> None:
    snapshot, text_chars = drawn
    # WHEN the page is rendered
    report = build_report(snapshot, now=NOW)
    page = html.render(report)
    # THEN it can be sent as UTF-8 (lone surrogates were escaped, not passed on)
    page.encode("utf-8")
    # AND no tag, attribute or script came from the data
    parsed = parse(page)
    assert set(parsed.tags) <= OWN_TAGS, set(parsed.tags) - OWN_TAGS
    assert not any(name.startswith("on") for name, _ in parsed.attributes)
    assert "<script" not in page.lower()
    assert not any(c in page for c in "\x00\x1b\x7f\x85")
    # AND a plain route label is shown as text
    for row in report.routes:
        if row.route.isascii() and row.route.isprintable():
            assert stdlib_html.escape(row.route) in page
    # AND its size is linear in the text that went in (escaping at most sextuples a character)
    assert len(page) <= 300_000 + 6 * text_chars


# --- through the endpoints of a live middleware ------------------------------------------------


@st.composite
def traffic(draw: st.DrawFn) -> list[tuple[str, str, str, int]]:
    """(route label, method, auth, status) of requests as a monitor may be told of them. Route
    labels come from framework templates, so they never hold surrogates (every server decodes
    paths as UTF-8 or Latin-1)."""
    template = st.one_of(
        st.text(st.characters(exclude_categories=["Cs"]), max_size=40),
        st.sampled_from([m for m in MARKUP if "\ud800" not in m and "\udc80" not in m]),
    )
    return draw(
        st.lists(
            st.tuples(
                template,
                st.one_of(st.sampled_from(["GET", "POST"]), st.text(max_size=12)),
                st.one_of(st.sampled_from(["bearer", "basic", "anonymous"]), st.text(max_size=12)),
                st.sampled_from([200, 201, 401, 404, 500]),
            ),
            min_size=1,
            max_size=30,
        )
    )


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(requests=traffic(), diagnosis=st.lists(hostile, min_size=3, max_size=3))
def test_live_endpoints_answer_whatever_the_labels(
    requests: list[tuple[str, str, str, int]], diagnosis: list[str]
) -> None:
    # GIVEN a wrapped app whose monitor was told of requests with hostile labels, and the
    # result of a diagnosis window with hostile file names and holder paths
    mw = memwatch.wrap(
        bare_wsgi.app,
        registry=CollectorRegistry(),
        log_startup=False,
        sample_every_requests=10**9,
        sample_every_seconds=10**9,
        request_sample_rate=0.0,
    )
    monitor = mw.monitor
    for route, method, auth, status in requests:
        monitor.request_exit(route, method, auth, None, status, None)
    monitor.take_sample()
    monitor.diagnosis.last = DiagnosisResult(
        reason=diagnosis[0],
        started_wall=NOW,
        duration_seconds=2.0,
        requests=len(requests),
        frames=32,
        traced_bytes=1,
        sites=[SiteStat(diagnosis[1], 7, [diagnosis[1], diagnosis[2]], 100, 3)],
        holders=[Holder(diagnosis[2], diagnosis[0], 5, 5)],
        types=[(diagnosis[0], 5)],
    )
    # WHEN the page, the JSON and the metrics are fetched from loopback
    page = run_wsgi(mw, make_environ("/memwatch/"))
    report = run_wsgi(mw, make_environ("/memwatch/report.json"))
    metrics = run_wsgi(mw, make_environ("/metrics"))
    # THEN each answers 200 with a well-formed body, and memwatch counted no failure of its own
    assert (page.status, report.status, metrics.status) == (200, 200, 200)
    assert "<script" not in page.body.decode("utf-8").lower()
    assert json.loads(report.body)["process"]["requests"] == len(requests)
    text = metrics.body.decode("utf-8")
    total = sum(v for _, v in metric_samples(text, "memwatch_requests_total"))
    assert total == len(requests)
    assert monitor.errors.total == 0, monitor.errors.by_where


# --- route labels from raw paths ----------------------------------------------------------------


@settings(deadline=None, max_examples=400)
@given(st.text(st.characters(), max_size=600))
@example("/a\rb/c\nd/\x1b[2J/\x00/ok")
@example("/\udc80\udcff/x")
def test_labels_from_any_path_are_bounded_printable_ascii(path: str) -> None:
    label = normalize_path(path)
    assert len(label) <= MAX_LABEL
    assert label.isascii() and label.isprintable(), repr(label)


@settings(deadline=None, max_examples=60)
@given(st.lists(st.text(st.characters(max_codepoint=0xFF), max_size=80), min_size=1, max_size=40))
def test_route_table_from_any_paths_stays_within_its_cap(paths: list[str]) -> None:
    table = RouteTable(max_routes=8)
    labels = [table.for_path(p) for p in paths]
    assert len(table) <= 8
    assert all(label == OTHER or label in table.labels() for label in labels)
    assert table.overflowed == sum(label == OTHER for label in labels)


@settings(deadline=None, max_examples=80)
@given(path=st.text(st.characters(max_codepoint=0xFF), min_size=1, max_size=200))
def test_wsgi_paths_of_any_bytes_give_printable_labels(path: str) -> None:
    # GIVEN a path as a WSGI server hands it over: percent-decoded bytes as Latin-1 text
    path = "/" + path.lstrip("/")
    if path.startswith(("/metrics", "/memwatch/")):
        path = "/x" + path
    mw = memwatch.wrap(bare_wsgi.app, registry=CollectorRegistry(), log_startup=False)
    # WHEN it is served
    reply = run_wsgi(mw, make_environ(path))
    # THEN the app answered, and the request is counted under a printable ASCII label
    assert reply.status == 200
    ((route, _method, _auth, _outcome),) = mw.monitor.snapshot().counts
    assert route.isascii() and route.isprintable() and len(route) <= MAX_LABEL
    text = run_wsgi(mw, make_environ("/metrics")).body.decode("ascii")
    families = {f.name for f in text_string_to_metric_families(text)}
    assert "memwatch_requests" in families

