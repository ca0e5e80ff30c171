"""Remediation advice (memwatch/advice.py): one test per shape of evidence, the evidence itself
taken from real containers (memwatch/holders.py), and the advice through the report, the page,
the CLI and the leak warning."""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import json
import logging
import random
import secrets
import sys
import time
import tracemalloc
import types
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

import memwatch
from memwatch import html
from memwatch.advice import (
    APPEND_ONLY,
    BOUNDED,
    CALLBACKS,
    CONFIDENT,
    CREDENTIAL_KEYED,
    EXCEPTIONS_KEPT,
    GROWING_SET,
    LARGE_BUFFERS,
    LIBRARY_REGISTRY,
    LIKELY,
    LOGGER_HANDLERS,
    METHOD_CACHE,
    METRIC_LABELS,
    NATIVE,
    NOTHING_RETAINED,
    REQUEST_KEYED,
    SIGNAL_RECEIVERS,
    STOPGAP,
    TASK_SET,
    UNBOUNDED_CACHE,
    UNDIAGNOSED,
    UNHELD_SITE,
    WARNING_REGISTRY,
    Advice,
    Context,
    advise,
    advise_holder,
)
from memwatch.cli import format_report
from memwatch.config import Config
from memwatch.diagnosis import DiagnosisResult, SiteStat
from memwatch.holders import (
    APP,
    LIBRARY,
    STDLIB,
    Evidence,
    Holder,
    Ref,
    describe,
    owner_of,
    take_census,
    token_like,
)
from memwatch.monitor import Monitor
from memwatch.report import build_report, to_json
from tests.corpus import inprocess
from tests.fixtures import FakeClock, make_signals

LOGIN = ("/login", "POST", "basic")
ORDERS = ("api/orders/", "GET", "bearer")


def result(holders: list[Holder], **fields: Any) -> DiagnosisResult:
    base: dict[str, Any] = {
        "reason": "leak suspected",
        "started_wall": 1_795_000_000.0,
        "duration_seconds": 3.0,
        "requests": 1000,
        "frames": 32,
        "traced_bytes": 10_000_000,
    }
    base.update(fields)
    return DiagnosisResult(holders=holders, **base)


def one(holder: Holder, ctx: Context | None = None, **fields: Any) -> Advice:
    return advise_holder(holder, result([holder], **fields), ctx or Context(suspected=True))


def ev(**fields: Any) -> Evidence:
    fields.setdefault("owner", APP)
    fields.setdefault("module", "shop.views")
    fields.setdefault("examined", 100)
    fields.setdefault("traced", 100)
    return Evidence(**fields)


# --- one test per shape --------------------------------------------------------------------


def test_dict_keyed_by_tokens_is_a_credential_keyed_cache() -> None:
    holder = Holder(
        "shop.auth.CLAIMS",
        "dict",
        3000,
        300,
        ev(
            module="shop.auth",
            examined=300,
            key_types=("str",),
            item_types=("dict",),
            str_lengths=(330, 340, 352),
            token_like=1.0,
            routes=((ORDERS, 300),),
            sites=("shop/auth.py:12",),
        ),
    )
    ctx = Context(suspected=True, scales_with="distinct_credentials", suspected_routes=(ORDERS,))
    advice = one(holder, ctx, route_requests={ORDERS: 1000})
    assert advice.shape == CREDENTIAL_KEYED and advice.confidence == CONFIDENT
    assert "shop.auth.CLAIMS" in advice.text and "lru_cache(maxsize=" in advice.text
    assert "TTL cache" in advice.text and "statelessly" in advice.text
    assert any("0.30 per request" in e for e in advice.evidence)
    assert any("100% shaped like tokens" in e for e in advice.evidence)
    assert advice.line == advice.text  # confident: no "(likely)"


def test_dict_of_short_keys_scaling_with_requests_is_a_request_keyed_cache() -> None:
    holder = Holder(
        "shop.views.PRICES",
        "dict",
        900,
        120,
        ev(key_types=("int",), item_types=("float",), routes=((ORDERS, 120),)),
    )
    advice = one(holder, route_requests={ORDERS: 1000})
    assert advice.shape == REQUEST_KEYED
    assert "Bound shop.views.PRICES" in advice.text and "lru_cache" in advice.text


def test_set_of_request_values() -> None:
    holder = Holder("shop.views.SEEN_IDS", "set", 4000, 500, ev(key_types=("int",)))
    advice = one(holder)
    assert advice.shape == GROWING_SET and "Bound shop.views.SEEN_IDS" in advice.text


def test_list_appended_per_request_becomes_a_bounded_deque() -> None:
    holder = Holder(
        "shop.views.AUDIT_LOG",
        "list",
        5000,
        1000,
        ev(item_types=("str",), roles=("str",), traced=0),
    )
    key = ("/reports/<int:rid>", "GET", "basic")
    advice = one(
        holder,
        Context(suspected=True, suspected_routes=(key,)),
        route_requests={key: 1000},
    )
    assert advice.shape == APPEND_ONLY
    assert "collections.deque(maxlen=" in advice.text and "logging or metrics" in advice.text
    assert advice.confidence == LIKELY  # its entries were not traced to the marked route
    holder = Holder(holder.path, "list", 5000, 1000, ev(item_types=("str",), routes=((key, 990),)))
    advice = one(
        holder, Context(suspected=True, suspected_routes=(key,)), route_requests={key: 1000}
    )
    assert advice.confidence == CONFIDENT and "GET /reports/<int:rid> (basic)" in advice.text


def test_list_appended_on_the_rejection_path_says_so() -> None:
    # 40 % of POST /login are rejected, and the list gains 0.4 entries per request of it
    holder = Holder(
        "logins.FAILED",
        "list",
        800,
        400,
        ev(item_types=("dict",), routes=((LOGIN, 400),), examined=400),
    )
    ctx = Context(
        suspected=True,
        suspected_routes=(LOGIN,),
        outcomes={LOGIN: {"ok": 6000, "rejected": 4000}},
    )
    advice = one(holder, ctx, route_requests={LOGIN: 1000})
    assert advice.shape == APPEND_ONLY
    assert "rejected (401/403) requests of POST /login (basic)" in advice.text
    # AND not when every request of the route appends
    holder = Holder(
        "logins.FAILED",
        "list",
        800,
        1000,
        ev(item_types=("dict",), routes=((LOGIN, 1000),), examined=1000),
    )
    assert "rejected" not in one(holder, ctx, route_requests={LOGIN: 1000}).text


def test_large_buffers() -> None:
    holder = Holder(
        "exports._RECENT", "list", 300, 150, ev(item_types=("bytes",), roles=("bytes",), large=100)
    )
    advice = one(holder)
    assert advice.shape == LARGE_BUFFERS and "deque(maxlen=" in advice.text


def test_set_of_finished_tasks() -> None:
    holder = Holder(
        "orders._BACKGROUND",
        "set",
        500,
        250,
        ev(key_types=("asyncio.Task",), roles=("asyncio task",), done=90),
    )
    advice = one(holder)
    assert advice.shape == TASK_SET and advice.confidence == CONFIDENT
    assert "task.add_done_callback(_BACKGROUND.discard)" in advice.text


def test_logger_handler_list_is_the_logging_registry_fed_by_the_app() -> None:
    # GIVEN the handler list of a logger (the standard library's registry) and logging's own
    # list of every handler, both grown by the same call in the app
    evidence = ev(
        owner=STDLIB,
        module="logging",
        item_types=("payments.RequestContextHandler",),
        roles=("logging handler",),
        sites=("payments.py:51",),
    )
    handlers = Holder("the handlers list of logger 'eval.payments'", "list", 600, 250, evidence)
    registry = Holder(
        "logging._handlerList",
        "list",
        600,
        260,
        ev(owner=STDLIB, module="logging", item_types=("weakref.ReferenceType",)),
    )
    top, each = advise(result([registry, handlers]), Context(suspected=True))
    # THEN both say to configure handlers once, and the logger's own list is the top advice
    assert {a.shape for a in each} == {LOGGER_HANDLERS}
    assert top is not None and top.holder == handlers.path
    assert "logger 'eval.payments'" in top.text and "(at payments.py:51)" in top.text
    assert "once at startup" in top.text
    assert any("owned by the standard library's logging" in e for e in top.evidence)


def test_warning_registry() -> None:
    holder = Holder(
        "aiomysql.cursors.__warningregistry__",
        "dict",
        9000,
        800,
        ev(owner=LIBRARY, module="aiomysql.cursors"),
    )
    advice = one(holder)
    assert advice.shape == WARNING_REGISTRY and "fixed message" in advice.text


def test_metric_children_of_a_library_are_unbounded_labels() -> None:
    # A holder owned by a library (prometheus_client), found by a back-reference chain
    holder = Holder(
        "shop.metrics.REQUESTS._metrics",
        "dict",
        0,
        0,
        Evidence(
            owner=APP, module="shop.metrics", item_types=("prometheus_client.metrics.Counter",)
        ),
    )
    advice = one(holder)
    assert advice.shape == METRIC_LABELS and advice.confidence == LIKELY
    assert advice.line.endswith("(likely)") and "route template" in advice.text


def test_django_signal_receivers() -> None:
    holder = Holder(
        "django.db.models.signals.post_save.receivers",
        "list",
        5000,
        400,
        ev(owner=LIBRARY, module="django.db.models.signals", sites=("shop/views.py:9",)),
    )
    advice = one(holder)
    assert advice.shape == SIGNAL_RECEIVERS and "dispatch_uid" in advice.text


def test_unknown_library_registry_points_at_the_feeding_call() -> None:
    holder = Holder(
        "sqlalchemy.pool.impl._refs",
        "set",
        2000,
        300,
        ev(owner=LIBRARY, module="sqlalchemy.pool.impl", sites=("shop/db.py:14",)),
    )
    advice = one(holder)
    assert advice.shape == LIBRARY_REGISTRY and advice.confidence == LIKELY
    assert "the call in the app that feeds sqlalchemy.pool.impl._refs" in advice.text
    assert "(at shop/db.py:14)" in advice.text and "sqlalchemy expects" in advice.text


def test_function_caches() -> None:
    unbounded = Holder("shop.geo.lookup", "lru_cache", 9000, 900, ev(bound=None))
    assert one(unbounded).shape == UNBOUNDED_CACHE
    method = Holder("shop.geo.Resolver.lookup", "lru_cache", 9000, 900, ev(in_class=True))
    advice = one(method)
    assert advice.shape == METHOD_CACHE and "self" in advice.text
    bounded = Holder("shop.geo.lookup", "lru_cache", 90, 90, ev(bound=128))
    advice = one(bounded)
    assert advice.shape == BOUNDED and advice.stopgap is None


def test_bounded_deque_filling_is_not_a_leak_and_never_the_top_advice_when_clean() -> None:
    holder = Holder("shop.views.RECENT", "deque", 90, 90, ev(bound=128))
    top, each = advise(result([holder]), Context(suspected=False))
    assert each[0].shape == BOUNDED and "Leave shop.views.RECENT" in each[0].text
    assert top is None


def test_exceptions_and_callbacks() -> None:
    errors = Holder("shop.jobs.ERRORS", "list", 500, 100, ev(roles=("exception",)))
    assert one(errors).shape == EXCEPTIONS_KEPT
    hooks = Holder("shop.events.HOOKS", "list", 500, 100, ev(roles=("callable",)))
    assert one(hooks).shape == CALLBACKS


def test_no_python_holder_is_a_native_leak() -> None:
    # GIVEN RSS growth, no holder, and next to nothing retained by Python objects in the window
    window = result(
        [],
        sites=[SiteStat("app/img.py", 7, ["app/img.py:7"], 20_000, 100)],
        extension_modules=["PIL", "lxml"],
    )
    ctx = Context(suspected=True, signal="rss", growth_bytes_per_request=4096.0)
    top, each = advise(window, ctx)
    # THEN the advice says native, how to confirm it, and names no holder
    assert each == [] and top is not None
    assert top.shape == NATIVE and top.holder is None and top.confidence == LIKELY
    assert "memray run --native" in top.text
    assert any("PIL, lxml" in e for e in top.evidence)
    assert top.line.endswith("(likely)")


def test_no_holder_with_a_python_site_names_the_site_not_a_holder() -> None:
    window = result([], sites=[SiteStat("app/jobs.py", 30, ["app/jobs.py:30"], 900_000, 9000)])
    top, _ = advise(window, Context(suspected=True, signal="heap", growth_bytes_per_request=900))
    assert top is not None and top.shape == UNHELD_SITE and top.holder is None
    assert "app/jobs.py:30" in top.text
    top, _ = advise(result([]), Context(suspected=True, signal="heap"))
    assert top is not None and top.shape == NOTHING_RETAINED


def test_before_any_window() -> None:
    top, _ = advise(
        None,
        Context(suspected=True, scales_with="distinct_credentials", suspected_routes=(ORDERS,)),
    )
    assert top is not None and top.shape == UNDIAGNOSED and top.confidence == LIKELY
    assert "cache keyed by the credential on GET api/orders/ (bearer)" in top.text
    top, _ = advise(None, Context(suspected=True))
    assert top is not None and "POST /memwatch/diagnose" in top.text
    assert advise(None, Context(suspected=False)) == (None, [])


@pytest.mark.parametrize(
    "shape_holder",
    [
        Holder("a.B", "dict", 10, 10, ev(token_like=1.0, key_types=("str",))),
        Holder("a.B", "list", 10, 10, ev(item_types=("dict",))),
        Holder("a.B", "set", 10, 10, ev(key_types=("asyncio.Task",), roles=("asyncio task",))),
        Holder("the handlers list of logger 'x'", "list", 10, 10, ev(roles=("logging handler",))),
    ],
)
def test_containment_is_a_stopgap_never_the_fix(shape_holder: Holder) -> None:
    advice = one(shape_holder)
    assert "max-requests" not in advice.text and "max-requests" in (advice.stopgap or "")
    assert advice.stopgap == STOPGAP and "not a fix" in STOPGAP


# --- evidence from real containers (holders.describe), without their values ----------------


def test_token_like() -> None:
    # Seeded tokens: the vowel-share rule misses about 7 % of random 43-character base64url
    # tokens (a random one failed this test about once in 14 runs), and every hex digest passes.
    rng = random.Random(5)
    urlsafe = [
        base64.urlsafe_b64encode(rng.randbytes(32)).rstrip(b"=").decode() for _ in range(2000)
    ]
    hexes = [rng.randbytes(20).hex() for _ in range(500)]
    assert sum(map(token_like, urlsafe)) >= 0.9 * len(urlsafe)
    assert all(map(token_like, hexes))
    assert not token_like("user-0042")
    assert not token_like("/reports/12/summary/for/this/user")
    assert not token_like("login user=user-0001 method=GET path=/reports/1")


def test_describe_a_dict_keyed_by_tokens_keeps_no_key() -> None:
    rng = random.Random(11)  # base64url tokens, seeded: token_like misses a few percent
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    tokens = ["".join(rng.choice(alphabet) for _ in range(64)) for _ in range(50)]
    cache = {"warm": {"sub": "x"}}
    cache.update({t: {"sub": f"user-{i}"} for i, t in enumerate(tokens)})
    evidence = describe(Ref(__name__, cache), growth=50)
    assert evidence.owner == APP and evidence.examined == 50
    assert evidence.key_types == ("str",) and evidence.item_types == ("dict",)
    assert (evidence.token_like or 0) >= 0.9 and evidence.str_lengths == (64, 64, 64)
    assert not any(t in repr(evidence) for t in tokens)


def test_describe_lists_deques_sets_of_tasks_and_sizes() -> None:
    records = [{"user": "u", "at": 1.0} for _ in range(30)] + [b"x" * 4096 for _ in range(20)]
    evidence = describe(Ref(__name__, records), growth=20)
    assert evidence.item_types == ("bytes",) and evidence.large == 20
    bounded = collections.deque(maxlen=64)
    bounded.extend(range(40))
    assert describe(Ref(__name__, bounded), growth=40).bound == 64

    async def tasks() -> set[asyncio.Task[None]]:
        made = {asyncio.create_task(asyncio.sleep(0)) for _ in range(12)}
        await asyncio.sleep(0.01)
        return made

    kept = asyncio.run(tasks())
    evidence = describe(Ref(__name__, kept), growth=12)
    assert evidence.roles[0] == "asyncio task" and evidence.done == 12
    assert evidence.key_types == ("asyncio.Task",)


def test_describe_places_new_entries_with_the_origin_it_is_given() -> None:
    # tracemalloc tells new entries (allocated while tracing) from old ones
    old = [object() for _ in range(5)]
    tracemalloc.start(4)
    try:
        new = [types.SimpleNamespace(n=i) for i in range(10)]
        holder = old + new

        def origin(obj: Any) -> tuple[Any, str | None]:
            tb = tracemalloc.get_object_traceback(obj)
            return (("/x", "GET", "anonymous"), "here.py:1") if tb is not None else (None, None)

        evidence = describe(Ref(__name__, holder), growth=10, origin=origin)
    finally:
        tracemalloc.stop()
    assert evidence.traced == 10 and evidence.routes == ((("/x", "GET", "anonymous"), 10),)
    assert evidence.sites == ("here.py:1",)


def test_owner_of_modules() -> None:
    import objgraph

    assert objgraph.__name__ in sys.modules
    assert owner_of(__name__) == APP
    assert owner_of("logging") == STDLIB
    assert owner_of("objgraph") == LIBRARY
    assert owner_of("sys") == STDLIB
    assert owner_of(None) == "unknown"


def test_census_keeps_references_only_when_asked() -> None:
    assert take_census().refs == {}
    refs = take_census(keep=True).refs
    assert refs[f"{__name__}.CENSUS_PROBE"].obj is CENSUS_PROBE


CENSUS_PROBE: list[int] = []


# --- end to end in process: a real app, a real window, the report, the page, the CLI ---------

TOKEN_CACHE: dict[str, dict[str, str]] = {}


def token_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    token = environ.get("HTTP_AUTHORIZATION", "")[7:]
    if token not in TOKEN_CACHE:
        TOKEN_CACHE[token] = {"sub": "user", "scope": "read"}
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


@pytest.fixture
def wrapped() -> Iterator[Any]:
    TOKEN_CACHE.clear()
    app = memwatch.wrap(token_app, diagnosis="off", diagnosis_requests=200)
    yield app
    TOKEN_CACHE.clear()


def test_report_page_and_cli_carry_the_advice_and_never_a_token(wrapped: Any) -> None:
    tokens = [secrets.token_urlsafe(40) for _ in range(400)]

    def script() -> inprocess.Script:
        for token in tokens[:100]:
            yield _request(token)
        wrapped.memwatch.diagnose()  # a real window, as POST /memwatch/diagnose opens
        for token in tokens[100:]:
            yield _request(token)
        # the window finishes on its own thread, driven by requests: keep them coming
        deadline = time.monotonic() + 30
        extra = 0
        while wrapped.memwatch.monitor.diagnosis.windows == 0 and time.monotonic() < deadline:
            extra += 1
            yield _request(f"again-{extra % 50}")
            time.sleep(0.002)
        return {}

    inprocess.run_script(wrapped, script())
    report = wrapped.memwatch.report()
    assert report.roots, report.diagnosis
    root = report.roots[0]
    assert root.path == f"{__name__}.TOKEN_CACHE"
    assert root.advice_detail is not None and root.advice_detail["shape"] == CREDENTIAL_KEYED
    assert root.advice is not None and "lru_cache(maxsize=" in root.advice
    body = to_json(report).decode()
    page = html.render(report)
    text = format_report(json.loads(body))
    assert f"{__name__}.TOKEN_CACHE" in page and "advice:" in text
    for output in (body, page, text):
        assert not any(t in output for t in tokens)


def _request(token: str) -> inprocess.Request:
    headers = {"Host": "127.0.0.1", "Authorization": f"Bearer {token}"}
    return inprocess.Request("GET", "/me", headers, None, ("/me", "GET", "bearer"), False)


def test_leak_section_advice_only_when_suspected() -> None:
    m = Monitor(Config(), signals=make_signals(), clock=FakeClock(), rng=random.Random(1))
    holder = Holder("a.LOG", "list", 100, 100, ev(item_types=("str",)))
    m.diagnosis.last = result([holder])
    report = build_report(m.snapshot(), now=1_795_000_000.0)
    assert report.leak.advice is None and report.roots[0].advice is not None
    m.detector.verdict.suspected = True
    m.detector.verdict.signal = "heap"
    report = build_report(m.snapshot(), now=1_795_000_000.0)
    assert report.leak.advice == report.roots[0].advice
    assert report.leak.advice_detail is not None
    assert report.leak.advice_detail["stopgap"] == STOPGAP
    cli = format_report(json.loads(to_json(report)))
    assert "Advice: Replace a.LOG" in cli and "Stopgap" in cli
    page = html.render(report)
    assert 'id="advice"' in page and "Stopgap" in page


def test_leak_warning_carries_the_advice_then_the_window_s_advice_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # GIVEN a monitor whose heap grows with every request (diagnosis off: no window yet)
    clock = FakeClock()
    served = [0]
    m = Monitor(
        Config(warmup_requests=0, sample_every_requests=10, diagnosis="off"),
        signals=make_signals(heap=lambda: 50_000 + 40 * served[0]),
        clock=clock,
        rng=random.Random(3),
    )
    caplog.set_level(logging.WARNING, logger="memwatch")
    for _ in range(6000):
        served[0] += 1
        clock.advance(0.01)
        probe = m.request_entry()
        m.request_exit("/me", "GET", "bearer", None, 200, probe)
        if m.detector.verdict.suspected:
            break
    assert m.detector.verdict.suspected
    # THEN the one-time leak warning carries the (thin, likely) advice
    warned = [r for r in caplog.records if getattr(r, "memwatch_event", "") == "leak_suspected"]
    assert len(warned) == 1
    assert "advice: Open a diagnosis window" in warned[0].getMessage()
    assert warned[0].memwatch_advice["shape"] == UNDIAGNOSED  # type: ignore[attr-defined]
    # WHEN a window then finds the holder, its advice is logged once, not on later windows
    window = result([Holder("a.LOG", "list", 900, 900, ev(item_types=("str",)))])
    assert m.diagnosis.on_result is not None
    m.diagnosis.last = window  # as Diagnosis does before it calls on_result
    m.diagnosis.on_result(window)
    m.diagnosis.on_result(window)
    followed = [r for r in caplog.records if getattr(r, "memwatch_event", "") == "leak_advice"]
    assert len(followed) == 1 and "Replace a.LOG" in followed[0].getMessage()
    assert "not a fix" in followed[0].getMessage()


def test_warning_registry_holder_is_found_by_the_census() -> None:
    # A real library-shaped registry: warnings with variable text fill a module's registry
    module = types.ModuleType("shop_warnings_probe")
    module.__file__ = __file__
    sys.modules[module.__name__] = module
    try:
        code = compile("def warn(i):\n    warnings.warn(f'bad value {i}')\n", __file__, "exec")
        exec(code, module.__dict__)
        module.__dict__["warnings"] = warnings
        with warnings.catch_warnings(record=True):  # recorded, not shown: the registry fills
            warnings.simplefilter("default")
            before = take_census()
            for i in range(40):
                module.warn(i)
            after = take_census(keep=True)
        path = f"{module.__name__}.__warningregistry__"
        grown_by = after.lengths[path][1] - before.lengths.get(path, ("dict", 0))[1]
        assert grown_by >= 40
        advice = advise_holder(
            Holder(
                path, "dict", after.lengths[path][1], grown_by, describe(after.refs[path], grown_by)
            ),
            None,
            Context(suspected=True),
        )
        assert advice.shape == WARNING_REGISTRY
    finally:
        del sys.modules[module.__name__]


def test_lru_cache_holder_evidence_has_its_bound() -> None:
    @functools.cache
    def unbounded(x: int) -> int:
        return x

    @functools.lru_cache(maxsize=16)
    def bounded(x: int) -> int:
        return x

    assert describe(Ref(__name__, unbounded), 5).bound is None
    assert describe(Ref(__name__, bounded), 5).bound == 16
