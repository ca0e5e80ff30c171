"""Remediation advice: from the holder of a leak to the change that fixes it.

Pure functions over what a diagnosis window found (:class:`memwatch.diagnosis.DiagnosisResult`,
its holders and their :class:`memwatch.holders.Evidence`) and what the detector said
(:class:`Context`): no I/O, no clock. Each :class:`Advice` is an imperative sentence, the
evidence it rests on (short strings), a confidence and the holder it is about:

- ``confident``: a holder that grew during a window, whose new entries were looked at, and whose
  shape names the fix (an unbounded dict whose new keys are token-shaped, a set of finished
  asyncio tasks, a handler list that gains a handler per request);
- ``likely``: thinner evidence (no window yet, a holder found only by a back-reference chain,
  entries that could not be traced to a request, a library registry whose intended use memwatch
  can only describe in general, growth with no Python holder at all). The sentence then ends
  with "(likely)".

Advice never names a holder that was not found, and never contains a key, a value, a credential
or anything else from a request: only holder paths (module and attribute names), type names,
counts, lengths, route templates and source lines. Recycling workers is offered as a stopgap
(:data:`STOPGAP`), never as the fix. docs/advice.md lists the shapes and where they come from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memwatch.diagnosis import DiagnosisResult

if TYPE_CHECKING:
    # memwatch.holders (the holder search) is imported by the diagnosis window that finds
    # holders; advice about a holder runs only after that, so it imports it then (cached).
    from memwatch.holders import Evidence, Holder
    from memwatch.monitor import Snapshot

RouteKey = tuple[str, str, str]

CONFIDENT = "confident"
LIKELY = "likely"

STOPGAP = (
    "Stopgap until the fix ships, not a fix: recycle workers (gunicorn --max-requests N "
    "--max-requests-jitter M, uvicorn --limit-max-requests N) to contain the growth."
)

# Shapes (the ``shape`` of an Advice; docs/advice.md describes each).
CREDENTIAL_KEYED = "credential-keyed cache"
REQUEST_KEYED = "cache keyed by request values"
GROWING_SET = "set of request values"
APPEND_ONLY = "append-only list"
LARGE_BUFFERS = "kept buffers"
TASK_SET = "finished asyncio tasks kept"
LOGGER_HANDLERS = "logging handlers added per request"
WARNING_REGISTRY = "warnings registry"
METRIC_LABELS = "unbounded metric labels"
SIGNAL_RECEIVERS = "signal receivers connected per request"
UNBOUNDED_CACHE = "unbounded function cache"
METHOD_CACHE = "function cache on a method"
EXCEPTIONS_KEPT = "exceptions kept with their tracebacks"
CALLBACKS = "callbacks registered per request"
LIBRARY_REGISTRY = "library registry fed by the app"
BOUNDED = "bounded container filling"
UNBOUNDED_CONTAINER = "unbounded container"
NATIVE = "no Python holder (native)"
UNHELD_SITE = "allocation site without a found holder"
NOTHING_RETAINED = "nothing retained in the window"
UNDIAGNOSED = "not diagnosed yet"

SHAPES = (
    CREDENTIAL_KEYED,
    REQUEST_KEYED,
    GROWING_SET,
    APPEND_ONLY,
    LARGE_BUFFERS,
    TASK_SET,
    LOGGER_HANDLERS,
    WARNING_REGISTRY,
    METRIC_LABELS,
    SIGNAL_RECEIVERS,
    UNBOUNDED_CACHE,
    METHOD_CACHE,
    EXCEPTIONS_KEPT,
    CALLBACKS,
    LIBRARY_REGISTRY,
    BOUNDED,
    UNBOUNDED_CONTAINER,
    NATIVE,
    UNHELD_SITE,
    NOTHING_RETAINED,
    UNDIAGNOSED,
)

TOKEN_SHARE = 0.5  # share of token-shaped new keys that makes a cache credential-keyed


@dataclass(frozen=True)
class Context:
    """What the detector and the counters say, for advice.

    Args:
        suspected: the process verdict.
        signal: the signal the verdict is on (``heap`` or ``rss``).
        scales_with: ``requests``, ``distinct_credentials``, ``undetermined`` or None.
        growth_bytes_per_request: the process growth.
        suspected_routes: the (route, method, auth) marked as leaking.
        outcomes: requests per outcome (``ok``, ``rejected``, ...) of each (route, method, auth).
    """

    suspected: bool = False
    signal: str | None = None
    scales_with: str | None = None
    growth_bytes_per_request: float | None = None
    suspected_routes: tuple[RouteKey, ...] = ()
    outcomes: Mapping[RouteKey, Mapping[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Advice:
    """One piece of advice.

    Args:
        shape: which shape of evidence it answers (one of :data:`SHAPES`).
        text: an imperative sentence.
        evidence: what it rests on, short strings.
        confidence: :data:`CONFIDENT` or :data:`LIKELY`.
        holder: the holder's path, or None when no holder was found.
        stopgap: containment until the fix ships (never the fix); None when nothing leaks.
    """

    shape: str
    text: str
    evidence: tuple[str, ...]
    confidence: str
    holder: str | None = None
    stopgap: str | None = STOPGAP

    @property
    def line(self) -> str:
        """The sentence, with "(likely)" when the evidence is thin: the report's ``advice``."""
        return f"{self.text} (likely)" if self.confidence == LIKELY else self.text

    def as_dict(self) -> dict[str, Any]:
        """The report's ``advice_detail``."""
        return {
            "text": self.text,
            "shape": self.shape,
            "confidence": self.confidence,
            "holder": self.holder,
            "evidence": list(self.evidence),
            "stopgap": self.stopgap,
        }

    def log_text(self) -> str:
        """One line for the leak warning: sentence, evidence, stopgap."""
        parts = [self.line]
        if self.evidence:
            parts.append("evidence: " + "; ".join(self.evidence[:4]))
        if self.stopgap:
            parts.append(self.stopgap)
        return " — ".join(parts)


def context_of(snapshot: Snapshot) -> Context:
    """The :class:`Context` of a monitor snapshot."""
    outcomes: dict[RouteKey, dict[str, int]] = {}
    for (route, method, auth, outcome), n in snapshot.counts.items():
        per = outcomes.setdefault((route, method, auth), {})
        per[outcome] = per.get(outcome, 0) + n
    verdict = snapshot.verdict
    return Context(
        suspected=verdict.suspected,
        signal=verdict.signal,
        scales_with=snapshot.scales_with if verdict.suspected else None,
        growth_bytes_per_request=verdict.bytes_per_request,
        suspected_routes=tuple(e.key for e in snapshot.routes if e.suspected),
        outcomes=outcomes,
    )


def leak_advice(snapshot: Snapshot) -> Advice | None:
    """The top advice for a suspected leak in ``snapshot`` (None when nothing is suspected):
    what the leak warning logs."""
    ctx = context_of(snapshot)
    if not ctx.suspected:
        return None
    return advise(snapshot.diagnosis, ctx)[0]


# --- formatting helpers (names, counts and lengths only) -------------------------------------


def _route(key: RouteKey) -> str:
    route, method, auth = key
    return f"{method} {route} ({auth})"


def _name(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _types(names: Sequence[str]) -> str:
    return " / ".join(names) if names else "objects"


def _owner_phrase(ev: Evidence) -> str:
    from memwatch.holders import APP, LIBRARY, STDLIB

    if ev.owner == APP:
        return f"in the app's module {ev.module}" if ev.module else "in the app"
    if ev.owner in (LIBRARY, STDLIB):
        what = "the standard library's" if ev.owner == STDLIB else "the library"
        return f"owned by {what} {_top(ev.module)}"
    return ""


def _top(module: str | None) -> str:
    return (module or "?").split(".", 1)[0]


@dataclass(frozen=True)
class _Rates:
    per_route: tuple[tuple[RouteKey, float], ...]  # new entries per tagged request, most first
    rejected_path: RouteKey | None  # the route whose rejected share the rate matches


def _rates(holder: Holder, result: DiagnosisResult | None, ctx: Context) -> _Rates:
    ev = holder.evidence
    if ev is None or not ev.routes or result is None or not result.route_requests:
        return _Rates((), None)
    scale = holder.growth / ev.examined if ev.examined and holder.growth > ev.examined else 1.0
    rates = []
    for key, n in ev.routes:
        requests = result.route_requests.get(key, 0)
        if requests > 0:
            rates.append((key, n * scale / requests))
    rates.sort(key=lambda kr: -kr[1] * result.route_requests.get(kr[0], 0))
    rejected_path = None
    if rates:
        key, rate = rates[0]
        counts = ctx.outcomes.get(key, {})
        total = sum(counts.values())
        share = counts.get("rejected", 0) / total if total else 0.0
        # Entries on (about) the rejected share of a route's requests, well below one per
        # request: the rejection path keeps them.
        if 0.02 <= share <= 0.9 and abs(rate - share) <= max(0.08, 0.3 * share) and rate < 0.85:
            rejected_path = key
    return _Rates(tuple(rates[:3]), rejected_path)


def _facts(holder: Holder, rates: _Rates, ctx: Context) -> list[str]:
    from memwatch.holders import Evidence

    ev = holder.evidence or Evidence()
    owner = _owner_phrase(ev)
    facts = []
    where = f" ({holder.type}, {owner})" if owner else f" ({holder.type})"
    if holder.growth > 0:
        facts.append(
            f"{holder.path}{where} grew by {holder.growth:,} entries in the diagnosis window, "
            f"to {holder.length:,}"
        )
    else:
        facts.append(
            f"{holder.path}{where} holds objects allocated at the growing sites "
            "(back-reference chain)"
        )
    if ev.bound is not None:
        facts.append(f"it is bounded at {ev.bound:,} entries")
    if ev.key_types:
        keys = f"its new keys are {_types(ev.key_types)}"
        if ev.str_lengths is not None:
            low, _median, high = ev.str_lengths
            keys += f" of {low}–{high} characters" if low != high else f" of {low} characters"
        if ev.token_like is not None:
            keys += f", {ev.token_like:.0%} shaped like tokens (long, high-entropy)"
        facts.append(keys)
    if ev.item_types:
        items = f"its new {'values' if ev.key_types else 'items'} are {_types(ev.item_types)}"
        if ev.large:
            items += f", {ev.large} of the {min(ev.examined, 200)} looked at ≥ 512 bytes"
        if ev.done and "asyncio task" in ev.roles:
            items += f", {ev.done} of them already finished"
        facts.append(items)
    elif ev.done and "asyncio task" in ev.roles:
        facts.append(f"{ev.done} of the {min(ev.examined, 200)} new tasks looked at are finished")
    for key, rate in rates.per_route[:2]:
        facts.append(f"new entries come from {_route(key)}: {rate:.2f} per request")
    if rates.rejected_path is not None:
        counts = ctx.outcomes.get(rates.rejected_path, {})
        share = counts.get("rejected", 0) / max(sum(counts.values()), 1)
        facts.append(f"{share:.0%} of that route's requests are rejected (401/403): the same rate")
    if ev.sites:
        facts.append("allocated at " + ", ".join(ev.sites[:2]))
    if ctx.scales_with == "distinct_credentials":
        facts.append("the process growth scales with distinct credentials")
    if ev.partial:
        facts.append("the look at its entries was cut short")
    return facts


def _confidence(holder: Holder, rates: _Rates, ctx: Context, *, strong: bool) -> str:
    """Confident when the holder grew in a window, its new entries were seen, the shape says
    what to change, and (when routes are marked) its entries come from a marked route."""
    ev = holder.evidence
    if ev is None or holder.growth <= 0 or ev.partial or not strong:
        return LIKELY
    if ctx.suspected_routes and rates.per_route:
        marked = {k for k, _ in rates.per_route} & set(ctx.suspected_routes)
        if not marked:
            return LIKELY
    return CONFIDENT


# --- one holder --------------------------------------------------------------------------------


def advise_holder(holder: Holder, result: DiagnosisResult | None, ctx: Context) -> Advice:
    """Advice for one holder, from the shape of its evidence (docs/advice.md has the list)."""
    from memwatch.holders import LIBRARY, STDLIB, Evidence

    ev = holder.evidence or Evidence()
    path = holder.path
    rates = _rates(holder, result, ctx)
    facts = tuple(_facts(holder, rates, ctx))
    site = ev.sites[0] if ev.sites else None
    at = f" (at {site})" if site else ""
    roles = set(ev.roles[:2])

    def made(shape: str, text: str, *, strong: bool = True) -> Advice:
        return Advice(shape, text, facts, _confidence(holder, rates, ctx, strong=strong), path)

    # Function caches (the census measures their currsize).
    if holder.type == "lru_cache":
        if ev.bound is not None:
            return Advice(
                BOUNDED,
                f"Leave {path} as it is: its cache is bounded at {ev.bound:,} entries and "
                "still filling.",
                facts,
                CONFIDENT if holder.growth > 0 else LIKELY,
                path,
                stopgap=None,
            )
        if ev.in_class:
            return made(
                METHOD_CACHE,
                f"Take the cache off the method {path}: a functools cache on a method keeps "
                "every instance (self) alive; cache a module-level function of plain values with "
                "functools.lru_cache(maxsize=…), or keep a bounded cache per instance.",
            )
        return made(
            UNBOUNDED_CACHE,
            f"Give the cache of {path} a size bound: functools.lru_cache(maxsize=…) instead of "
            "functools.cache or lru_cache(maxsize=None), or a TTL cache with a size bound.",
        )

    # Registries of the standard library and of libraries: the fix is in the call that feeds them.
    if path.startswith("the handlers list of") or "logging handler" in roles:
        logger = path[len("the handlers list of ") :] if path.startswith("the handlers") else None
        target = logger or "a logger"
        return made(
            LOGGER_HANDLERS,
            f"Stop adding a handler to {target} on every request{at}: configure its handlers "
            "once at startup and pass per-request context with a logging.Filter, a "
            "LoggerAdapter or extra={…}.",
        )
    if path == "logging._handlerList":
        return made(
            LOGGER_HANDLERS,
            f"Stop creating logging handlers per request{at}: logging keeps a reference to "
            f"every handler in {path}; configure handlers once at startup and pass per-request "
            "context with a logging.Filter or a LoggerAdapter.",
        )
    if path.endswith("__warningregistry__"):
        module = path[: -len(".__warningregistry__")]
        return made(
            WARNING_REGISTRY,
            f"Stop putting variable values in the warning messages issued from {module}: each "
            f"distinct message adds an entry to {path}; use a fixed message and log the value.",
        )
    item_modules = {_top(t) for t in (*ev.item_types, *ev.key_types) if "." in t}
    if "prometheus_client" in item_modules or _top(ev.module) == "prometheus_client":
        return made(
            METRIC_LABELS,
            f"Drop unbounded label values from the metric held in {path}{at}: prometheus_client "
            "keeps a child per label combination forever; label by route template, status "
            "class or scheme, never by user, id, token or raw path.",
        )
    if _name(path) == "receivers" and _top(ev.module) in ("django", "blinker", "flask"):
        return made(
            SIGNAL_RECEIVERS,
            f"Connect the receiver once at startup (AppConfig.ready(), with dispatch_uid), not "
            f"per request{at}: {path} keeps every receiver connected with weak=False.",
        )

    # What the entries are.
    if "asyncio task" in roles:
        name = _name(path)
        finished = ev.done >= max(1, ev.examined // 2) if ev.examined else False
        return made(
            TASK_SET,
            f"Discard finished tasks from {path}: call task.add_done_callback({name}.discard) "
            f"right after adding each task (or run them in an asyncio.TaskGroup).",
            strong=finished,
        )
    if roles & {"exception", "traceback or frame"}:
        return made(
            EXCEPTIONS_KEPT,
            f"Keep formatted text, not exception objects, in {path}: a stored exception keeps "
            "its traceback, its frames and all their locals alive; store "
            "traceback.format_exception(exc) or a short summary, and bound the container.",
        )
    if ev.owner in (LIBRARY, STDLIB):
        library = _top(ev.module)
        feeder = f"the call in the app that feeds {path}{at}"
        return made(
            LIBRARY_REGISTRY,
            f"Fix {feeder}: {library} keeps what it is given there; create that object or "
            f"registration once at startup and reuse it, as {library} expects, instead of per "
            "request.",
            strong=False,
        )
    if "callable" in roles:
        return made(
            CALLBACKS,
            f"Stop registering a callback per request in {path}{at}: register it once at "
            "startup, or remove it when the request ends.",
        )
    if ev.bound is not None:
        return Advice(
            BOUNDED,
            f"Leave {path} as it is: it is bounded at {ev.bound:,} entries and still filling.",
            facts,
            CONFIDENT if holder.growth > 0 else LIKELY,
            path,
            stopgap=None,
        )
    shaped = min(ev.examined, 200)
    if shaped and (ev.large * 2 >= shaped) and holder.type != "dict":
        return made(
            LARGE_BUFFERS,
            f"Stop keeping whole buffers in {path}: bound it (collections.deque(maxlen=…)) or "
            "write them to disk or object storage and keep only their names.",
        )
    if holder.type == "dict":
        credential = (ev.token_like or 0.0) >= TOKEN_SHARE or (
            ctx.scales_with == "distinct_credentials" and "str" in ev.key_types
        )
        if credential:
            return made(
                CREDENTIAL_KEYED,
                f"Bound {path}: it keeps an entry per new credential and never evicts one; "
                "cache with functools.lru_cache(maxsize=…) or a TTL cache with a size bound "
                "(cachetools.TTLCache(maxsize=…, ttl=…)), or validate the token statelessly on "
                "each request.",
                strong=(ev.token_like or 0.0) >= TOKEN_SHARE,
            )
        return made(
            REQUEST_KEYED,
            f"Bound {path}: its keys come from requests and are never evicted; use "
            "functools.lru_cache(maxsize=…) or a TTL cache with a size bound, or key it by "
            "something finite.",
            strong=bool(ev.traced),
        )
    if holder.type == "set":
        return made(
            GROWING_SET,
            f"Bound {path}: it gains members with requests and never loses one; remove members "
            "when they are done, or use a bounded structure (an LRU or TTL cache with a size "
            "bound).",
            strong=bool(ev.traced),
        )
    if holder.type in ("list", "deque"):
        rejected = rates.rejected_path
        when = (
            f"on the rejected (401/403) requests of {_route(rejected)}"
            if rejected is not None
            else (f"by {_route(rates.per_route[0][0])}" if rates.per_route else "per request")
        )
        return made(
            APPEND_ONLY,
            f"Replace {path}, appended to {when} and never trimmed, with "
            "collections.deque(maxlen=…), or hand its records to logging or metrics instead "
            "of keeping them.",
            strong=bool(ev.traced),
        )
    return made(
        UNBOUNDED_CONTAINER,
        f"Bound {path} ({holder.type}): nothing removes what requests add to it.",
        strong=False,
    )


# --- the leak as a whole -------------------------------------------------------------------


def _priority(advice: Advice, holder: Holder, ctx: Context) -> tuple[int, int]:
    ev = holder.evidence
    score = 0
    if advice.shape != BOUNDED:
        score += 8
    if holder.growth > 0:
        score += 4
    if (
        ev is not None
        and ctx.suspected_routes
        and {k for k, _ in ev.routes} & set(ctx.suspected_routes)
    ):
        score += 2
    if holder.path != "logging._handlerList":  # the logger's own list names the fix better
        score += 1
    return score, holder.growth


def advise(result: DiagnosisResult | None, ctx: Context) -> tuple[Advice | None, list[Advice]]:
    """(The top advice for the leak, advice per holder in ``result.holders`` order).

    The top advice is None when nothing is suspected and no window found anything to say.
    """
    holders = list(result.holders) if result is not None else []
    per_holder = [advise_holder(h, result, ctx) for h in holders]
    if per_holder:
        ranked = sorted(
            zip(per_holder, holders, strict=True),
            key=lambda ah: _priority(ah[0], ah[1], ctx),
            reverse=True,
        )
        top = ranked[0][0]
        if top.shape == BOUNDED and not ctx.suspected:
            return None, per_holder
        return top, per_holder
    if not ctx.suspected:
        return None, []
    return _without_holder(result, ctx), []


def _routes_phrase(ctx: Context) -> str:
    if not ctx.suspected_routes:
        return ""
    return " on " + ", ".join(_route(k) for k in ctx.suspected_routes[:2])


def _without_holder(result: DiagnosisResult | None, ctx: Context) -> Advice:
    """Advice when no holder was found: not diagnosed yet, native, or an unheld site."""
    routes = _routes_phrase(ctx)
    growth = ctx.growth_bytes_per_request
    grows = f"the {ctx.signal or 'memory'} grows" + (
        f" by {growth:,.0f} B per request" if growth is not None else ""
    )
    if result is None:
        facts = [grows + routes, "no diagnosis window has run since"]
        if ctx.scales_with == "distinct_credentials":
            facts.append("the growth scales with distinct credentials")
            return Advice(
                UNDIAGNOSED,
                f"Look for a cache keyed by the credential{routes} and bound it "
                "(functools.lru_cache(maxsize=…) or a TTL cache with a size bound), or validate "
                "the credential statelessly; a diagnosis window (POST /memwatch/diagnose) names "
                "the holder.",
                tuple(facts),
                LIKELY,
            )
        return Advice(
            UNDIAGNOSED,
            "Open a diagnosis window (POST /memwatch/diagnose, memwatch diagnose URL or "
            "memwatch.diagnose()) to find what holds the growth.",
            tuple(facts),
            LIKELY,
        )
    partial = (
        ["the holder search was cut short by its time budget"]
        if (result.holder_search_partial)
        else []
    )
    tagged = max(result.requests, 1)
    traced_per_request = sum(max(s.size_diff_bytes, 0) for s in result.sites) / tagged
    python_part = traced_per_request / growth if growth else None
    if ctx.signal == "rss" and (python_part is None or python_part < 0.25):
        extensions = ", ".join(result.extension_modules) or "none besides the standard library's"
        facts = [
            grows + routes + " while the Python heap does not follow",
            f"tracemalloc saw {traced_per_request:,.0f} B per request retained by Python "
            "objects in the diagnosis window",
            "no module global, class attribute, function cache or logger grew",
            f"C extension modules loaded: {extensions}",
            *partial,
        ]
        return Advice(
            NATIVE,
            "Look for a native leak (no Python object holds the growth): confirm with "
            "`memray run --native` (or `memray attach`) and look at the loaded C extensions; "
            "if memray shows no leak, it is allocator retention (try MALLOC_ARENA_MAX=2 or "
            "jemalloc).",
            tuple(facts),
            LIKELY,
        )
    if result.sites:
        top = result.sites[0]
        facts = [
            grows + routes,
            f"{top.file}:{top.line} retained {top.size_diff_bytes:,} B in {top.count_diff:,} "
            "objects in the diagnosis window",
            "no module global, class attribute, function cache or logger grew, and no "
            "back-reference chain reached a module",
            *partial,
        ]
        return Advice(
            UNHELD_SITE,
            f"Find what keeps the objects allocated at {top.file}:{top.line} alive: an instance "
            "attribute, a closure or a C-level reference (memwatch's census does not reach "
            "them); bound or release it.",
            tuple(facts),
            LIKELY,
        )
    return Advice(
        NOTHING_RETAINED,
        "Open another diagnosis window while the leak goes on: the last one saw nothing retained.",
        (grows + routes, f"the last window traced {result.requests:,} requests", *partial),
        LIKELY,
    )
