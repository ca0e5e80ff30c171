"""Who holds the growth: a census of long-lived containers, and back-reference chains.

Two bounded searches run inside a diagnosis window (never per request):

- **Census.** The lengths of the containers that live as long as the process: module globals
  (``myapp.auth.TOKEN_CACHE``), class attributes (``myapp.models.Registry.items``), function
  caches (``cache_info().currsize``) and the handler lists of loggers
  (``logging.getLogger('eval.payments').handlers``). Taken at the start and at the end of the
  window, the differences name the containers that grew. Library modules are included: growth
  often sits in a library's registry, fed by the app.
- **Back-reference chains** (objgraph) from a few objects of the types that grew, allocated
  during the window (``tracemalloc.get_object_traceback`` tells them apart from old ones), up to
  a module: for holders that are not module-level (an attribute of an instance held somewhere).

Both stop at a time budget and say so (``partial``) rather than run long.

For each container that grew, :func:`describe` then looks at its *new* entries (the last ones
appended or inserted) and records their shape, never their values: the types of keys and items,
the length range of string keys and the share of them shaped like tokens, how many are large
buffers, finished asyncio tasks, logging handlers or exceptions, which requests allocated them
and from which line (tracemalloc's traceback of each object), and who owns the container (the
application's module or a library's). :mod:`memwatch.advice` turns that into advice.
"""

from __future__ import annotations

import collections
import gc
import importlib.machinery
import itertools
import logging
import math
import os
import statistics
import sys
import sysconfig
import threading
import time
import tracemalloc
import types
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

MAX_HOLDERS = 10
_CONTAINERS = (dict, list, set, collections.deque, bytearray)
_SKIP_MODULE_PREFIXES = ("memwatch", "tracemalloc", "linecache", "objgraph", "_pytest", "pytest")


def _skipped(module_name: str) -> bool:
    if module_name.startswith("memwatch.demo"):
        return False
    return module_name.startswith(_SKIP_MODULE_PREFIXES)


RouteKey = tuple[str, str, str]
# Where an object was allocated: the (route, method, auth) of the request that made it (from the
# diagnosis window's trampoline frames) and the application line, as "file:line". None, None when
# the object was not traced (allocated before the window, or tracing is off).
Origin = Callable[[Any], tuple[RouteKey | None, str | None]]

MAX_EXAMINED = 1000  # new entries whose allocation is looked up, per holder
MAX_SHAPED = 200  # of those, entries whose type and size are looked at
MAX_SET_SCAN = 20_000  # members of a set scanned for the ones the window allocated
LARGE_BYTES = 512  # pymalloc's limit: bigger objects come from malloc (and show in RSS)
STDLIB = "stdlib"
LIBRARY = "library"
APP = "app"


@dataclass(frozen=True)
class Evidence:
    """The shape of a holder's new entries, without any of their values.

    Args:
        owner: who owns the container: ``app``, ``library``, ``stdlib`` (from the file of the
            module that holds it) or ``unknown``.
        module: the name of that module.
        bound: ``maxlen`` of a deque, ``maxsize`` of a function cache; None when unbounded.
        in_class: the container is a class attribute (a function cache there is a method's).
        examined: new entries looked at.
        traced: of those, how many a request of the window allocated (a trampoline frame in
            their allocation traceback).
        key_types, item_types: type names of new keys (dicts, sets) and of new items (lists,
            deques) or values (dicts), most common first.
        roles: what the new entries are, where it matters for the fix (``logging handler``,
            ``asyncio task``, ``exception``, ``traceback or frame``, ``callable``, ``bytes``,
            ``str``, ``dict``, ``tuple``, ``log record``, ``weak reference``, ``thread``).
        str_lengths: (shortest, median, longest) length of new str keys (dicts, sets) or items.
        token_like: share of those strings shaped like a token (long, no spaces, high entropy).
        large: new entries of at least :data:`LARGE_BYTES` bytes (buffers, long strings).
        done: new asyncio tasks or futures already finished.
        routes: traced new entries per (route, method, auth), most first.
        sites: the application lines that allocated new entries, most first.
        partial: the look was cut short (budget, or the container changed while read).
    """

    owner: str = "unknown"
    module: str | None = None
    bound: int | None = None
    in_class: bool = False
    examined: int = 0
    traced: int = 0
    key_types: tuple[str, ...] = ()
    item_types: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    str_lengths: tuple[int, int, int] | None = None
    token_like: float | None = None
    large: int = 0
    done: int = 0
    routes: tuple[tuple[RouteKey, int], ...] = ()
    sites: tuple[str, ...] = ()
    partial: bool = False


@dataclass(frozen=True)
class Holder:
    path: str
    type: str
    length: int
    growth: int
    evidence: Evidence | None = None


@dataclass(frozen=True)
class Ref:
    """A measured container: the module that holds it, the object, and whether it is a class
    attribute. Kept only by a census taken with ``keep=True``, for :func:`describe`."""

    module: str
    obj: Any
    in_class: bool = False


@dataclass
class Census:
    lengths: dict[str, tuple[str, int]]
    partial: bool
    seconds: float
    refs: dict[str, Ref] = field(default_factory=dict)


def _length(value: Any) -> tuple[str, int] | None:
    """The length of a container or a function cache; None for anything else.

    Only the *type* is inspected before measuring: module globals include lazy objects and
    proxies (Werkzeug's ``LocalProxy``, Django's ``LazySettings``) whose attribute access has
    side effects or raises.
    """
    kind = type(value)
    try:
        if issubclass(kind, _CONTAINERS):
            return kind.__name__, len(value)
        if callable(getattr(kind, "cache_info", None)) and callable(
            getattr(kind, "cache_clear", None)
        ):
            return "lru_cache", int(value.cache_info().currsize)
    except Exception:
        return None
    return None


def _modules_app_first() -> list[tuple[str, types.ModuleType]]:
    """Modules, the application's before the libraries' (a time budget may cut the tail)."""
    app: list[tuple[str, types.ModuleType]] = []
    libraries: list[tuple[str, types.ModuleType]] = []
    for name, module in list(sys.modules.items()):
        if not isinstance(module, types.ModuleType) or _skipped(name):
            continue
        filename = getattr(module, "__file__", None) or ""
        library = not filename or "site-packages" in filename or filename.startswith(sys.prefix)
        (libraries if library and not name.startswith("memwatch.demo") else app).append(
            (name, module)
        )
    return app + libraries


def take_census(budget_seconds: float = 1.0, *, keep: bool = False) -> Census:
    """Lengths of module-level and class-level containers, caches and logger handler lists.

    Iterates namespaces in place (no copies: it may run while tracemalloc traces every
    allocation) and formats a path only for what it measures. With ``keep``, the census also
    keeps a reference to each container (for :func:`describe`); drop it soon.
    """
    # Budgets count this thread's CPU time: under load, other threads' turns must not use it up.
    start = time.thread_time()
    deadline = start + budget_seconds
    lengths: dict[str, tuple[str, int]] = {}
    refs: dict[str, Ref] = {}
    partial = False
    for module_name, module in _modules_app_first():
        if time.thread_time() > deadline:
            partial = True
            break
        try:
            namespace = module.__dict__
            for name, value in namespace.items():
                if name == "__builtins__":
                    continue
                measured = _length(value)
                if measured is not None:
                    path = f"{module_name}.{name}"
                    lengths[path] = measured
                    if keep:
                        refs[path] = Ref(module_name, value)
                elif type(value) is type and value.__dict__.get("__module__") == module_name:
                    for attr, member in value.__dict__.items():
                        measured = _length(member)
                        if measured is not None and not attr.startswith("__"):
                            path = f"{module_name}.{name}.{attr}"
                            lengths[path] = measured
                            if keep:
                                refs[path] = Ref(module_name, member, in_class=True)
        except RuntimeError:  # a namespace changed while we read it: skip that module
            continue
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger):
            path = f"the handlers list of logger {name!r}"
            lengths[path] = ("list", len(logger.handlers))
            if keep:
                refs[path] = Ref("logging", logger.handlers)
    root = logging.getLogger()
    lengths["the handlers list of the root logger"] = ("list", len(root.handlers))
    if keep:
        refs["the handlers list of the root logger"] = Ref("logging", root.handlers)
    return Census(lengths, partial, time.thread_time() - start, refs)


def grown(before: Census, after: Census, minimum: int) -> list[Holder]:
    """Containers that grew by at least ``minimum`` items between two censuses."""
    out = []
    for path, (kind, length) in after.lengths.items():
        prior = before.lengths.get(path)
        if prior is None:
            continue
        growth = length - prior[1]
        if growth >= minimum:
            out.append(Holder(path=path, type=kind, length=length, growth=growth))
    out.sort(key=lambda h: -h.growth)
    return out[:MAX_HOLDERS]


def backref_holders(
    sites: list[tuple[str, int]],
    budget_seconds: float = 1.0,
    samples: int = 3,
) -> tuple[list[Holder], bool]:
    """Chains from objects allocated at the given sites (while tracing) up to a module.

    Walks the gc-tracked objects once, keeps up to ``samples`` whose allocation traceback ends
    at one of ``sites``, and asks objgraph for a back-reference chain to a module from each.
    Returns the holders found and whether the time budget cut the search short.
    """
    if not tracemalloc.is_tracing() or not sites:
        return [], False
    import objgraph

    wanted = set(sites)
    deadline = time.thread_time() + budget_seconds
    found: list[Any] = []
    partial = False
    for index, obj in enumerate(gc.get_objects()):
        if index % 4096 == 0 and time.thread_time() > deadline:
            partial = True
            break
        tb = tracemalloc.get_object_traceback(obj)
        if tb is None:
            continue
        frame = tb[-1] if len(tb) else None  # most recent frame
        if frame is not None and (frame.filename, frame.lineno) in wanted:
            found.append(obj)
            if len(found) >= samples:
                break
    holders: dict[str, Holder] = {}
    for obj in found:
        remaining = deadline - time.thread_time()
        if remaining <= 0:
            partial = True
            break
        try:
            chain = objgraph.find_backref_chain(obj, objgraph.is_proper_module, max_depth=12)
        except Exception:
            continue
        path = _dotted(chain)
        if path is None:
            continue
        holder_obj = chain[1] if len(chain) > 2 else None
        length = len(holder_obj) if isinstance(holder_obj, _CONTAINERS) else 0
        kind = type(holder_obj).__name__ if holder_obj is not None else type(obj).__name__
        module = chain[0].__name__
        evidence = Evidence(owner=owner_of(module), module=module)
        holders.setdefault(
            path, Holder(path=path, type=kind, length=length, growth=0, evidence=evidence)
        )
    del found
    return list(holders.values()), partial


def _dotted(chain: list[Any]) -> str | None:
    """A readable path for a chain [module, ..., obj]: module.attr[...]."""
    if not chain or not isinstance(chain[0], types.ModuleType):
        return None
    parts = [chain[0].__name__]
    for parent, child in itertools.pairwise(chain[:-1]):
        name = _name_in(parent, child)
        if name is None:
            parts.append(f"<{type(child).__name__}>")
        elif name:
            parts.append(name)
    return ".".join(parts)


def _attribute_like(key: str) -> bool:
    """A short identifier that does not look like a token: an attribute name in an instance's
    ``__dict__`` (a data dict keyed by such names is harmless to name too)."""
    return key.isidentifier() and len(key) <= 40 and not token_like(key)


def _name_in(parent: Any, child: Any) -> str | None:
    """The attribute or key under which ``parent`` holds ``child``; "" for an instance dict."""
    if child is getattr(parent, "__dict__", None):
        return ""
    named = isinstance(parent, types.ModuleType | type)
    namespace = vars(parent) if named else parent
    if isinstance(namespace, dict):
        for key, value in namespace.items():
            if value is child:
                # An attribute name, never a data key: a dict keyed by tokens or request values
                # must not put one in a report.
                if isinstance(key, str) and (named or _attribute_like(key)):
                    return key
                return "<item>"
    if isinstance(parent, list | tuple | set | collections.deque):
        return "<item>"
    return None


# --- what a holder's new entries look like -------------------------------------------------

_STDLIB_DIRS = tuple(
    {
        os.path.abspath(p)
        for p in (sysconfig.get_paths().get("stdlib"), sysconfig.get_paths().get("platstdlib"))
        if p
    }
)


def owner_of(module_name: str | None) -> str:
    """``app``, ``library`` or ``stdlib`` (from the module's file), else ``unknown``."""
    if not module_name:
        return "unknown"
    module = sys.modules.get(module_name)
    filename = getattr(module, "__file__", None) if module is not None else None
    if not filename:
        top = module_name.split(".", 1)[0]
        builtin = top in sys.builtin_module_names or top in sys.stdlib_module_names
        return STDLIB if builtin else "unknown"
    filename = os.path.abspath(filename)
    if "site-packages" in filename or "dist-packages" in filename:
        return LIBRARY
    if filename.startswith(_STDLIB_DIRS):
        return STDLIB
    return APP


def extension_modules(limit: int = 12) -> list[str]:
    """Top-level names of the loaded C extension modules that are not the standard library's
    (native leaks live there). Names only; sorted."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    found: set[str] = set()
    for name, module in list(sys.modules.items()):
        filename = getattr(module, "__file__", None)
        if not isinstance(filename, str) or not filename.endswith(suffixes):
            continue
        if os.path.abspath(filename).startswith(_STDLIB_DIRS) and "-packages" not in filename:
            continue
        found.add(name.split(".", 1)[0])
    return sorted(found)[:limit]


def _type_name(value: Any) -> str:
    kind = type(value)
    module = getattr(kind, "__module__", "builtins")
    name = getattr(kind, "__qualname__", kind.__name__)
    if module in ("builtins", None):
        return name
    if module.startswith("_") and module[1:] in sys.stdlib_module_names:
        module = module[1:]  # _asyncio.Task is asyncio.Task to its users
    return f"{module}.{name}"


def _future_type() -> Any:
    """``asyncio.Future`` once asyncio is loaded; before that no object can be one, and the
    holder search does not import asyncio (about 1.5 MB) into a process that never did."""
    return getattr(sys.modules.get("asyncio"), "Future", ())


def _role(value: Any) -> str | None:
    """What an entry is, where it matters for the fix (isinstance checks only: no attribute of
    the value is read, so no property or proxy runs)."""
    if isinstance(value, logging.Handler):
        return "logging handler"
    if isinstance(value, _future_type()):
        return "asyncio task"
    if isinstance(value, BaseException):
        return "exception"
    if isinstance(value, types.TracebackType | types.FrameType):
        return "traceback or frame"
    if isinstance(value, logging.LogRecord):
        return "log record"
    if isinstance(value, bytes | bytearray | memoryview):
        return "bytes"
    if isinstance(value, str):
        return "str"
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, tuple):
        return "tuple"
    if isinstance(value, types.FunctionType | types.MethodType | types.BuiltinFunctionType):
        return "callable"
    if isinstance(value, type):
        return "class"
    if isinstance(value, weakref.ref):
        return "weak reference"
    if isinstance(value, threading.Thread):
        return "thread"
    return None


_SCHEMES = ("bearer ", "basic ", "token ", "digest ")
_VOWELS = frozenset("aeiouAEIOU")
_HEX_LETTERS = frozenset("abcdefABCDEF")


def token_like(text: str) -> bool:
    """Shaped like a token, a key or a hash: at least 20 characters (after an auth scheme
    prefix), no whitespace, a high character entropy (at least 3.5 bits per character over the
    first 256; 3 for hex), and letters that are hex digits or carry few vowels (random base64
    has about one in five; words have one in three or more). Words, names, paths and ids
    (``user-0042``, ``/reports/12/summary``) are not."""
    if text[:7].lower().startswith(_SCHEMES):
        text = text.split(" ", 1)[1]
    sample = text[:256]
    if len(sample) < 20 or any(c.isspace() for c in sample):
        return False
    counts = collections.Counter(sample)
    n = len(sample)
    entropy = -sum(c / n * math.log2(c / n) for c in counts.values())
    letters = [c for c in sample if c.isalpha()]
    if all(c in _HEX_LETTERS for c in letters):  # hex digests, UUIDs: 16 symbols at most
        return entropy >= 3.0
    return entropy >= 3.5 and sum(c in _VOWELS for c in letters) / len(letters) < 0.3


def _newest(obj: Any, count: int) -> tuple[list[Any], list[Any], bool]:
    """(keys, items) of the newest ``count`` entries; keys only for dicts and sets. Reads the
    container in place; a container that changes while read gives what was read (partial)."""
    keys: list[Any] = []
    items: list[Any] = []
    try:
        if isinstance(obj, dict):
            for key in itertools.islice(reversed(obj), count):
                keys.append(key)
                items.append(obj.get(key))
        elif isinstance(obj, list | collections.deque):
            size = len(obj)
            for i in range(1, min(count, size) + 1):
                items.append(obj[size - i])
        elif isinstance(obj, set | frozenset):
            keys.extend(itertools.islice(iter(obj), MAX_SET_SCAN))
    except (RuntimeError, IndexError):
        return keys, items, True
    return keys, items, False


def _origin_of(entry: Any, origin: Origin) -> tuple[RouteKey | None, str | None]:
    """Where ``entry`` was allocated; for an object tracemalloc cannot place (on Python 3.11,
    instances of Python classes, whose dict is managed by the interpreter), where one of the
    objects it refers to was: its attributes were made in the same call."""
    found = origin(entry)
    if found != (None, None) or isinstance(entry, str | bytes | int | float | type):
        return found
    try:
        referents = gc.get_referents(entry)
    except Exception:
        return found
    for referent in referents[:8]:
        if isinstance(referent, type | types.ModuleType):
            continue
        found = origin(referent)
        if found != (None, None):
            return found
    return found


def describe(
    ref: Ref | None,
    growth: int,
    origin: Origin | None = None,
    budget_seconds: float = 0.2,
) -> Evidence:
    """The shape of the ``growth`` newest entries of a measured container (see :class:`Evidence`).

    Only types, counts, lengths and allocation places are recorded: no key or value is kept or
    formatted. ``origin`` (from the diagnosis window) tells which request and which line
    allocated an entry.
    """
    if ref is None:
        return Evidence()
    obj = ref.obj
    owner = owner_of(ref.module)
    bound: int | None = None
    if isinstance(obj, collections.deque):
        bound = obj.maxlen
    elif not isinstance(obj, _CONTAINERS):
        try:
            maxsize = obj.cache_info().maxsize  # a function cache: nothing else to look at
        except Exception:
            maxsize = None
        return Evidence(owner, ref.module, maxsize, ref.in_class)
    deadline = time.thread_time() + budget_seconds
    keys, items, partial = _newest(obj, min(max(growth, 0), MAX_EXAMINED))
    keyed = bool(keys)
    is_set = isinstance(obj, set | frozenset)
    entries = keys if keyed else items
    routes: collections.Counter[RouteKey] = collections.Counter()
    sites: collections.Counter[str] = collections.Counter()
    traced = 0
    chosen: list[int] = []  # indexes of the new entries (all of them but for sets)
    for index, entry in enumerate(entries):
        if index % 256 == 0 and time.thread_time() > deadline:
            partial = True
            break
        route: RouteKey | None = None
        site: str | None = None
        if origin is not None:
            route, site = _origin_of(entry, origin)
            if route is None and site is None and keyed and not is_set:
                route, site = _origin_of(items[index], origin)  # an interned key: its value
        if is_set and route is None and site is None and origin is not None:
            continue  # a member from before the window
        chosen.append(index)
        if route is not None or site is not None:
            traced += 1
        if route is not None:
            routes[route] += 1
        if site is not None:
            sites[site] += 1
        if is_set and len(chosen) >= min(max(growth, 0), MAX_EXAMINED):
            break
    if is_set and origin is None:
        chosen = list(range(min(len(keys), max(growth, 0), MAX_EXAMINED)))
    shaped = chosen[:MAX_SHAPED]
    key_types = collections.Counter(_type_name(keys[i]) for i in shaped) if keyed else None
    values = [] if is_set else [items[i] for i in shaped]
    item_types = collections.Counter(_type_name(v) for v in values)
    roles = collections.Counter(
        r for r in (_role(v) for v in (values or [keys[i] for i in shaped])) if r is not None
    )
    texts = [k for k in (keys[i] for i in shaped) if isinstance(k, str)] if keyed else []
    if not keyed:
        texts = [v for v in values if isinstance(v, str)]
    lengths = sorted(len(t) for t in texts)
    large = 0
    done = 0
    future = _future_type()
    for value in values or [keys[i] for i in shaped]:
        if isinstance(value, bytes | bytearray | str) and sys.getsizeof(value) >= LARGE_BYTES:
            large += 1
        if isinstance(value, future) and value.done():
            done += 1
    evidence = Evidence(
        owner=owner,
        module=ref.module,
        bound=bound,
        in_class=ref.in_class,
        examined=len(chosen),
        traced=traced,
        key_types=_ranked(key_types),
        item_types=_ranked(item_types),
        roles=_ranked(roles),
        str_lengths=(lengths[0], int(statistics.median(lengths)), lengths[-1]) if lengths else None,
        token_like=(sum(map(token_like, texts)) / len(texts)) if texts else None,
        large=large,
        done=done,
        routes=tuple(routes.most_common(5)),
        sites=tuple(s for s, _ in sites.most_common(3)),
        partial=partial,
    )
    del keys, items, entries, values, texts
    return evidence


def _ranked(counter: collections.Counter[str] | None, limit: int = 3) -> tuple[str, ...]:
    return tuple(name for name, _ in counter.most_common(limit)) if counter else ()


def describe_all(
    holders: Iterable[Holder],
    refs: dict[str, Ref],
    origin: Origin | None,
    budget_seconds: float = 1.0,
) -> list[Holder]:
    """``holders`` with their :class:`Evidence`, within a total CPU budget."""
    deadline = time.thread_time() + budget_seconds
    out = []
    for holder in holders:
        remaining = deadline - time.thread_time()
        if remaining <= 0:
            out.append(holder)
            continue
        try:
            evidence = describe(refs.get(holder.path), holder.growth, origin, min(remaining, 0.3))
        except Exception:  # an exotic container: the holder stands without its evidence
            out.append(holder)
            continue
        out.append(Holder(holder.path, holder.type, holder.length, holder.growth, evidence))
    return out
