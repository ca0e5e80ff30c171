"""The per-request recorder: the compiled one gives exactly the records of the Python reference.

Every request that is neither measured nor in a diagnosis window is recorded by
``monitor.recorder`` (memwatch/recorder.py). The C recorder decides the common cases itself and
hands every other one to the reference: these tests drive both with the same requests, fixed
and generated (every auth scheme, blanks, non-ASCII bytes, repeated headers, huge values,
unusual types), and compare the queued records field by field.
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from memwatch.auth import AuthClassifier
from memwatch.config import Config
from memwatch.recorder import PyRecorder, compiled_available, make_recorder
from memwatch.sketch import Fingerprinter

needs_compiled = pytest.mark.skipif(
    not compiled_available() or not Config.from_env().speedups,
    reason="memwatch._speedups is not built (no C compiler?) or MEMWATCH_SPEEDUPS=0",
)

Record = tuple[Any, ...]


def test_compiled_recorder_is_built_where_make_test_runs() -> None:
    # `make test` installs with a compiler present: the C path must be there and in use, or
    # the speed figures in docs/performance.md would be measuring the fallback. Set
    # MEMWATCH_TEST_NO_COMPILER=1 where the package was deliberately installed without it.
    if os.environ.get("MEMWATCH_TEST_NO_COMPILER") == "1":
        pytest.skip("installed without the compiled recorder on purpose")
    assert compiled_available()


def recorders(
    config: Config | None = None, key: bytes | None = None
) -> tuple[Any, Any, collections.deque[Record], collections.deque[Record]]:
    config = config or Config()
    classifier = AuthClassifier(config)
    fingerprinter = Fingerprinter(key)
    fast_queue: collections.deque[Record] = collections.deque()
    slow_queue: collections.deque[Record] = collections.deque()
    fast = make_recorder(fast_queue.append, classifier, fingerprinter)
    slow = PyRecorder(slow_queue.append, classifier, fingerprinter)
    return fast, slow, fast_queue, slow_queue


def scope_of(headers: list[tuple[bytes, bytes]], query: bytes = b"", **extra: Any) -> Any:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/x",
        "query_string": query,
        "headers": headers,
    }
    scope.update(extra)
    return scope


def environ_of(headers: dict[str, Any], query: Any = "", **extra: Any) -> dict[str, Any]:
    environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/x", "QUERY_STRING": query}
    for name, value in headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    environ.update(extra)
    return environ


def outcome(call: Any, queue: collections.deque[Record]) -> tuple[str, Any]:
    """What a recorder did: the records it queued, or the type of what it raised (the
    middleware counts that as an internal error; both paths must raise alike)."""
    try:
        call()
    except Exception as exc:
        return "raised", type(exc)
    return "queued", list(queue)


def same_scope(scope: Any, config: Config | None = None, key: bytes | None = None) -> Record:
    fast, slow, fast_queue, slow_queue = recorders(config, key)
    got = outcome(lambda: fast.record_scope(scope, "/t", None, 200), fast_queue)
    expected = outcome(lambda: slow.record_scope(scope, "/t", None, 200), slow_queue)
    assert got == expected
    return fast_queue[0] if fast_queue else ()


def same_environ(environ: Any, config: Config | None = None, key: bytes | None = None) -> Record:
    fast, slow, fast_queue, slow_queue = recorders(config, key)
    got = outcome(lambda: fast.record_environ(environ, None, "/x", "200 OK"), fast_queue)
    expected = outcome(lambda: slow.record_environ(environ, None, "/x", "200 OK"), slow_queue)
    assert got == expected
    return fast_queue[0] if fast_queue else ()


TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"

# (headers, query): one case per branch of the compiled path and of its hand-backs.
CASES: list[tuple[dict[str, str], str, str]] = [
    ({}, "", "anonymous"),
    ({"Authorization": "Bearer " + TOKEN}, "", "bearer"),
    ({"Authorization": "Bearer " + TOKEN, "Cookie": "sessionid=abc"}, "", "bearer"),
    ({"Authorization": "bearer " + TOKEN}, "", "bearer"),  # lower-case scheme: reference
    ({"Authorization": "Bearer  " + TOKEN}, "", "bearer"),  # two spaces: reference
    ({"Authorization": "Bearer " + TOKEN + " "}, "", "bearer"),  # trailing blank: reference
    ({"Authorization": "Bearer \x1c" + TOKEN}, "", "bearer"),  # a blank only str.isspace knows
    ({"Authorization": "Bearer é" + TOKEN}, "", "bearer"),  # non-ASCII: reference
    ({"Authorization": "Bearer "}, "", "bearer"),  # a scheme without a credential
    ({"Authorization": "   "}, "", "anonymous"),
    ({"Authorization": "Basic YWxpY2U6c2VjcmV0"}, "", "basic"),
    ({"Authorization": 'Digest username="alice", nonce="n1"'}, "", "digest"),
    ({"Authorization": "Token abc"}, "", "apikey"),
    ({"Authorization": "Negotiate abc"}, "", "other"),
    ({"X-Api-Key": "k-123"}, "", "apikey"),
    ({"X-Api-Key": ""}, "", "anonymous"),
    ({"X-Api-Key": "ké"}, "", "apikey"),
    ({"X-Api-Key": "k" * 9000}, "", "apikey"),  # over the bound: the reference cuts it
    ({"Api-Key": "k1", "X-Api-Key": "k2"}, "", "apikey"),
    ({}, "access_token=t1&x=1", "bearer"),
    ({}, "fields=name&page=2", "anonymous"),
    ({}, "ACCESS_TOKEN=T1", "bearer"),
    ({}, "monkey=1", "anonymous"),  # "key=" inside another name: reference says no
    ({"Cookie": "theme=dark; sessionid=s1"}, "", "session"),
    ({"Cookie": "theme=dark; csrftoken=x"}, "", "anonymous"),
    ({"Cookie": "SessionID=S1"}, "", "session"),
    ({"Cookie": "xsessionid=1"}, "", "anonymous"),
    ({"Cookie": "sessionid="}, "", "session"),  # the cookie without a value
    ({"Authorization": "Bearer " + TOKEN}, "access_token=t1", "bearer"),
]


@needs_compiled
@pytest.mark.parametrize(("headers", "query", "auth"), CASES)
def test_asgi_records_match_the_reference(headers: dict[str, str], query: str, auth: str) -> None:
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    record = same_scope(scope_of(raw, query.encode("latin-1")))
    assert record[3] == auth
    if auth == "anonymous":
        assert record[5] is None


@needs_compiled
@pytest.mark.parametrize(("headers", "query", "auth"), CASES)
def test_wsgi_records_match_the_reference(headers: dict[str, str], query: str, auth: str) -> None:
    record = same_environ(environ_of(headers, query))
    assert record[3] == auth
    if auth == "anonymous":
        assert record[5] is None


@needs_compiled
def test_record_fields_are_passed_through() -> None:
    fast, _slow, queue, _ = recorders()
    scope = scope_of([(b"authorization", b"Bearer " + TOKEN.encode())], method="PATCH")
    fast.record_scope(scope, "/items/{id}", None, 404)
    fast.record_environ(environ_of({}, REQUEST_METHOD="DELETE"), None, "/raw", "500 Oops")
    first, second = queue
    assert first[:5] == ("/items/{id}", None, "PATCH", "bearer", 404)
    assert isinstance(first[5], int) and 0 <= first[5] < 2**64
    assert second == (None, "/raw", "DELETE", "anonymous", "500 Oops", None)


@needs_compiled
def test_the_same_credential_gives_the_same_fingerprint_through_both_protocols() -> None:
    fast, _slow, queue, _ = recorders()
    fast.record_scope(scope_of([(b"authorization", b"Bearer " + TOKEN.encode())]), "/t", None, 200)
    fast.record_environ(environ_of({"Authorization": "Bearer " + TOKEN}), "/t", None, "200 OK")
    fast.record_scope(scope_of([(b"x-api-key", TOKEN.encode())]), "/t", None, 200)
    assert queue[0][5] == queue[1][5] == queue[2][5]
    fast.record_scope(scope_of([(b"authorization", b"Bearer other")]), "/t", None, 200)
    assert queue[3][5] != queue[0][5]


@needs_compiled
def test_reference_fingerprints_with_an_explicit_key() -> None:
    # An explicit key means BLAKE2b fingerprints: the compiled path must use the reference.
    record = same_scope(scope_of([(b"authorization", b"Bearer abc")]), key=b"k" * 16)
    assert record[5] == Fingerprinter(b"k" * 16).fingerprint("abc")


@needs_compiled
@pytest.mark.parametrize(
    "scope",
    [
        pytest.param(
            scope_of([(b"cookie", b"a=1"), (b"cookie", b"sessionid=s")]), id="cookie crumbs"
        ),
        pytest.param(scope_of([[b"authorization", b"Bearer abc"]]), id="list pair"),
        pytest.param(scope_of([(bytearray(b"x-api-key"), b"k")]), id="bytearray name"),
        pytest.param(scope_of(((b"authorization", b"Bearer abc"),)), id="tuple headers"),
        pytest.param(scope_of(iter([(b"authorization", b"Bearer abc")])), id="iterator headers"),
        pytest.param(scope_of([], query=bytearray(b"token=1")), id="bytearray query"),
        pytest.param(
            scope_of([(b"accept", "text/html"), (b"authorization", b"Bearer abc")]),
            id="str value of a header nobody reads",
        ),
        pytest.param(scope_of([(b"accept", None)]), id="None value of a header nobody reads"),
        pytest.param(scope_of([(b"authorization", "Bearer abc")]), id="str authorization"),
        pytest.param(scope_of([(b"x-api-key", bytearray(b"k"))]), id="bytearray api key"),
        pytest.param(scope_of([(b"cookie", "sessionid=s")]), id="str cookie"),
        pytest.param(scope_of([], method=""), id="empty method"),
        pytest.param(scope_of([], method=None), id="no method"),
        pytest.param(scope_of([], method=b"PATCH"), id="bytes method"),
        pytest.param(collections.OrderedDict(scope_of([(b"x-api-key", b"k")])), id="dict subclass"),
        pytest.param({"type": "http"}, id="bare scope"),
    ],
)
def test_unusual_scopes_match_the_reference(scope: Any) -> None:
    if isinstance(scope.get("headers"), type(iter([]))):
        # An iterator is consumed by the first reader: give each recorder its own.
        fast, slow, fast_queue, slow_queue = recorders()
        fast.record_scope(scope_of(iter([(b"authorization", b"Bearer abc")])), "/t", None, 200)
        slow.record_scope(scope_of(iter([(b"authorization", b"Bearer abc")])), "/t", None, 200)
        assert list(fast_queue) == list(slow_queue)
        return
    same_scope(scope)


@needs_compiled
@pytest.mark.parametrize(
    "environ",
    [
        pytest.param(environ_of({"Authorization": b"Bearer abc"}), id="bytes header"),
        pytest.param(environ_of({"Authorization": None}), id="None header"),
        pytest.param(environ_of({"X-Api-Key": 12345}), id="int api key"),
        pytest.param(environ_of({}, query=None), id="None query"),
        pytest.param(environ_of({"Cookie": "sessionid=é"}), id="non-ASCII cookie"),
        pytest.param(environ_of({}, REQUEST_METHOD=""), id="empty method"),
        pytest.param(environ_of({}, REQUEST_METHOD=b"PUT"), id="bytes method"),
        pytest.param(collections.OrderedDict(environ_of({"X-Api-Key": "k"})), id="dict subclass"),
    ],
)
def test_unusual_environs_match_the_reference(environ: Any) -> None:
    same_environ(environ)


@needs_compiled
def test_a_classifier_that_fails_propagates_and_queues_nothing() -> None:
    class Broken(AuthClassifier):
        def from_scope(self, scope: object) -> tuple[str, str | None]:
            raise RuntimeError("broken")

    queue: collections.deque[Record] = collections.deque()
    fast = make_recorder(queue.append, Broken(Config()), Fingerprinter())
    with pytest.raises(RuntimeError, match="broken"):
        fast.record_scope(scope_of([(b"authorization", b"Basic abc")]), "/t", None, 200)
    assert not queue
    # The fast path does not consult the classifier at all.
    fast.record_scope(scope_of([(b"authorization", b"Bearer abc")]), "/t", None, 200)
    assert len(queue) == 1


def test_speedups_false_keeps_the_python_path() -> None:
    from memwatch.monitor import Monitor

    assert isinstance(Monitor(Config(speedups=False)).recorder, PyRecorder)
    if compiled_available():
        assert not isinstance(Monitor(Config()).recorder, PyRecorder)


# --- generated requests ---------------------------------------------------------------------

latin1 = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=40)
prefixes = st.sampled_from(
    ["Bearer ", "bearer ", "Basic ", "Digest ", "Token ", "Bearer", "", " Bearer ", "BEARER\t"]
)
names = st.sampled_from(
    ["authorization", "x-api-key", "api-key", "cookie", "accept", "x-auth-token", "host"]
)
values = st.one_of(
    st.builds(lambda p, v: p + v, prefixes, latin1),
    st.builds(lambda n, v: n + "=" + v, st.sampled_from(["sessionid", "theme", "SESSION"]), latin1),
    latin1,
)
queries = st.one_of(
    st.just(""),
    latin1,
    st.builds(lambda n, v: n + "=" + v, st.sampled_from(["token", "Access_Token", "page"]), latin1),
)
header_lists = st.lists(st.tuples(names, values), max_size=6)
SETTINGS = settings(deadline=None, max_examples=300)


@needs_compiled
@SETTINGS
@given(headers=header_lists, query=queries)
@example(headers=[("authorization", "Bearer " + "t" * 8200)], query="")
@example(headers=[("x-api-key", ""), ("api-key", "second")], query="")
def test_property_asgi_matches_the_reference(headers: list[tuple[str, str]], query: str) -> None:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    same_scope(scope_of(raw, query.encode("latin-1")))


@needs_compiled
@SETTINGS
@given(headers=st.dictionaries(names, values, max_size=5), query=queries)
def test_property_wsgi_matches_the_reference(headers: dict[str, str], query: str) -> None:
    same_environ(environ_of(headers, query))


@needs_compiled
@SETTINGS
@given(headers=header_lists, query=queries)
def test_property_configured_names_match_the_reference(
    headers: list[tuple[str, str]], query: str
) -> None:
    config = Config(
        apikey_headers=("x-auth-token", "authorization-key"),
        session_cookies=("theme",),
        query_credentials=("page", "token"),
    )
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    same_scope(scope_of(raw, query.encode("latin-1")), config)
    same_environ(environ_of(dict(headers), query), config)


@needs_compiled
@pytest.mark.parametrize("length", [1, 9, 62, 63, 64, 100])
def test_api_key_names_of_any_length_match_the_reference(length: int) -> None:
    # The compiled scan compares names only for header lengths some API-key name has (one bit
    # per length, lengths from 63 up sharing the last bit).
    name = ("k" * length)[:length]
    longer = name + "x"
    config = Config(apikey_headers=(name, "x-" + "y" * 70))
    for headers, auth in (
        ([(name, "secret-1")], "apikey"),
        ([(longer, "secret-2"), ("accept", "a" * length)], "anonymous"),
        ([("a" * length, "no key"), (name, "secret-3")], "apikey"),
    ):
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        assert auth in same_scope(scope_of(raw, b""), config)
        assert auth in same_environ(environ_of(dict(headers), ""), config)


# --- measured requests ------------------------------------------------------------------------

MEASURED_HEADERS: list[list[tuple[str, str]]] = [
    [("authorization", "Bearer tok-" + "a" * 30)],
    [("x-api-key", "key-123")],
    [("authorization", "Basic YWxpY2U6c2VjcmV0")],
    [("cookie", "theme=dark; sessionid=s-42")],
    [("accept", "*/*")],
    [("authorization", "Bearer  spaced ")],
    [("authorization", "Bearer caf\xe9")],
]


def _measured_run(
    protocol: str, speedups: bool
) -> tuple[list[tuple[Any, ...]], int, list[tuple[Any, ...]], list[int | None]]:
    """Every request measured (request_sample_rate=1): what record_measured received, with
    each fingerprint checked against the credential the Python classifier finds, and how many
    requests went through the middleware's Python finish()."""
    from prometheus_client import CollectorRegistry

    import memwatch
    from tests.apps.support import call_asgi, make_scope

    options: dict[str, Any] = dict(
        registry=CollectorRegistry(),
        log_startup=False,
        request_sample_rate=1.0,
        warmup_requests=0,
        speedups=speedups,
    )
    python_finishes = [0]

    if protocol == "asgi":

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 201, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        class CountingASGI(memwatch.ASGIMiddleware):
            def finish(self, *args: Any, **kwargs: Any) -> None:
                python_finishes[0] += 1
                super().finish(*args, **kwargs)

        mw: Any = CountingASGI(app, **options)
    else:

        def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            start_response("201 Created", [])
            return [b"ok"]

        class CountingWSGI(memwatch.WSGIMiddleware):
            def finish(self, *args: Any, **kwargs: Any) -> None:
                python_finishes[0] += 1
                super().finish(*args, **kwargs)

        mw = CountingWSGI(wsgi_app, **options)
    monitor = mw.monitor
    seen: list[tuple[Any, ...]] = []
    original = monitor.record_measured

    def record_measured(*args: Any) -> Any:
        template, path, method, auth, status, fingerprint, probe = args
        seen.append((template, path, method, auth, status, fingerprint, probe is not None))
        return original(*args)

    monitor.record_measured = record_measured
    expected_fingerprints = []
    for i in range(60):
        headers = MEASURED_HEADERS[i % len(MEASURED_HEADERS)]
        query = "token=q-1" if i % 11 == 0 else ""
        if protocol == "asgi":
            scope = make_scope(
                f"/items/{i % 3}",
                headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
                query=query.encode(),
            )
            _, credential = monitor.auth.from_scope(scope)
            asyncio.run(call_asgi(mw, scope))
        else:
            environ = environ_of(dict(headers), query, PATH_INFO=f"/items/{i % 3}")
            _, credential = monitor.auth.from_environ(environ)
            body = mw(environ, lambda status, headers, exc_info=None: None)
            b"".join(body)
            body.close()
        expected_fingerprints.append(monitor.fingerprint(credential) if credential else None)
    # Fingerprints are keyed per instance: compared as present or not across instances, and
    # with this instance's own fingerprints of the credentials by the caller.
    records = [(*record[:5], record[5] is not None, record[6]) for record in seen]
    return records, python_finishes[0], seen, expected_fingerprints


@needs_compiled
@pytest.mark.parametrize("protocol", ["asgi", "wsgi"])
def test_measured_requests_take_the_compiled_path_and_record_as_the_python_one(
    protocol: str,
) -> None:
    fast, fast_finishes, seen, expected = _measured_run(protocol, speedups=True)
    slow, slow_finishes, _, _ = _measured_run(protocol, speedups=False)
    # The same requests measured, with the same labels, through either path.
    assert len(fast) >= 20
    assert fast == slow
    # Measured requests no longer go through the middleware's Python finish() ...
    assert slow_finishes == 60
    assert fast_finishes == 0
    # ... and their fingerprints are the ones the Python classifier's credential gives.
    fingerprints = {fp for *_, fp, _probe in seen if fp is not None}
    assert fingerprints and fingerprints <= {fp for fp in expected if fp is not None}


# --- the compiled WSGI path -------------------------------------------------------------------


def _wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def _wsgi_get(mw: Any, path: str) -> None:
    """One GET through a WSGI middleware, body read and closed, as a server does."""
    response = mw(environ_of({}, PATH_INFO=path), lambda status, headers: None)
    list(response)
    response.close()


async def _asgi_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _receive_request() -> Any:
    return {"type": "http.request"}


async def _discard(message: Any) -> None:
    pass


def _asgi_get(mw: Any, path: str) -> None:
    """One GET through an ASGI middleware, the response discarded."""
    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""}
    asyncio.run(mw(scope, _receive_request, _discard))


def _middleware_pair() -> tuple[Any, Any]:
    """An ASGI and a WSGI middleware around the apps above: no start-up log, no measured
    requests (so that every request takes the path the test is about)."""
    import memwatch

    options = {"log_startup": False, "request_sample_rate": 0.0}
    asgi = memwatch.ASGIMiddleware(_asgi_app, **options)
    wsgi = memwatch.WSGIMiddleware(_wsgi_app, **options)
    return asgi, wsgi


@needs_compiled
def test_wsgi_middleware_is_served_by_the_compiled_base() -> None:
    import memwatch
    from memwatch._speedups import WSGIBase, WSGIResponse

    mw = memwatch.WSGIMiddleware(_wsgi_app, log_startup=False, request_sample_rate=0.0)
    assert type(mw).__call__ is WSGIBase.__call__
    seen: list[str] = []
    body = mw({"PATH_INFO": "/x", "REQUEST_METHOD": "GET"}, lambda s, h, e=None: seen.append(s))
    assert type(body) is WSGIResponse and list(body) == [b"ok"] and seen == ["200 OK"]
    body.close()  # type: ignore[attr-defined]
    snapshot = mw.monitor.snapshot()
    assert snapshot.counts == {("/x", "GET", "anonymous", "ok"): 1}
    # Closed: the app's start_response must not reach the server any more.
    with pytest.raises(RuntimeError, match="after the response was closed"):
        body("200 OK", [])  # type: ignore[operator]


@needs_compiled
def test_wsgi_setting_the_app_later_is_honoured() -> None:
    import memwatch

    mw = memwatch.WSGIMiddleware(_wsgi_app, log_startup=False)

    def other(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("201 Created", [])
        return [b"other"]

    mw.app = other
    body = mw({"PATH_INFO": "/x"}, lambda s, h, e=None: None)
    assert list(body) == [b"other"]


_PURE_SUITES = [
    "test_wsgi.py",
    "test_asgi.py",
    "test_frameworks_flask.py",
    "test_frameworks_starlette.py",
    "test_frameworks_django.py",
    "test_faults.py",
    "test_endpoints.py",
    "test_recorder.py",
    "test_sketch.py",
]
# Runs pytest with memwatch._speedups unimportable, as where no compiler built it.
_WITHOUT_MODULE = (
    "import sys; sys.modules['memwatch._speedups'] = None; import pytest; "
    "sys.exit(pytest.main(sys.argv[1:]))"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "env"),
    [
        pytest.param(["-m", "pytest"], {"MEMWATCH_SPEEDUPS": "0"}, id="speedups=0"),
        pytest.param(["-c", _WITHOUT_MODULE], {"MEMWATCH_TEST_NO_COMPILER": "1"}, id="not built"),
    ],
)
def test_pure_python_path_passes_the_middleware_suites(how: list[str], env: dict[str, str]) -> None:
    # The middleware, endpoint and framework suites on the Python path: chosen with
    # MEMWATCH_SPEEDUPS=0, and with the compiled module missing altogether (no compiler at
    # install time). The Python path is the reference and must stay correct on its own.
    import subprocess
    import sys
    from pathlib import Path

    if "--pure-python-child" in sys.argv:
        pytest.skip("already the child run")
    tests = Path(__file__).resolve().parent
    result = subprocess.run(
        [sys.executable, *how, "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow"]
        + [str(tests / name) for name in _PURE_SUITES],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_wrapped_apps_keep_their_protocol_signature() -> None:
    # The compiled __call__ is a slot that inspect cannot read: the instances carry the WSGI
    # signature so that wrapping a wrapped app (or asgiref) still tells WSGI from ASGI.
    import inspect

    import memwatch

    mw = memwatch.wrap(_wsgi_app, log_startup=False)
    assert list(inspect.signature(mw).parameters) == ["environ", "start_response"]
    assert memwatch.detect_protocol(mw) == "wsgi"
    assert isinstance(memwatch.wrap(mw, log_startup=False), memwatch.WSGIMiddleware)
    assert "app" in inspect.signature(memwatch.WSGIMiddleware).parameters


# --- tally mode: the compiled recorder counts, the monitor's drain folds it in -------------------


def _keyed_monitor(speedups: bool, fingerprinter: Fingerprinter | None = None) -> Any:
    from memwatch.monitor import Monitor

    monitor = Monitor(Config(speedups=speedups))
    # The same fingerprints in both monitors (by default BLAKE2b with a fixed key): their
    # sketches and first-seen counts must then agree bit for bit.
    monitor._fingerprinter = fingerprinter or Fingerprinter(b"k" * 16)
    monitor.fingerprint = monitor._fingerprinter.fingerprint
    monitor._reset_state()
    return monitor


@needs_compiled
@pytest.mark.parametrize("hashing", ["blake2b", "compiled hash"])
def test_tallied_requests_fold_into_the_same_state_as_queued_ones(hashing: str) -> None:
    import random

    rng = random.Random(7)
    # "compiled hash": one unkeyed Fingerprinter shared by both monitors; the compiled
    # recorder hashes the credentials it decides itself (with the Fingerprinter's key), the
    # Python one calls the Fingerprinter: both must give every credential the same value.
    shared = Fingerprinter(b"k" * 16) if hashing == "blake2b" else Fingerprinter()
    assert (shared.hash_key is None) == (hashing == "blake2b")
    fast, slow = _keyed_monitor(True, shared), _keyed_monitor(False, shared)
    assert not isinstance(fast.recorder, PyRecorder) and isinstance(slow.recorder, PyRecorder)
    routes = ["/a/{id}", "/b", None]
    for i in range(5000):
        token = f"tok-{rng.randrange(800)}".encode()
        headers = rng.choice(
            [
                [(b"authorization", b"Bearer " + token)],
                [(b"x-api-key", token)],
                [(b"authorization", b"Basic " + token)],
                [(b"cookie", b"sessionid=" + token)],
                [],
            ]
        )
        scope = scope_of(headers, method=rng.choice(["GET", "POST", "BREW"]))
        template = rng.choice(routes)
        path = None if template else f"/raw/{rng.randrange(5)}"
        status = rng.choice([200, 200, 200, 404, 401, 500])
        for monitor in (fast, slow):
            if i % 3:
                monitor.recorder.record_scope(scope, template, path, status)
            else:
                environ = environ_of({}, REQUEST_METHOD=scope["method"])
                for name, value in headers:
                    environ["HTTP_" + name.decode().upper().replace("-", "_")] = value.decode()
                monitor.recorder.record_environ(environ, template, path, f"{status} X")
        if i % 777 == 0:
            fast.drain()
            slow.drain()
    fast.drain()
    slow.drain()
    assert fast.requests == slow.requests == 5000
    assert fast._counts == slow._counts
    for scheme, sketch in slow._sketches.items():
        assert fast._sketches[scheme].registers == sketch.registers, scheme
    assert fast.first_seen == slow.first_seen > 0
    assert fast.recorder.take() == ({}, [], 0)  # drained: nothing left over


@needs_compiled
def test_the_tally_is_rebuilt_with_the_state_it_counts_into() -> None:
    monitor = _keyed_monitor(True)
    monitor.recorder.record_scope(scope_of([(b"authorization", b"Bearer a")]), "/t", None, 200)
    old = monitor.recorder
    monitor._reset_state()  # as after a fork: fresh sketches, a fresh recorder
    assert monitor.recorder is not old
    monitor.recorder.record_scope(scope_of([(b"authorization", b"Bearer b")]), "/t", None, 200)
    monitor.drain()
    assert monitor.requests == 1
    assert monitor.snapshot().distinct_credentials["bearer"] == pytest.approx(1.0, abs=0.01)


# --- the compiled ASGI path -------------------------------------------------------------------


@needs_compiled
def test_asgi_requests_take_the_compiled_send_and_are_recorded_once() -> None:
    import asyncio

    import memwatch
    from memwatch._speedups import StatusSend

    seen: list[Any] = []
    sent: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(send)
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b"tea"})

    async def server_send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request"}

    mw = memwatch.ASGIMiddleware(app, log_startup=False, request_sample_rate=0.0)
    scope = {"type": "http", "method": "GET", "path": "/tea", "headers": [], "query_string": b""}
    asyncio.run(mw(scope, receive, server_send))
    assert type(seen[0]) is StatusSend and seen[0].status == 418
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    seen[0].finish()  # a second finish records nothing more
    assert mw.monitor.snapshot().counts == {("/tea", "GET", "anonymous", "client_error"): 1}

    # A message sent after the app returned still reaches the server, as it would bare.
    asyncio.run(seen[0]({"type": "http.response.body", "body": b"late"}))
    assert sent[-1]["body"] == b"late"


@needs_compiled
def test_middlewares_follow_the_gate_and_recorder_a_reset_makes() -> None:
    # The compiled middlewares keep the monitor's gate between requests (and reach the
    # recorder through it). A reset (as after a fork) retires the gate: the next request must
    # be numbered by the new gate and counted by the new recorder, on both protocols.
    amw, wmw = _middleware_pair()
    for get, mw in ((_asgi_get, amw), (_wsgi_get, wmw)):
        monitor = mw.monitor
        for _ in range(3):
            get(mw, "/a")
        old_gate, old_recorder = monitor._gate, monitor.recorder
        assert old_gate.issued == 3 and not old_gate.retired
        old_recorder.take()  # what it counted before the reset
        monitor._reset_state()
        assert old_gate.retired and monitor._gate is not old_gate
        assert monitor.recorder is not old_recorder
        for _ in range(2):
            get(mw, "/a")
        monitor.drain()
        assert old_gate.issued == 3 and monitor._gate.issued == 2
        assert monitor.requests == 2
        assert old_recorder.take() == ({}, [], 0)  # nothing reached the old recorder


@needs_compiled
def test_a_recorder_set_on_the_monitor_is_the_one_the_middlewares_use() -> None:
    calls: list[str] = []

    class Spy:
        def record_scope(self, scope: Any, template: Any, path: Any, status: Any) -> None:
            calls.append("scope")

        def record_environ(self, environ: Any, template: Any, path: Any, status: Any) -> None:
            calls.append("environ")

        def take(self) -> tuple[dict[Any, int], list[int], int]:
            return {}, [], 0

        def flush(self) -> None:
            pass

    amw, wmw = _middleware_pair()
    _asgi_get(amw, "/a")  # the gate is kept from here on
    _wsgi_get(wmw, "/w")
    amw.monitor.recorder = Spy()
    wmw.monitor.recorder = Spy()
    _asgi_get(amw, "/a")
    _wsgi_get(wmw, "/w")
    assert calls == ["scope", "environ"]


@needs_compiled
def test_a_gate_that_cannot_be_read_is_counted_once_and_the_requests_go_on() -> None:
    amw, wmw = _middleware_pair()
    for mw, get in ((amw, _asgi_get), (wmw, _wsgi_get)):
        get(mw, "/a")  # the compiled gate is kept from here on
        gate = mw.monitor._gate
        del mw.monitor.__dict__["_gate"]  # the monitor's gate gone (a broken state) ...
        gate.retired = True  # ... and the kept one retired: the middlewares look again
    seen: list[Any] = []

    async def send(message: Any) -> None:
        seen.append(message)

    scope = {"type": "http", "method": "GET", "path": "/a", "headers": [], "query_string": b""}
    for _ in range(3):
        asyncio.run(amw(scope, _receive_request, send))
        body = wmw(environ_of({}, PATH_INFO="/w"), lambda status, headers: seen.append(status))
        assert list(body) == [b"ok"]
        body.close()
    one = [
        {"type": "http.response.start", "status": 200, "headers": []},
        {"type": "http.response.body", "body": b"ok"},
        "200 OK",
    ]
    assert seen == one * 3
    # Each request's entry counts the failure once (then nothing runs with it still set), and
    # its end once more (the recorder is kept on the gate): memwatch's errors, not the app's.
    assert amw.monitor.errors.by_where == {"asgi.entry": 3, "asgi.finish": 3}
    assert wmw.monitor.errors.by_where == {"wsgi.entry": 3, "wsgi.finish": 3}


@needs_compiled
def test_a_dropped_middleware_and_its_monitor_are_collected() -> None:
    # The gate holds the recorder, which holds the monitor's queue: a cycle through C objects,
    # which the garbage collector must see through (Gate takes part in it).
    import gc
    import weakref

    import memwatch
    from memwatch._speedups import Gate

    def gates() -> int:
        return sum(type(o) is Gate for o in gc.get_objects())

    gc.collect()
    before = gates()
    mw = memwatch.ASGIMiddleware(_asgi_app, log_startup=False)
    _asgi_get(mw, "/a")
    assert gates() == before + 1
    monitor = weakref.ref(mw.monitor)
    del mw
    gc.collect()
    assert monitor() is None and gates() == before


@needs_compiled
def test_asgi_app_exception_propagates_and_counts_as_server_error() -> None:
    import asyncio

    import memwatch

    class Boom(Exception):
        pass

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise Boom("app's own")

    async def noop(*args: Any) -> Any:
        return None

    mw = memwatch.ASGIMiddleware(app, log_startup=False, request_sample_rate=0.0)
    scope = {"type": "http", "method": "POST", "path": "/x", "headers": []}
    with pytest.raises(Boom, match="app's own"):
        asyncio.run(mw(scope, noop, noop))
    assert mw.monitor.snapshot().counts == {("/x", "POST", "anonymous", "server_error"): 1}


@needs_compiled
def test_compiled_bloom_filter_sets_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    from memwatch import sketch

    rng = random.Random(3)
    values = [rng.getrandbits(64) for _ in range(3000)]
    values += values[:500]  # seen again: not first-seen
    compiled = sketch.FirstSeenFilter(bits=2**12, hashes=3)
    first_compiled = [compiled.add(h) for h in values]
    monkeypatch.setattr(sketch, "_bloom_add", None)
    python = sketch.FirstSeenFilter(bits=2**12, hashes=3)
    first_python = [python.add(h) for h in values]
    assert first_compiled == first_python
    assert compiled._array == python._array and compiled.saturation() == python.saturation()
    assert not any(first_python[3000:])


@needs_compiled
def test_tally_is_bounded_when_nobody_drains() -> None:
    # A host that never drains (no request_entry, no scrape) loses counts, not memory.
    from memwatch.monitor import Monitor

    monitor = Monitor(Config())
    recorder = monitor.recorder
    scope = scope_of([(b"authorization", b"Bearer abc")])
    for i in range(70_000):
        recorder.record_scope(scope, None, f"/raw/{i}", 200)
    counts, noted, dropped = recorder.take()
    assert len(counts) == 65_536
    assert sum(counts.values()) + dropped == 70_000 and dropped > 0
    assert len(noted) <= 1  # the same credential is sampled once in a row


@needs_compiled
def test_rule_slot_behaves_as_a_plain_attribute_and_copies_the_template() -> None:
    from memwatch._speedups import RuleSlot

    class Request:
        url_rule = None

        def __init__(self) -> None:
            self.environ: dict[str, Any] = {}

    class Watched(Request):
        url_rule = RuleSlot("memwatch.route")

    class Rule:
        rule = "/reports/<int:rid>"

    request = Watched()
    assert Watched.url_rule is None and request.url_rule is None
    rule = Rule()
    request.url_rule = rule
    assert request.url_rule is rule
    assert request.environ == {"memwatch.route": "/reports/<int:rid>"}
    request.url_rule = None  # Flask may store None: nothing copied
    assert request.url_rule is None
    del request.url_rule
    with pytest.raises(AttributeError):
        del request.url_rule
    # A rule without a usable template, or no environ: stored all the same, nothing raised.
    odd = Watched()
    del odd.environ
    odd.url_rule = object()
    assert odd.url_rule is not None


def _starlette_counts(speedups: bool, order: list[str]) -> dict[Any, int]:
    """Routes as memwatch counts them for Starlette requests in ``order``."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    import memwatch

    async def endpoint(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    routes: list[Any] = [Route(f"/r{k}/{{item_id:int}}", endpoint) for k in range(20)]
    routes.append(Mount("/sub", routes=[Route("/leaf/{name}", endpoint)]))
    mw = memwatch.wrap(
        Starlette(routes=routes), log_startup=False, request_sample_rate=0.0, speedups=speedups
    )

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    async def run() -> None:
        for path in order:
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "GET",
                "scheme": "http",
                "path": path,
                "raw_path": path.encode(),
                "root_path": "",
                "query_string": b"",
                "headers": [],
                "server": ("127.0.0.1", 8000),
            }
            await mw(scope, receive, send)

    asyncio.run(run())
    return dict(mw.monitor.snapshot().counts)


@needs_compiled
def test_route_memo_gives_the_templates_of_the_python_path() -> None:
    # GIVEN 21 routes (more than the compiled path keeps in its memo of route objects, so that
    # entries are replaced), a mounted one among them, and unmatched paths, in a seeded order
    import random

    rng = random.Random(8)
    paths = [f"/r{k}/{rng.randrange(1000)}" for k in range(20)] + ["/sub/leaf/x", "/nowhere"]
    order = [rng.choice(paths) for _ in range(600)]
    # THEN the compiled path counts exactly what the Python path counts
    compiled = _starlette_counts(True, order)
    assert compiled == _starlette_counts(False, order)
    assert ("/r3/{item_id:int}", "GET", "anonymous", "ok") in compiled
    assert ("/sub/leaf/{name}", "GET", "anonymous", "ok") in compiled


@needs_compiled
@pytest.mark.parametrize(
    ("path", "own"),
    [
        ("/memwatch/report.json", True),
        ("/memwatch/€", True),  # a wider string than the prefix
        ("/metrics", True),
        ("/metrics/", False),
        ("/metricsx", False),
        ("/métrics", False),
        ("/memwatc", False),
        ("", False),
    ],
)
def test_own_paths_are_told_apart_at_any_character_width(path: str, own: bool) -> None:
    import memwatch

    called: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        called.append(scope["path"])
        await _asgi_app(scope, receive, send)

    mw = memwatch.ASGIMiddleware(app, log_startup=False, request_sample_rate=0.0)
    _asgi_get(mw, path)
    # memwatch's own paths are answered by memwatch (or refused), never passed to the app
    assert (called == []) is own


@pytest.mark.parametrize("compiled", [False, True])
def test_gate_numbers_requests_and_says_when_work_is_due(compiled: bool) -> None:
    from memwatch.recorder import PyGate, make_gate

    if compiled and not compiled_available():
        pytest.skip("memwatch._speedups is not built")
    gate = make_gate(compiled=compiled)
    assert (type(gate) is PyGate) is not compiled
    # GIVEN work due at 0, then at 5, then at 7 (set when the work due runs, as the monitor does)
    due = []
    plan = {0: 5, 5: 7, 7: 2**62}
    for _ in range(12):
        number = gate.due()
        due.append(number)
        if number is not None:
            gate.next_event = plan[number]
    # THEN exactly those numbers come back, and the others are None
    assert due == [0, None, None, None, None, 5, None, 7, None, None, None, None]
    # AND the next event can be moved back (a measured request's pair to close): due at once
    gate.next_event = 0
    assert gate.due() == 12


@needs_compiled
def test_compiled_gate_bounds() -> None:
    from memwatch._speedups import Gate

    gate = Gate()
    with pytest.raises(OverflowError):
        gate.next_event = 2**63
    with pytest.raises(AttributeError):
        gate.issued = 3  # type: ignore[misc]
    gate.due()
    assert gate.issued == 1


@needs_compiled
def test_compiled_send_reads_messages_as_the_app_would() -> None:
    # A plain dict's items are read directly, any other mapping through its own __getitem__;
    # a message without "type" raises KeyError to the app, as the server's send would.
    import memwatch

    sent: list[Any] = []
    errors: list[BaseException] = []

    class Message(collections.UserDict[str, Any]):
        pass

    body = "http.response." + "body"  # not interned: compared by value
    messages: list[Any] = [
        Message({"type": "http.response.start", "status": 201, "headers": []}),
        {"type": body, "body": b"x"},
    ]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for message in messages:
            await send(message)
        try:
            await send({"status": 200})
        except KeyError as exc:
            errors.append(exc)

    async def server_send(message: Any) -> None:
        sent.append(message)

    mw = memwatch.ASGIMiddleware(app, log_startup=False, request_sample_rate=0.0)
    scope = {"type": "http", "method": "GET", "path": "/m", "headers": [], "query_string": b""}
    asyncio.run(mw(scope, _receive_request, server_send))
    assert sent == messages
    assert len(errors) == 1 and errors[0].args == ("type",)
    assert mw.monitor.snapshot().counts == {("/m", "GET", "anonymous", "ok"): 1}


# --- the batch of kept requests (compiled ASGI path) ------------------------------------------


async def _status_app(scope: Any, receive: Any, send: Any) -> None:
    """Answers with the status the path ends in: /s/404 -> 404."""
    await send({"type": "http.response.start", "status": int(scope["path"][3:]), "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _batching_middleware(**options: Any) -> Any:
    """A compiled ASGI middleware whose drains and samples come only every 256 requests (so
    that nothing but the batch itself counts the kept requests in the tests below), served
    once so that its gate and recorder are kept, the batch empty."""
    import memwatch

    mw = memwatch.ASGIMiddleware(
        _status_app,
        log_startup=False,
        request_sample_rate=0.0,
        sample_every_requests=10_000,
        sample_every_seconds=3600.0,
        **options,
    )
    _asgi_get(mw, "/s/200")
    mw.monitor.recorder.flush()
    return mw


def _extra_refs(objects: list[Any], base: list[int]) -> list[int]:
    """References to each object beyond those counted in ``base`` (an earlier _refs)."""
    return [now - before for now, before in zip(_refs(objects), base, strict=True)]


def _refs(objects: list[Any]) -> list[int]:
    return [sys.getrefcount(o) for o in objects]


def _serve_all(mw: Any, scopes: list[dict[str, Any]]) -> list[Any]:
    """Serves the requests one after another in one event loop; returns what reached the
    server."""
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def run() -> None:
        for scope in scopes:
            await mw(scope, _receive_request, send)

    asyncio.run(run())
    return sent


@needs_compiled
def test_kept_requests_hold_their_headers_until_a_full_batch_is_counted() -> None:
    from memwatch._speedups import BATCH_SIZE

    mw = _batching_middleware()
    assert mw.monitor.recorder.batch_limit == BATCH_SIZE > 1
    held = [[(b"authorization", f"Bearer tok-{i}".encode())] for i in range(BATCH_SIZE)]
    base = _refs(held)
    _serve_all(mw, [scope_of(headers, path="/s/200") for headers in held[:-1]])
    # Kept: one reference more to each request's headers (its scope is gone), none to the scope.
    assert _extra_refs(held, base) == [1] * (BATCH_SIZE - 1) + [0]
    # The request that fills the batch has them all counted, and their headers let go.
    _serve_all(mw, [scope_of(held[-1], path="/s/200")])
    assert _extra_refs(held, base) == [0] * BATCH_SIZE
    snapshot = mw.monitor.snapshot()
    assert snapshot.counts[("/s/{id}", "GET", "bearer", "ok")] == BATCH_SIZE
    assert snapshot.distinct_credentials["bearer"] == pytest.approx(BATCH_SIZE, rel=0.1)


@needs_compiled
def test_readings_of_the_heap_count_the_kept_requests_first() -> None:
    # A kept request holds its headers (a list, its tuples, their bytes): freed between the two
    # readings of a measured pair they would pass for memory the request gave back.
    mw = _batching_middleware()
    monitor = mw.monitor
    for read in (monitor.read_signals, monitor._probe_open):
        held = [[(b"x-api-key", f"key-{i}".encode())] for i in range(3)]
        base = _refs(held)
        _serve_all(mw, [scope_of(headers, path="/s/200") for headers in held])
        assert _extra_refs(held, base) == [1, 1, 1]
        read()
        assert _extra_refs(held, base) == [0, 0, 0]
    assert monitor.snapshot().counts[("/s/{id}", "GET", "apikey", "ok")] == 6


@needs_compiled
@pytest.mark.parametrize("hashing", ["blake2b", "compiled hash"])
def test_kept_requests_fold_into_the_same_state_as_the_python_path(hashing: str) -> None:
    import random

    rng = random.Random(11)
    shared = Fingerprinter(b"k" * 16) if hashing == "blake2b" else Fingerprinter()
    fast, slow = _batching_middleware(), _batching_middleware(speedups=False)
    assert not isinstance(fast.monitor.recorder, PyRecorder)
    assert isinstance(slow.monitor.recorder, PyRecorder)
    for mw in (fast, slow):
        mw.monitor._fingerprinter = shared
        mw.monitor.fingerprint = shared.fingerprint
        mw.monitor._reset_state()
    for _ in range(40):
        scopes = []
        for _ in range(rng.randrange(1, 60)):
            token = f"tok-{rng.randrange(300)}".encode()
            headers: Any = rng.choice(
                [
                    [(b"accept", b"*/*"), (b"authorization", b"Bearer " + token)],
                    [(b"x-api-key", token), (b"x-api-key", b"second")],
                    [(b"authorization", b"Basic " + token)],
                    [(b"cookie", b"sessionid=" + token), (b"cookie", b"theme=dark")],
                    [(b"authorization", b"Bearer  " + token + b" ")],
                    [(b"authorization", b"bearer " + token)],
                    [(b"authorization", b"Bearer caf\xc3\xa9")],
                    [],
                ]
            )
            if rng.random() < 0.1:
                headers = tuple(headers)
            query = rng.choice([b"", b"page=2", b"access_token=" + token])
            status = rng.choice(["200", "200", "404", "401", "500"])
            scope = scope_of(
                headers, query, path=f"/s/{status}", method=rng.choice(["GET", "POST", "BREW"])
            )
            if rng.random() < 0.05:
                del scope["query_string"]
            scopes.append(scope)
        for mw in (fast, slow):
            # The same requests, each with its own scope and headers, as a server makes them.
            copies = [{**s, "headers": type(s["headers"])(s["headers"])} for s in scopes]
            _serve_all(mw, copies)
        if rng.random() < 0.3:
            fast.monitor.drain()
            slow.monitor.drain()
    fast_snapshot, slow_snapshot = fast.monitor.snapshot(), slow.monitor.snapshot()
    assert fast_snapshot.requests == slow_snapshot.requests > 1000
    assert fast.monitor._counts == slow.monitor._counts
    assert len({key[2] for key in fast.monitor._counts}) >= 5  # the schemes above, and others
    for scheme, sketch in slow.monitor._sketches.items():
        assert fast.monitor._sketches[scheme].registers == sketch.registers, scheme
    assert fast.monitor.first_seen == slow.monitor.first_seen > 0
    assert fast.monitor.errors.total == slow.monitor.errors.total == 0


@needs_compiled
def test_a_kept_request_that_cannot_be_classified_is_counted_as_an_error_alone() -> None:
    from memwatch._speedups import BATCH_SIZE

    class Broken(AuthClassifier):
        def from_scope(self, scope: object) -> tuple[str, str | None]:
            raise RuntimeError("broken")

    mw = _batching_middleware()
    monitor = mw.monitor
    monitor.drain()  # the first request, counted before its recorder is replaced
    monitor.recorder = make_recorder(
        monitor.enqueue, Broken(Config()), monitor._fingerprinter, sketches=monitor._sketches
    )
    # A Basic request (the classifier's to decide: it raises) kept among Bearer ones (decided
    # in C): the app's responses are unchanged; the batch's flush, at the end of the request
    # that fills it, counts one error and every request but the Basic one.
    scopes = [scope_of([(b"authorization", b"Basic dTpw")], path="/s/200")]
    scopes += [
        scope_of([(b"authorization", b"Bearer t")], path="/s/200") for _ in range(BATCH_SIZE - 1)
    ]
    sent = _serve_all(mw, scopes)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"] * BATCH_SIZE
    assert monitor.errors.by_where == {"asgi.finish": 1}
    # Kept and counted by a drain instead: the drain counts the error and goes on.
    _serve_all(mw, scopes[:3])
    snapshot = monitor.snapshot()
    assert monitor.errors.by_where == {"asgi.finish": 1, "recorder.flush": 1}
    assert snapshot.counts == {
        ("/s/{id}", "GET", "anonymous", "ok"): 1,  # the middleware's first request
        ("/s/{id}", "GET", "bearer", "ok"): BATCH_SIZE - 1 + 2,
    }


@needs_compiled
def test_batch_limit_zero_records_each_request_at_its_end() -> None:
    from memwatch._speedups import BATCH_SIZE

    mw = _batching_middleware()
    recorder = mw.monitor.recorder
    held = [[(b"authorization", b"Bearer a")] for _ in range(2)]
    base = _refs(held)
    _serve_all(mw, [scope_of(held[0], path="/s/200")])
    assert _extra_refs(held, base) == [1, 0]
    recorder.batch_limit = 0  # what is kept is counted now; from here on nothing is kept
    assert _extra_refs(held, base) == [0, 0]
    _serve_all(mw, [scope_of(held[1], path="/s/200")])
    assert _extra_refs(held, base) == [0, 0]
    assert mw.monitor.snapshot().counts[("/s/{id}", "GET", "bearer", "ok")] == 2
    for bad in (-1, BATCH_SIZE + 1):
        with pytest.raises(ValueError, match="batch_limit must be from 0 to 16"):
            recorder.batch_limit = bad
    with pytest.raises(AttributeError, match="cannot be deleted"):
        del recorder.batch_limit
    assert recorder.batch_limit == 0
