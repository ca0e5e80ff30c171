"""Route labels: the framework's route template where one is known, a normalised path otherwise.

Frameworks resolve a request's route inside the app, after memwatch has handed the request on;
memwatch picks the result up when the request ends, without routing a second time:

- **Flask/Werkzeug**: the app's request class is given (at wrap time) a compiled ``url_rule``
  attribute that copies ``rule.rule`` (``/reports/<int:rid>``) into the WSGI environ when Flask
  stores the matched rule; without the compiled module, a URL-value preprocessor (installed
  first; Flask runs these for every request right before its ``before_request`` functions)
  does the same in Python.
- **Django** (WSGI and ASGI handlers): the handler's ``resolve_request`` is wrapped on the
  instance to copy ``request.resolver_match.route`` (``api/data/``) into the environ or scope;
  the settings middleware (:mod:`memwatch.django`) reads the same through
  :func:`django_template` once the view has answered.
- **Starlette/FastAPI**: the router itself leaves the matched route in ``scope["route"]``; mounted
  sub-applications move ``root_path``, whose growth is the mount prefix.

Without a template, the path is normalised (``/users/42`` -> ``/users/{id}``). Either way a
:class:`RouteTable` caps the number of distinct labels (overflow ``__other__``) so that a scanner
sending random paths can not grow memwatch's own memory or the metric cardinality.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, MutableMapping
from typing import Any

ROUTE_KEY = "memwatch.route"

_RuleSlot: Any
try:
    from memwatch._speedups import RuleSlot as _RuleSlot
except ImportError:  # not built: Flask gets the Python hook
    _RuleSlot = None
OTHER = "__other__"
UNMATCHED = "__unmatched__"

_MAX_SEGMENTS = 16
_MAX_PATH = 512
# Raw paths whose label is cached. Small enough to fill within the detector's warm-up for any
# mix of paths: at 1,024, an app with about 1,000 distinct paths (ids from a catalogue) filled
# it slowly, coupon-collector fashion, for thousands of requests after the warm-up, and
# memwatch's detector took its own cache for a 25 B/request leak (the detection corpus's
# wsgi_warmup_table). At 4,096, a stream of distinct paths kept the cache churning through
# 300 KB dict tables that, resized from gunicorn's worker threads, grew the worker's RSS by 2-3 MB
# over 60,000 requests (tests/integration/test_soak.py).
_NORMALISED_CACHE = 256

_UUID = re.compile(
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
)
_HEX = re.compile(r"[0-9a-fA-F]+")
_NUMERIC = re.compile(r"[0-9][0-9_.:,\-]*")
_TOKENISH = re.compile(r"[A-Za-z0-9_\-.~+=%]+")
_WORDISH = re.compile(r"[A-Za-z][A-Za-z_\-.]*[0-9]{0,2}")
_LONG_WORD = re.compile(r"[A-Za-z][A-Za-z_\-.]*")


_VOWELS = frozenset("aeiouyAEIOUY")


def _looks_random(segment: str) -> bool:
    """A long single-case run of letters that reads like a random token, not words.

    Words (and slugs of words) have about 35-45 % vowels and short consonant runs; random
    letters have about 23 % vowels (with y) and long runs. Either sign (under 28 % vowels, or
    five consonants in a row) in any part of 10 letters or more marks a token. Measured on
    random lowercase strings: 15 % of 16-letter ones and 3 % of 32-letter ones still pass for
    words; a few real words become ``{token}`` ("strengthening", "healthchecks"). Labels leak
    less this way; the route cap and framework templates are the other guards.
    """
    for part in re.split(r"[-_.]", segment):
        if len(part) < 10:
            continue
        vowels = sum(1 for c in part if c in _VOWELS)
        if vowels < 0.28 * len(part):
            return True
        run = longest = 0
        for c in part:
            run = 0 if c in _VOWELS else run + 1
            longest = max(longest, run)
        if longest >= 5:
            return True
    return False


def normalize_segment(segment: str) -> str:
    """One path segment, with identifiers and secrets replaced by placeholders."""
    if not segment:
        return segment
    if _NUMERIC.fullmatch(segment):
        return "{id}"
    if len(segment) >= 32 and _UUID.fullmatch(segment):
        return "{uuid}"
    if len(segment) >= 8 and _HEX.fullmatch(segment) and not segment.isalpha():
        return "{hex}"
    if len(segment) >= 16 and _HEX.fullmatch(segment):
        return "{hex}"
    if "@" in segment or "%" in segment or not segment.isascii() or not segment.isprintable():
        # Control characters too (servers percent-decode paths): a route label reaches the logs,
        # where a line feed or an escape sequence would forge or hide lines.
        return "{value}"
    if len(segment) > 32:
        return "{token}"
    # A long mixed-case run of letters is a random token far more often than a path word: one
    # secrets.token_urlsafe(16) in 40 has no digit, and would otherwise pass for a word (and end
    # up in the metrics). Python web paths are lowercase by convention; frameworks supply a
    # template anyway. Long camelCase segments therefore become {token} as well.
    if len(segment) < 12:
        if _WORDISH.fullmatch(segment):
            return segment
    elif _LONG_WORD.fullmatch(segment) and (segment.islower() or segment.isupper()):
        # Long words carry no digits ("v2", "page10" are short); random letters are a token.
        return "{token}" if _looks_random(segment) else segment
    if len(segment) >= 8 and _TOKENISH.fullmatch(segment):
        has_digit = any(c.isdigit() for c in segment)
        if has_digit or not (segment.islower() or segment.isupper()):
            return "{token}"
    if any(c.isdigit() for c in segment) and len(segment) >= 4:
        return "{id}"
    return segment


def normalize_path(path: str) -> str:
    """A bounded, identifier-free rendering of a raw request path (``/users/{id}/orders``)."""
    if not path or path == "/":
        return "/"
    parts = path[:_MAX_PATH].split("/")
    if len(parts) > _MAX_SEGMENTS + 1:
        parts = [*parts[: _MAX_SEGMENTS + 1], "{...}"]
    return "/".join(normalize_segment(p) for p in parts)


class RouteTable:
    """Maps route templates and normalised paths to labels, at most ``max_routes`` of them.

    Reads are lock-free dict look-ups; only a new label takes the lock.
    """

    def __init__(self, max_routes: int) -> None:
        self.max_routes = max_routes
        self._labels: dict[str, str] = {}
        # Raw path -> normalised path. An LRU of fixed size: once full it stays flat, so memwatch's
        # own memory does not saw-tooth (filling, then cleared) under high-cardinality paths, a
        # pattern its own detector would take for a leak.
        self._normalise = functools.lru_cache(maxsize=_NORMALISED_CACHE)(normalize_path)
        self._lock = threading.Lock()
        self.overflowed = 0

    def __len__(self) -> int:
        return len(self._labels)

    def label(self, template: str, count: int = 1) -> str:
        """The label for a template; ``count`` requests are counted as overflowed when the cap
        is full."""
        label = self._labels.get(template)
        if label is not None:
            return label
        with self._lock:
            label = self._labels.get(template)
            if label is None:
                if len(self._labels) < self.max_routes:
                    label = self._labels[template] = template
                else:
                    # Overflow labels are not remembered: memory stays bounded by max_routes.
                    self.overflowed += count
                    return OTHER
            return label

    def for_path(self, path: str, count: int = 1) -> str:
        """The label for a raw path with no framework template."""
        return self.label(self._normalise(path), count)

    def labels(self) -> list[str]:
        return list(self._labels)


def starlette_template(scope: MutableMapping[str, Any], entry_root_path: str) -> str | None:
    """The template of the route Starlette (or FastAPI) matched, with any mount prefix.

    None when no endpoint route matched: a ``Mount`` left as the route means a plain ASGI app
    served the request below the prefix (or the mounted app found nothing), so the caller falls
    back to the normalised path (or ``__unmatched__`` for a 404).
    """
    route = scope.get("route")
    if route is None or hasattr(route, "routes"):  # Mount and Host have routes, endpoints none
        return None
    path = getattr(route, "path", None)
    fastapi = scope.get("fastapi")
    if fastapi is not None:
        # FastAPI >= 0.137 no longer copies included routes: scope["route"] is the router's own
        # APIRoute without the include_router() prefixes; the prefixed path is in its context.
        context = fastapi.get("effective_route_context")
        if context is not None and getattr(context, "original_route", None) is route:
            path = getattr(context, "path", path)
    if not isinstance(path, str):
        return None
    root_path = scope.get("root_path", "")
    if isinstance(root_path, str) and len(root_path) > len(entry_root_path):
        prefix = normalize_path(root_path[len(entry_root_path) :])
        return prefix.rstrip("/") + path
    return path


# --- framework hooks, installed once at wrap time -------------------------------------------


def install_route_hooks(app: Any, *, compiled: bool = True) -> str | None:
    """Teach a Flask or Django application to hand its route template to memwatch.

    Returns the framework's name, or None when ``app`` is neither (Starlette and FastAPI need
    no hook). Importing a framework is avoided unless the app is one of its objects.
    ``compiled`` allows the compiled Flask hook (``config.speedups``).
    """
    target = getattr(app, "__self__", app)  # app.wsgi_app is a bound method of the Flask app
    module = type(target).__module__ or ""
    flask_like = module.startswith("flask") or hasattr(target, "before_request_funcs")
    if flask_like and _install_flask(target, compiled=compiled):
        return "flask"
    if module.startswith("django.") and _install_django(target):
        return "django"
    return None


# The ``get`` of Flask's request-context variable (``flask.globals._cv_request``, Flask >= 2.2),
# bound by _install_flask. Every attribute read through the public ``flask.request`` proxy costs
# about 1.3 µs (a context-variable look-up and a getattr in Python); the hook below needs three.
_flask_request_context: Callable[[], Any] | None = None


def _flask_mark(endpoint: object = None, values: object = None) -> None:
    """Flask's URL-value preprocessor (it runs right before the ``before_request`` functions,
    for every request, and is called directly, without the coroutine check Flask makes on each
    ``before_request`` function): copies the matched rule's template into the environ."""
    try:
        request = _flask_request_context().request  # type: ignore[misc]
    except (TypeError, AttributeError, LookupError):
        # Not bound, or a Flask whose context variable differs: the public proxy, slower.
        from flask import request
    rule = request.url_rule
    if rule is not None:
        request.environ[ROUTE_KEY] = rule.rule


def _install_flask(flask_app: Any, *, compiled: bool = True) -> bool:
    global _flask_request_context
    funcs = getattr(flask_app, "url_value_preprocessors", None)
    if not isinstance(funcs, dict):
        return False
    if compiled and _flask_rule_slot(flask_app):
        return True
    if _flask_request_context is None:
        try:
            from flask.globals import _cv_request
        except ImportError:  # pragma: no cover - no such variable in this Flask
            pass
        else:
            _flask_request_context = _cv_request.get
    chain = funcs.setdefault(None, [])
    if _flask_mark not in chain:
        chain.insert(0, _flask_mark)
    return True


def _flask_rule_slot(flask_app: Any) -> bool:
    """Give the app a request class (a subclass of its own) whose ``url_rule`` attribute also
    copies the matched rule's template into the environ when Flask sets it
    (``memwatch._speedups.RuleSlot``): no Python call per request. False where it cannot (the
    compiled module is not built, or the request class keeps no instance dict); the caller then
    installs the Python hook. A ``request_class`` the app sets after wrapping replaces it:
    routes are then normalised paths."""
    if _RuleSlot is None:
        return False
    base = getattr(flask_app, "request_class", None)
    if not isinstance(base, type) or not getattr(base, "__dictoffset__", 0):
        return False
    if getattr(base, "_memwatch_rule_slot", False):
        return True  # wrapped before: once is enough
    namespace = {
        "url_rule": _RuleSlot(ROUTE_KEY),
        "_memwatch_rule_slot": True,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
    }
    flask_app.request_class = type(base.__name__, (base,), namespace)
    return True


def django_template(request: Any) -> str | None:
    """The route template Django resolved for ``request`` (``api/items/<int:pk>/``; ``/`` for
    the empty root pattern), or None before resolution or when nothing matched."""
    route = getattr(getattr(request, "resolver_match", None), "route", None)
    if isinstance(route, str):
        return route or "/"
    return None


def _install_django(handler: Any) -> bool:
    try:
        from django.core.handlers.base import BaseHandler
    except ImportError:  # pragma: no cover - django module without django installed
        return False
    if not isinstance(handler, BaseHandler):
        return False
    original: Callable[[Any], Any] = handler.resolve_request
    if getattr(original, "memwatch_hook", False):
        return True

    def resolve_request(request: Any) -> Any:
        result = original(request)
        route = django_template(request)
        if route is not None:
            target = getattr(request, "scope", None)
            if target is None:
                target = getattr(request, "environ", None)
            if target is not None:
                target[ROUTE_KEY] = route
        return result

    resolve_request.memwatch_hook = True  # type: ignore[attr-defined]
    handler.resolve_request = resolve_request
    return True
