"""Auth classification: every scheme, precedence, WSGI == ASGI, and malformed input never raises."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from memwatch.auth import AUTH_SCHEMES, AuthClassifier, classify_authorization
from memwatch.config import Config

MAX_CREDENTIAL = 8192
KIB64 = 64 * 1024


def environ_for(headers: dict[str, str], query: str = "") -> dict[str, object]:
    """A WSGI environ carrying the headers (latin-1 text, as PEP 3333 has it)."""
    environ: dict[str, object] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "QUERY_STRING": query}
    for name, value in headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


def scope_for(headers: dict[str, str], query: str = "") -> dict[str, object]:
    """The ASGI scope of the same request (lower-case names, raw bytes)."""
    return {
        "type": "http",
        "method": "GET",
        "path": "/",
        "query_string": query.encode("latin-1"),
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
    }


def classify_both(
    headers: dict[str, str], query: str = "", config: Config | None = None
) -> tuple[str, str | None]:
    """Classifies through WSGI and ASGI; asserts they agree and returns the answer."""
    classifier = AuthClassifier(config or Config())
    wsgi = classifier.from_environ(environ_for(headers, query))
    asgi = classifier.from_scope(scope_for(headers, query))
    assert wsgi == asgi, f"WSGI {wsgi!r} != ASGI {asgi!r}"
    return wsgi


def assert_sane(result: tuple[str, str | None]) -> None:
    scheme, credential = result
    assert scheme in AUTH_SCHEMES
    assert credential is None or (isinstance(credential, str) and len(credential) <= MAX_CREDENTIAL)
    if scheme == "anonymous":
        assert credential is None


# --- the Authorization header ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param(
            "Bearer eyJhbGciOi.payload.sig", ("bearer", "eyJhbGciOi.payload.sig"), id="bearer"
        ),
        pytest.param("bEaReR abc", ("bearer", "abc"), id="mixed-case scheme"),
        pytest.param("  Bearer    abc  ", ("bearer", "abc"), id="padding and runs of spaces"),
        pytest.param("Bearer\tabc", ("bearer", "abc"), id="tab after the scheme"),
        pytest.param("Bearer", ("bearer", None), id="bearer without token"),
        pytest.param("Basic dXNlcjpwYXNz", ("basic", "dXNlcjpwYXNz"), id="basic"),
        pytest.param("basic !!not*base64!!", ("basic", "!!not*base64!!"), id="basic not base64"),
        pytest.param(
            'Digest username="alice", realm="api", nonce="n-1", uri="/", response="r1"',
            ("digest", "alice"),
            id="digest username",
        ),
        pytest.param(
            'Digest realm="api", USERNAME = "bob" , nonce="n-2"',
            ("digest", "bob"),
            id="digest username not first, odd spacing",
        ),
        pytest.param(
            "Digest username*=UTF-8''j%C3%A4s", ("digest", "UTF-8''j%C3%A4s"), id="digest username*"
        ),
        pytest.param(
            'Digest realm="api", nonce="n"', ("digest", None), id="digest without username"
        ),
        pytest.param(
            "Token 9944b09199c62bcf9418ad846dd0e4bbdfc6ee4b",
            ("apikey", "9944b09199c62bcf9418ad846dd0e4bbdfc6ee4b"),
            id="DRF Token",
        ),
        pytest.param("Api-Key abc.def", ("apikey", "abc.def"), id="Api-Key scheme"),
        pytest.param("ApiKey k1", ("apikey", "k1"), id="ApiKey scheme"),
        pytest.param("abc123", ("apikey", "abc123"), id="bare value is a key"),
        pytest.param(
            "Negotiate YIIGhgYGKwYBBQUCoIIGejCCBnag",
            ("other", "YIIGhgYGKwYBBQUCoIIGejCCBnag"),
            id="other scheme",
        ),
        pytest.param("", ("anonymous", None), id="empty"),
        pytest.param(" \t ", ("anonymous", None), id="whitespace only"),
    ],
)
def test_classify_authorization(header: str, expected: tuple[str, str | None]) -> None:
    assert classify_authorization(header) == expected


def test_same_digest_user_with_new_nonces_is_one_credential() -> None:
    first = classify_authorization('Digest username="carol", nonce="aaa", response="1"')
    second = classify_authorization('Digest username="carol", nonce="bbb", response="2"')
    assert first == second == ("digest", "carol")


# --- headers, query and cookies, through WSGI and ASGI -----------------------------------------


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        pytest.param({}, "", ("anonymous", None), id="nothing"),
        pytest.param({"Authorization": "Bearer t0k"}, "", ("bearer", "t0k"), id="bearer"),
        pytest.param({"Authorization": "Basic YTpi"}, "", ("basic", "YTpi"), id="basic"),
        pytest.param({"X-API-Key": "k-123"}, "", ("apikey", "k-123"), id="x-api-key"),
        pytest.param({"Api-Key": "k-456"}, "", ("apikey", "k-456"), id="api-key header"),
        pytest.param({"X-Auth-Token": "k-789"}, "", ("apikey", "k-789"), id="x-auth-token"),
        pytest.param({}, "token=abc", ("apikey", "abc"), id="query token"),
        pytest.param(
            {}, "page=2&api_key=xyz&x=1", ("apikey", "xyz"), id="query api_key among others"
        ),
        pytest.param(
            {}, "access_token=jwt.value", ("bearer", "jwt.value"), id="query access_token is bearer"
        ),
        pytest.param({}, "TOKEN=abc", ("apikey", "abc"), id="query name case-insensitive"),
        pytest.param({}, "token=", ("apikey", None), id="query empty value"),
        pytest.param({}, "mytoken=abc&monkey=1", ("anonymous", None), id="query lookalike names"),
        pytest.param({"Cookie": "sessionid=s3ss"}, "", ("session", "s3ss"), id="session cookie"),
        pytest.param(
            {"Cookie": "theme=dark;  SESSION=s-9 ; lang=en"},
            "",
            ("session", "s-9"),
            id="session cookie among others",
        ),
        pytest.param(
            {"Cookie": "theme=dark; csrftoken=x"},
            "",
            ("anonymous", None),
            id="cookies without session",
        ),
        pytest.param(
            {"Cookie": "jsessionid=J; sessionid=S"},
            "",
            ("session", "S"),
            id="configured order decides",
        ),
        # Precedence: Authorization > api-key header > query > cookie.
        pytest.param(
            {"Authorization": "Bearer b", "X-API-Key": "k"},
            "token=q",
            ("bearer", "b"),
            id="authorization beats api key",
        ),
        pytest.param(
            {"X-API-Key": "k", "Cookie": "sessionid=s"},
            "token=q",
            ("apikey", "k"),
            id="api key header beats query",
        ),
        pytest.param(
            {"Cookie": "sessionid=s"}, "access_token=q", ("bearer", "q"), id="query beats cookie"
        ),
        pytest.param(
            {"Authorization": "Token t", "Cookie": "sessionid=s"},
            "",
            ("apikey", "t"),
            id="token scheme beats cookie",
        ),
        # A blank header is no credential: the next source decides.
        pytest.param(
            {"Authorization": "   ", "Cookie": "sessionid=s"},
            "",
            ("session", "s"),
            id="blank authorization",
        ),
        pytest.param(
            {"X-API-Key": "", "Cookie": "sessionid=s"},
            "",
            ("session", "s"),
            id="empty api key header",
        ),
    ],
)
def test_classification_is_the_same_through_wsgi_and_asgi(
    headers: dict[str, str], query: str, expected: tuple[str, str | None]
) -> None:
    assert classify_both(headers, query) == expected


def test_configured_headers_cookies_and_query_names() -> None:
    config = Config(
        apikey_headers=("X-Custom-Key",),
        session_cookies=("my_sid",),
        query_credentials=("sig",),
    )
    assert classify_both({"x-custom-key": "abc"}, config=config) == ("apikey", "abc")
    assert classify_both({"X-API-Key": "abc"}, config=config) == ("anonymous", None)
    assert classify_both({"Cookie": "My_Sid=v1"}, config=config) == ("session", "v1")
    assert classify_both({"Cookie": "sessionid=v1"}, config=config) == ("anonymous", None)
    assert classify_both({}, "SIG=abc", config=config) == ("apikey", "abc")
    assert classify_both({}, "token=abc", config=config) == ("anonymous", None)


def test_asgi_cookie_headers_are_joined() -> None:
    # HTTP/2 servers may split cookies into several headers.
    scope = {"headers": [(b"cookie", b"theme=dark"), (b"cookie", b"sessionid=abc")]}
    assert AuthClassifier(Config()).from_scope(scope) == ("session", "abc")


def test_asgi_scope_without_get_is_anonymous() -> None:
    assert AuthClassifier(Config()).from_scope(object()) == ("anonymous", None)


# --- malformed and hostile input ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        pytest.param({"Authorization": "Bearer " + "a" * KIB64}, "", id="64 KiB bearer"),
        pytest.param({"Authorization": "x" * KIB64}, "", id="64 KiB bare value"),
        pytest.param(
            {"Authorization": 'Digest username="' + "u" * KIB64 + '"'}, "", id="64 KiB digest user"
        ),
        pytest.param({"X-API-Key": "k" * KIB64}, "", id="64 KiB api key"),
        pytest.param({}, "token=" + "t" * KIB64, id="64 KiB query"),
        pytest.param({"Cookie": "sessionid=" + "s" * KIB64}, "", id="64 KiB cookie"),
        pytest.param({"Cookie": ";" * KIB64 + "sessionid=s"}, "", id="cookie beyond the bound"),
        pytest.param({"Authorization": "Basic \xff\xfe\x80\x00"}, "", id="latin-1 bytes"),
        pytest.param({"Authorization": "\x85Bearer\xa0abc\x85"}, "", id="latin-1 whitespace"),
        pytest.param({}, "token=%ff%fe&&&=&", id="odd query"),
    ],
)
def test_malformed_and_huge_values_are_bounded(headers: dict[str, str], query: str) -> None:
    assert_sane(classify_both(headers, query))


def test_non_utf8_asgi_bytes_are_classified() -> None:
    classifier = AuthClassifier(Config())
    scope = {"headers": [(b"authorization", b"Bearer \xc3\x28\xff\xfe\x80")]}
    scheme, credential = classifier.from_scope(scope)
    assert scheme == "bearer"
    assert credential is not None and len(credential) == 5


def test_non_ascii_case_folding_cannot_stretch_the_credential() -> None:
    # "İ".lower() is two characters: offsets taken from a lowered copy would run past the bound.
    classifier = AuthClassifier(Config())
    for environ in (
        {"QUERY_STRING": "token=" + "İ" * 10_000},
        {"HTTP_COOKIE": "sessionid=" + "İ" * 10_000},
        {"QUERY_STRING": "İİİİ&token=abc"},
    ):
        result = classifier.from_environ(environ)
        assert_sane(result)
    assert classifier.from_environ({"QUERY_STRING": "İİİİ&token=abc"}) == ("apikey", "abc")
    assert classifier.from_environ({"HTTP_COOKIE": "x=İİİİ; sessionid=abc"}) == ("session", "abc")


# --- properties --------------------------------------------------------------------------------

texts = st.one_of(
    st.text(max_size=64),
    st.text(alphabet=st.characters(max_codepoint=255), max_size=300),
    # Long values: a short pattern repeated up to 10 000 times (up to about 200 KB).
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=20), st.integers(1, 10_000)),
)
latin1 = st.text(alphabet=st.characters(max_codepoint=255), max_size=200)
schemes = st.sampled_from(["Bearer", "bEaReR", "Basic", "Digest", "Token", "Api-Key", "Foo", ""])
SLOW = settings(deadline=None, max_examples=150)


@SLOW
@given(scheme=schemes, separator=st.sampled_from([" ", "  ", "\t", " \t ", "\xa0"]), rest=texts)
def test_property_authorization_never_raises(scheme: str, separator: str, rest: str) -> None:
    assert_sane(classify_authorization(scheme + separator + rest))


@SLOW
@given(
    authorization=st.none() | texts,
    cookie=st.none() | texts,
    apikey=st.none() | texts,
    query=st.none() | texts,
)
@example(authorization="bEaReR " + "z" * KIB64, cookie=None, apikey=None, query=None)
@example(authorization=None, cookie="sessionid=" + "İ" * KIB64, apikey=None, query=None)
def test_property_wsgi_never_raises_and_is_bounded(
    authorization: str | None, cookie: str | None, apikey: str | None, query: str | None
) -> None:
    environ: dict[str, Any] = {}
    for key, value in (
        ("HTTP_AUTHORIZATION", authorization),
        ("HTTP_COOKIE", cookie),
        ("HTTP_X_API_KEY", apikey),
        ("QUERY_STRING", query),
    ):
        if value is not None:
            environ[key] = value
    assert_sane(AuthClassifier(Config()).from_environ(environ))


raw_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=16), st.integers(1, 8_000)),
)


@SLOW
@given(
    headers=st.lists(
        st.tuples(
            st.sampled_from([b"authorization", b"cookie", b"x-api-key", b"api-key", b"accept"]),
            raw_bytes,
        ),
        max_size=6,
    ),
    query=raw_bytes,
)
@example(headers=[(b"authorization", bytes(range(0x80, 0x100)))], query=b"")
@example(headers=[(b"cookie", b"sessionid=\xff" * 30_000)], query=b"token=\x80\x81")
def test_property_asgi_never_raises_and_is_bounded(
    headers: list[tuple[bytes, bytes]], query: bytes
) -> None:
    scope = {"type": "http", "headers": headers, "query_string": query}
    assert_sane(AuthClassifier(Config()).from_scope(scope))


@SLOW
@given(
    authorization=st.none() | st.builds(lambda s, r: s + " " + r, schemes, latin1),
    cookie=st.none() | latin1 | st.builds(lambda a, b: a + "; sessionid=" + b, latin1, latin1),
    apikey=st.none() | latin1,
    query=latin1 | st.builds(lambda a, b: a + "&access_token=" + b, latin1, latin1),
)
def test_property_wsgi_and_asgi_agree(
    authorization: str | None, cookie: str | None, apikey: str | None, query: str
) -> None:
    headers = {
        name: value
        for name, value in (
            ("Authorization", authorization),
            ("Cookie", cookie),
            ("X-API-Key", apikey),
        )
        if value is not None
    }
    assert_sane(classify_both(headers, query))


def test_asgi_bearer_fast_path_agrees_with_the_general_rules() -> None:
    # from_scope decides "Bearer <token>" without calling classify_authorization; on every
    # mix of blanks (latin-1 whitespace included), it must return what the general rules do.
    classifier = AuthClassifier(Config())
    rng = random.Random(5)
    alphabet = [b" ", b"\t", b"\x85", b"\xa0", b"\x0b", b"\x1c", b"a", b"Z", b"=", b".", b"-"]
    for _ in range(20_000):
        token = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        value = b"Bearer " + token
        scope = {"headers": [(b"host", b"x"), (b"authorization", value)]}
        assert classifier.from_scope(scope) == classify_authorization(value.decode("latin-1"))
