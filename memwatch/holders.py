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
"""

from __future__ import annotations

import collections
import gc
import itertools
import logging
import sys
import time
import tracemalloc
import types
from dataclasses import dataclass
from typing import Any

MAX_HOLDERS = 10
_CONTAINERS = (dict, list, set, collections.deque, bytearray)
_SKIP_MODULE_PREFIXES = ("memwatch", "tracemalloc", "linecache", "objgraph", "_pytest", "pytest")


def _skipped(module_name: str) -> bool:
    if module_name.startswith("memwatch.demo"):
        return False
    return module_name.startswith(_SKIP_MODULE_PREFIXES)


@dataclass(frozen=True)
class Holder:
    path: str
    type: str
    length: int
    growth: int


@dataclass
class Census:
    lengths: dict[str, tuple[str, int]]
    partial: bool
    seconds: float


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


def take_census(budget_seconds: float = 1.0) -> Census:
    """Lengths of module-level and class-level containers, caches and logger handler lists.

    Iterates namespaces in place (no copies: it may run while tracemalloc traces every
    allocation) and formats a path only for what it measures.
    """
    # Budgets count this thread's CPU time: under load, other threads' turns must not use it up.
    start = time.thread_time()
    deadline = start + budget_seconds
    lengths: dict[str, tuple[str, int]] = {}
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
                    lengths[f"{module_name}.{name}"] = measured
                elif type(value) is type and value.__dict__.get("__module__") == module_name:
                    for attr, member in value.__dict__.items():
                        measured = _length(member)
                        if measured is not None and not attr.startswith("__"):
                            lengths[f"{module_name}.{name}.{attr}"] = measured
        except RuntimeError:  # a namespace changed while we read it: skip that module
            continue
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger):
            lengths[f"the handlers list of logger {name!r}"] = ("list", len(logger.handlers))
    root = logging.getLogger()
    lengths["the handlers list of the root logger"] = ("list", len(root.handlers))
    return Census(lengths, partial, time.thread_time() - start)


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
        holders.setdefault(path, Holder(path=path, type=kind, length=length, growth=0))
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


def _name_in(parent: Any, child: Any) -> str | None:
    """The attribute or key under which ``parent`` holds ``child``; "" for an instance dict."""
    if child is getattr(parent, "__dict__", None):
        return ""
    namespace = vars(parent) if isinstance(parent, types.ModuleType | type) else parent
    if isinstance(namespace, dict):
        for key, value in namespace.items():
            if value is child:
                return str(key) if isinstance(key, str) else "<item>"
    if isinstance(parent, list | tuple | set | collections.deque):
        return "<item>"
    return None
