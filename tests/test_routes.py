"""Route labels: path normalisation (no identifiers, no secrets, bounded) and the capped table."""

from __future__ import annotations

import base64
import string
import sys
import threading
import uuid

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from memwatch.routes import OTHER, RouteTable, normalize_path

# 16 segments of at most 32 characters each, their slashes, and the "{...}" marker.
MAX_LABEL = 17 * 32 + 17 + len("{...}")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("", "/", id="empty"),
        pytest.param("/", "/", id="root"),
        pytest.param("/users/42", "/users/{id}", id="numeric"),
        pytest.param(
            "/users/42/orders/7/", "/users/{id}/orders/{id}/", id="numerics, trailing slash"
        ),
        pytest.param("/days/2024-01-05", "/days/{id}", id="date"),
        pytest.param("/items/550e8400-e29b-41d4-a716-446655440000", "/items/{uuid}", id="uuid"),
        pytest.param(
            "/items/550E8400E29B41D4A716446655440000", "/items/{uuid}", id="uuid without dashes"
        ),
        pytest.param(
            "/commits/9fceb02d0ae598e95dc970b74767f19372d61af8", "/commits/{hex}", id="sha1, 40 hex"
        ),
        pytest.param("/blobs/deadbeef12", "/blobs/{hex}", id="short hex"),
        pytest.param("/blobs/0123456789abcdef", "/blobs/{hex}", id="hex 16"),
        pytest.param("/reset/Xk9_2mQ-7pLr4TzW8vNc1A", "/reset/{token}", id="urlsafe token"),
        pytest.param(
            "/reset/qWeRtYuIoPaSdFgHjK", "/reset/{token}", id="letters-only mixed-case token"
        ),
        pytest.param("/k/" + "z9" * 20, "/k/{token}", id="long token"),
        pytest.param("/k/" + "word" * 9, "/k/{token}", id="long word"),
        pytest.param("/users/alice@example.com", "/users/{value}", id="email"),
        pytest.param("/files/report%20final.pdf", "/files/{value}", id="percent-encoded"),
        pytest.param("/wiki/Zürich", "/wiki/{value}", id="non-ascii"),
        pytest.param("/wiki/日本", "/wiki/{value}", id="cjk"),
        pytest.param("/api/v1/users", "/api/v1/users", id="version v1 kept"),
        pytest.param("/api/v2/items/9", "/api/v2/items/{id}", id="version v2 kept, id replaced"),
        pytest.param("/reset-password/confirm", "/reset-password/confirm", id="kebab words kept"),
        pytest.param("/static/app.min.css", "/static/app.min.css", id="file name kept"),
        pytest.param("/API_KEYS/list_all", "/API_KEYS/list_all", id="single-case words kept"),
        pytest.param("/a/b12c34", "/a/{id}", id="short mixed digits"),
        pytest.param("//double", "//double", id="empty segment kept"),
    ],
)
def test_normalize_path(path: str, expected: str) -> None:
    assert normalize_path(path) == expected


def test_very_long_paths_are_bounded() -> None:
    deep = normalize_path("/a" * 10_000)
    assert len(deep) <= MAX_LABEL
    assert deep.endswith("/{...}")
    wide = normalize_path("/" + "x" * 100_000)
    assert wide == "/{token}"
    many_ids = normalize_path("/1" * 300)
    assert len(many_ids) <= MAX_LABEL


# --- properties --------------------------------------------------------------------------------


def digit_runs(label: str) -> list[str]:
    return [seg for seg in label.split("/") if seg.isdigit() and len(seg) > 3]


@settings(deadline=None, max_examples=300)
@given(st.text(max_size=2000))
@example("/" + "9" * 5000)
@example("/" + "/".join(str(i) * 4 for i in range(40)))
def test_property_output_is_bounded_and_has_no_long_numbers(path: str) -> None:
    label = normalize_path(path)
    assert len(label) <= MAX_LABEL
    assert digit_runs(label) == []


URLSAFE = string.ascii_letters + string.digits + "-_"
word_segments = st.text(alphabet=string.ascii_lowercase + "-_", min_size=1, max_size=12)
other_segments = st.one_of(
    word_segments,
    st.integers(0, 10**12).map(str),
    st.sampled_from(["v1", "v2", "api", "users", "orders", "static", "reset-password"]),
    st.text(alphabet=URLSAFE + "%@.~", min_size=1, max_size=40),
)


@st.composite
def random_tokens(draw: st.DrawFn) -> str:
    """A secret as web apps mint them: url-safe base64, hex or a UUID of random bytes."""
    raw = draw(st.binary(min_size=9, max_size=32))
    kind = draw(st.sampled_from(["urlsafe", "hex", "uuid"]))
    if kind == "urlsafe":
        token = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    elif kind == "hex":
        token = raw.hex()
    else:
        token = str(uuid.UUID(bytes=raw[:16].ljust(16, b"\0")))
    # Random bytes, not a run of one value: a real token of 12+ characters has many distinct ones.
    assume(len(set(token)) >= 8)
    return token


def leaked(token: str, label: str, n: int = 12) -> list[str]:
    return [token[i : i + n] for i in range(len(token) - n + 1) if token[i : i + n] in label]


@settings(deadline=None, max_examples=400)
@given(
    before=st.lists(other_segments, max_size=5),
    after=st.lists(other_segments, max_size=5),
    token=random_tokens(),
)
@example(before=["reset"], after=[], token="qWeRtYuIoPaSdFgHjKlZxC")  # letters only
@example(before=["t"], after=["x"], token="Ab-Cd_EfGhIjKlMnOpQrSt")
def test_property_no_piece_of_a_token_survives(
    before: list[str], after: list[str], token: str
) -> None:
    # GIVEN a path with a random token as one of its segments
    path = "/" + "/".join([*before, token, *after])
    # WHEN it is normalised
    label = normalize_path(path)
    # THEN no 12 consecutive characters of the token remain, and the label stays bounded
    assert leaked(token, label) == [], label
    assert len(label) <= MAX_LABEL
    assert digit_runs(label) == []


def test_normalisation_is_stable_for_the_same_route() -> None:
    labels = {normalize_path(f"/users/{i}/orders/{i * 7919}") for i in range(1, 500)}
    assert labels == {"/users/{id}/orders/{id}"}


# --- the route table ---------------------------------------------------------------------------


def word(i: int) -> str:
    """A distinct lower-case word per integer (normalisation keeps words)."""
    letters = []
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        letters.append(string.ascii_lowercase[r])
    return "w" + "".join(reversed(letters))


def test_words_used_below_normalise_to_distinct_labels() -> None:
    paths = [f"/{word(i)}/x" for i in range(10_000)]
    assert len({normalize_path(p) for p in paths}) == 10_000


@pytest.mark.parametrize("max_routes", [1, 50, 200])
def test_route_table_caps_labels_and_overflows_into_other(max_routes: int) -> None:
    # GIVEN a table and 10 000 distinct raw paths that normalise to distinct labels
    table = RouteTable(max_routes)
    paths = [f"/{word(i)}/x" for i in range(10_000)]
    # WHEN every path is labelled
    labels = [table.for_path(p) for p in paths]
    # THEN the first max_routes keep their own label, every later one is __other__
    assert len(table) == max_routes
    assert labels[:max_routes] == [normalize_path(p) for p in paths[:max_routes]]
    assert set(labels[max_routes:]) == {OTHER}
    assert table.overflowed == 10_000 - max_routes
    assert set(table.labels()) == set(labels[:max_routes])
    # AND routes already known keep their label after the overflow
    assert table.for_path(paths[0]) == normalize_path(paths[0])
    assert table.label(labels[max_routes - 1]) == labels[max_routes - 1]


def test_route_table_templates_share_the_cap() -> None:
    table = RouteTable(3)
    assert [table.label(t) for t in ("/a/<int:id>", "/b/{x}", "api/c/", "/d")] == [
        "/a/<int:id>",
        "/b/{x}",
        "api/c/",
        OTHER,
    ]
    assert table.for_path("/users/1") == OTHER


def test_route_table_is_thread_safe() -> None:
    # GIVEN 8 threads labelling 2 000 distinct templates each, half of them shared
    max_routes = 500
    table = RouteTable(max_routes)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []
    results: list[list[tuple[str, str]]] = [[] for _ in range(8)]

    def hammer(n: int) -> None:
        try:
            barrier.wait()
            for i in range(2_000):
                template = f"/shared/{word(i)}" if i % 2 else f"/t{n}/{word(i)}"
                results[n].append((template, table.label(template)))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    # THEN nothing raised, the cap held exactly, and every answer is its own template or __other__
    assert errors == []
    assert len(table) == max_routes
    known = set(table.labels())
    for template, label in (pair for result in results for pair in result):
        assert label == OTHER or (label == template and template in known)
    # AND a template got the same label from every thread once it was known
    shared: dict[str, set[str]] = {}
    for template, label in (pair for result in results for pair in result):
        if template.startswith("/shared/") and template in known:
            shared.setdefault(template, set()).add(label)
    assert all(labels == {template} for template, labels in shared.items())
    # AND every __other__ answer was counted once
    others = sum(label == OTHER for result in results for _, label in result)
    assert table.overflowed == others > 0


def test_random_lowercase_tokens_rarely_pass_for_words() -> None:
    # GIVEN 16-letter random lowercase tokens in a path (seeded)
    import random
    import string

    from memwatch.routes import normalize_segment

    rng = random.Random(20261123)
    tokens = ["".join(rng.choice(string.ascii_lowercase) for _ in range(16)) for _ in range(2000)]
    # WHEN they are normalised
    kept = [t for t in tokens if normalize_segment(t) == t]
    # THEN most become placeholders (about 15 % still read like words), and words stay
    assert len(kept) / len(tokens) < 0.25
    for word in ("authentication", "notifications", "password-reset", "recommendations"):
        assert normalize_segment(word) == word
