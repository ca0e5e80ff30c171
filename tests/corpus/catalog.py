"""The detection corpus: which app, which server, which traffic, and what memwatch must conclude.

Each :class:`Case` names a module of this package whose ``app`` is wrapped with
``memwatch.wrap(app)`` at default settings, the server that runs it (one worker, so the verdict
is one process's), the routes the traffic generator sends (template as memwatch labels it,
method, auth scheme, share of the traffic) and, for a leaking app, the leaking route and what the
leak is. Importing this module imports no app: each app runs in its own server process.

Leak sizes are retained bytes per request *on the leaking route*, measured in process with
tracemalloc by ``benchmarks/detection_corpus.py --measure`` (see docs/detection.md); the
catalogue keeps the figures from the last measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RouteKey = tuple[str, str, str]  # route template, method, auth scheme: memwatch's labels

SYNC = "gunicorn-sync"
GTHREAD = "gunicorn-gthread"
UVICORN = "uvicorn"


@dataclass(frozen=True)
class RouteSpec:
    """One route of a case's traffic.

    Args:
        template: the route label memwatch reports (framework template or normalised path).
        method: HTTP method.
        auth: the auth scheme the traffic uses on this route (bearer, basic, apikey, session,
            anonymous).
        weight: share of the traffic (weights of a case are normalised).
        path: the request path; ``{n}`` is replaced by a random id from ``ids``.
        ids: inclusive range of ``{n}``.
        body: True sends a small JSON body (``Content-Type: application/json``).
        reject_share: share of this route's requests sent with a wrong credential (expect 401).
    """

    template: str
    method: str
    auth: str
    weight: float
    path: str
    ids: tuple[int, int] = (1, 99_999)
    body: bool = False
    reject_share: float = 0.0

    @property
    def key(self) -> RouteKey:
        return (self.template, self.method, self.auth)


@dataclass(frozen=True)
class Pool:
    """The credentials the traffic draws from, for one auth scheme.

    Args:
        size: distinct valid credentials, drawn with a mild Zipf popularity (a few heavy users,
            a long tail), so that first-seen credentials trickle in for a while and then stop.
        new_share: if above 0, a stream instead: this share of draws carries a never-seen
            credential (a new login), the rest reuse one of the ``recent`` last ones uniformly.
        recent: how many recent credentials a stream reuses.
        bad: distinct wrong credentials used for rejected requests (stale passwords retried).
    """

    size: int = 200
    new_share: float = 0.0
    recent: int = 512
    bad: int = 20


DEFAULT_POOLS: dict[str, Pool] = {
    "bearer": Pool(size=500),
    "basic": Pool(size=300),
    "apikey": Pool(size=25),
    "session": Pool(size=400),
}


@dataclass(frozen=True)
class Leak:
    """What leaks, where, and what memwatch should say about it.

    Args:
        route: the leaking (route, method, auth) as memwatch labels it.
        what: one line for the table.
        bytes_per_request: retained bytes per request on the leaking route (measured).
        scales_with: the ``leak.scales_with`` memwatch should report, or None if not checked.
        large: True for objects above pymalloc's 512-byte limit (seen by RSS, not heap blocks).
        site: the line (file from the repository root, line number) that allocates what is
            kept, in application code: a diagnosis window's top three sites must include it.
        site_text: text on that line (tests check that ``site`` still points at it).
        holder: what the report's roots must name as the holder of the growth.
    """

    route: RouteKey
    what: str
    bytes_per_request: float
    scales_with: str | None = "requests"
    large: bool = False
    site: tuple[str, int] | None = None
    site_text: str = ""
    holder: str | None = None


@dataclass(frozen=True)
class Case:
    """One app of the corpus.

    Args:
        name: the case id (also the module name under ``tests.corpus``).
        framework: Flask, Django, Starlette, FastAPI or WSGI (no framework).
        server: :data:`SYNC`, :data:`GTHREAD` or :data:`UVICORN`.
        clients: concurrent keep-alive client connections of the traffic generator.
        routes: the traffic.
        leak: None for a clean app.
        description: one line for the table.
        pools: credential pools by auth scheme (defaults: :data:`DEFAULT_POOLS`).
        max_requests: where a run stops if nothing settled it earlier.
        module: the module that holds ``app``, when not ``tests.corpus.<name>`` (a fixed twin,
            see :func:`fixed_twin`).
    """

    name: str
    framework: str
    server: str
    clients: int
    routes: tuple[RouteSpec, ...]
    leak: Leak | None
    description: str
    pools: dict[str, Pool] = field(default_factory=lambda: dict(DEFAULT_POOLS))
    max_requests: int = 20_000
    module: str | None = None

    @property
    def module_name(self) -> str:
        return self.module or f"tests.corpus.{self.name}"

    @property
    def target(self) -> str:
        """``module:attribute`` for gunicorn and uvicorn (run from the repository root)."""
        return f"{self.module_name}:app"

    @property
    def leaking(self) -> bool:
        return self.leak is not None

    def share(self, key: RouteKey) -> float:
        total = sum(r.weight for r in self.routes)
        return sum(r.weight for r in self.routes if r.key == key) / total


def _pools(**changes: Pool) -> dict[str, Pool]:
    return {**DEFAULT_POOLS, **changes}


_REPORTS_ROUTES = (
    RouteSpec("/api/items/<int:item_id>", "GET", "bearer", 0.30, "/api/items/{n}"),
    RouteSpec("/reports/<int:rid>", "GET", "basic", 0.22, "/reports/{n}"),
    RouteSpec("/dashboard", "GET", "session", 0.18, "/dashboard"),
    RouteSpec("/reports", "GET", "basic", 0.12, "/reports"),
    RouteSpec("/api/items", "POST", "apikey", 0.10, "/api/items", body=True),
    RouteSpec("/health", "GET", "anonymous", 0.08, "/health"),
)

CASES: tuple[Case, ...] = (
    # --- leaking ---------------------------------------------------------------------------
    Case(
        name="django_token_cache",
        framework="Django",
        server=SYNC,
        clients=1,
        description="decoded Bearer claims cached in a module dict keyed by the token",
        routes=(
            RouteSpec("api/orders/", "GET", "bearer", 0.35, "/api/orders/?page={n}", ids=(1, 20)),
            RouteSpec("api/catalog/", "GET", "anonymous", 0.25, "/api/catalog/"),
            RouteSpec("api/orders/<int:pk>/", "GET", "apikey", 0.18, "/api/orders/{n}/"),
            RouteSpec("api/cart/", "GET", "session", 0.12, "/api/cart/"),
            RouteSpec("health/", "GET", "anonymous", 0.10, "/health/"),
        ),
        pools=_pools(bearer=Pool(new_share=0.30, recent=512)),
        leak=Leak(
            ("api/orders/", "GET", "bearer"),
            "dict[token] = claims, 30 % of tokens never seen before",
            670.0,
            scales_with="distinct_credentials",
            site=("tests/corpus/common.py", 70),  # the claims the cache keeps are decoded here
            site_text="json.loads",
            holder="tests.corpus.django_token_cache._CLAIMS_BY_TOKEN",
        ),
    ),
    Case(
        name="flask_basic_audit",
        framework="Flask",
        server=SYNC,
        clients=1,
        description="Basic-auth decorator appends the decoded credential to a global list",
        routes=_REPORTS_ROUTES,
        leak=Leak(
            ("/reports/<int:rid>", "GET", "basic"),
            "list.append(str with the credential)",
            285.0,
            site=("tests/corpus/flask_basic_audit.py", 28),
            site_text="login user=",
            holder="tests.corpus.flask_basic_audit.LOGIN_METRICS",
        ),
    ),
    Case(
        name="wsgi_failed_logins",
        framework="WSGI",
        server=SYNC,
        clients=1,
        description="401 path stores every failed login attempt",
        routes=(
            RouteSpec("/accounts/{id}", "GET", "bearer", 0.34, "/accounts/{n}"),
            RouteSpec("/login", "POST", "basic", 0.20, "/login", body=True, reject_share=0.4),
            RouteSpec(
                "/accounts/{id}/statements", "GET", "bearer", 0.18, "/accounts/{n}/statements"
            ),
            RouteSpec("/session/refresh", "POST", "session", 0.16, "/session/refresh", body=True),
            RouteSpec("/status", "GET", "anonymous", 0.12, "/status"),
        ),
        leak=Leak(
            ("/login", "POST", "basic"),
            "list.append(dict) on 401 (40 % of logins fail)",
            285.0,
            site=("tests/corpus/wsgi_failed_logins.py", 47),
            site_text="{",
            holder="tests.corpus.wsgi_failed_logins.FAILED_LOGINS",
        ),
    ),
    Case(
        name="starlette_export_buffers",
        framework="Starlette",
        server=UVICORN,
        clients=8,
        description="every 64 KiB export kept in a list",
        routes=(
            RouteSpec("/ping", "GET", "anonymous", 0.30, "/ping"),
            RouteSpec("/invoices", "GET", "bearer", 0.25, "/invoices"),
            RouteSpec(
                "/exports/{export_id:int}/status", "GET", "apikey", 0.18, "/exports/{n}/status"
            ),
            RouteSpec("/settings", "GET", "session", 0.15, "/settings"),
            RouteSpec("/exports/{export_id:int}", "GET", "apikey", 0.12, "/exports/{n}"),
        ),
        leak=Leak(
            ("/exports/{export_id:int}", "GET", "apikey"),
            "list.append(64 KiB bytes)",  # at most 160 MiB kept in a 20,000-request run
            65_590.0,
            large=True,
            site=("tests/corpus/starlette_export_buffers.py", 26),
            site_text="rows[:EXPORT_BYTES]",
            holder="tests.corpus.starlette_export_buffers._RECENT_EXPORTS",
        ),
    ),
    Case(
        name="flask_threaded_registry",
        framework="Flask",
        server=GTHREAD,
        clients=8,
        description="per-request dict appended to a class attribute, 4 threads",
        routes=(
            RouteSpec("/api/users/me", "GET", "bearer", 0.40, "/api/users/me"),
            RouteSpec("/api/events", "POST", "apikey", 0.25, "/api/events", body=True),
            RouteSpec("/api/events/<int:event_id>", "GET", "apikey", 0.20, "/api/events/{n}"),
            RouteSpec("/healthz", "GET", "anonymous", 0.15, "/healthz"),
        ),
        leak=Leak(
            ("/api/events", "POST", "apikey"),
            "Registry.items.append(dict)",
            500.0,
            site=("tests/corpus/flask_threaded_registry.py", 42),
            site_text="{",
            holder="tests.corpus.flask_threaded_registry.Registry.items",
        ),
    ),
    Case(
        name="django_rare_route",
        framework="Django",
        server=SYNC,
        clients=1,
        description="leak on a route with a tenth of the traffic",
        routes=(
            RouteSpec(
                "api/products/", "GET", "anonymous", 0.24, "/api/products/?page={n}", ids=(1, 50)
            ),
            RouteSpec("api/products/<int:pk>/", "GET", "anonymous", 0.20, "/api/products/{n}/"),
            RouteSpec("api/cart/", "GET", "session", 0.14, "/api/cart/"),
            RouteSpec("api/invoices/", "GET", "bearer", 0.12, "/api/invoices/"),
            RouteSpec(
                "api/invoices/<int:pk>/pdf/", "GET", "bearer", 0.10, "/api/invoices/{n}/pdf/"
            ),
            RouteSpec("api/cart/", "POST", "session", 0.08, "/api/cart/", body=True),
            RouteSpec("api/stock/", "GET", "apikey", 0.07, "/api/stock/"),
            RouteSpec("health/", "GET", "anonymous", 0.05, "/health/"),
        ),
        leak=Leak(
            ("api/invoices/<int:pk>/pdf/", "GET", "bearer"),
            "list.append(dict), 10 % of the traffic",
            625.0,
            site=("tests/corpus/django_rare_route.py", 54),
            site_text="{",
            holder="tests.corpus.django_rare_route._RENDERED",
        ),
    ),
    Case(
        name="starlette_background_tasks",
        framework="Starlette",
        server=UVICORN,
        clients=8,
        description="fire-and-forget asyncio tasks kept in a module-level set",
        routes=(
            RouteSpec("/orders/{order_id:int}", "GET", "bearer", 0.35, "/orders/{n}"),
            RouteSpec("/orders/{order_id:int}", "POST", "bearer", 0.20, "/orders/{n}", body=True),
            RouteSpec("/products", "GET", "anonymous", 0.20, "/products"),
            RouteSpec("/cart", "GET", "session", 0.15, "/cart"),
            RouteSpec("/ping", "GET", "anonymous", 0.10, "/ping"),
        ),
        leak=Leak(
            ("/orders/{order_id:int}", "POST", "bearer"),
            "set.add(asyncio.Task), never discarded",
            1_000.0,
            site=("tests/corpus/starlette_background_tasks.py", 42),
            site_text="asyncio.create_task",
            holder="tests.corpus.starlette_background_tasks._BACKGROUND",
        ),
    ),
    Case(
        name="fastapi_logger_handlers",
        framework="FastAPI",
        server=UVICORN,
        clients=8,
        description="a logging handler added to a logger per request",
        routes=(
            RouteSpec("/rates", "GET", "anonymous", 0.30, "/rates"),
            RouteSpec("/me", "GET", "bearer", 0.28, "/me"),
            RouteSpec("/payments", "POST", "apikey", 0.22, "/payments", body=True),
            RouteSpec("/payments/{payment_id}", "GET", "apikey", 0.20, "/payments/{n}"),
        ),
        leak=Leak(
            ("/payments", "POST", "apikey"),
            'getLogger("eval.payments").addHandler(...)',
            1_360.0,
            site=("tests/corpus/fastapi_logger_handlers.py", 30),
            site_text="super().__init__(io.StringIO())",
            holder="the handlers list of logger 'eval.payments'",
        ),
    ),
    # --- clean -----------------------------------------------------------------------------
    Case(
        name="flask_basic_lru",
        framework="Flask",
        server=SYNC,
        clients=1,
        description="as flask_basic_audit, with lru_cache(maxsize=128) keyed by the credential",
        routes=_REPORTS_ROUTES,
        leak=None,
    ),
    Case(
        name="wsgi_warmup_table",
        framework="WSGI",
        server=GTHREAD,
        clients=8,
        description="lookup table of 1,000 products fills during warm-up, then flat",
        routes=(
            RouteSpec("/products/{id}", "GET", "anonymous", 0.55, "/products/{n}", ids=(1, 1000)),
            RouteSpec("/cart", "GET", "session", 0.20, "/cart"),
            RouteSpec("/orders", "POST", "bearer", 0.15, "/orders", body=True),
            RouteSpec("/health", "GET", "anonymous", 0.10, "/health"),
        ),
        leak=None,
    ),
    Case(
        name="wsgi_id_paths",
        framework="WSGI",
        server=SYNC,
        clients=1,
        description="bare WSGI API, ids from a large range in every path, nothing kept",
        routes=(
            RouteSpec("/users/{id}", "GET", "bearer", 0.35, "/users/{n}", ids=(1, 999_999)),
            RouteSpec(
                "/users/{id}/orders", "GET", "bearer", 0.30, "/users/{n}/orders", ids=(1, 999_999)
            ),
            RouteSpec("/orders/{id}", "GET", "apikey", 0.25, "/orders/{n}", ids=(1, 999_999)),
            RouteSpec("/health", "GET", "anonymous", 0.10, "/health"),
        ),
        leak=None,
    ),
    Case(
        name="fastapi_plain",
        framework="FastAPI",
        server=UVICORN,
        clients=8,
        description="plain JSON API, five auth schemes, nothing kept",
        routes=(
            RouteSpec("/v1/accounts/{account_id}", "GET", "bearer", 0.30, "/v1/accounts/{n}"),
            RouteSpec(
                "/v1/accounts/{account_id}/transactions",
                "GET",
                "bearer",
                0.20,
                "/v1/accounts/{n}/transactions?limit=10",
            ),
            RouteSpec("/v1/quotes", "POST", "apikey", 0.15, "/v1/quotes", body=True),
            RouteSpec("/v1/status", "GET", "anonymous", 0.15, "/v1/status"),
            RouteSpec("/v1/profile", "GET", "session", 0.12, "/v1/profile"),
            RouteSpec("/v1/legacy/export", "GET", "basic", 0.08, "/v1/legacy/export"),
        ),
        leak=None,
    ),
    Case(
        name="django_debug_queries",
        framework="Django",
        server=SYNC,
        clients=1,
        description="DEBUG=True query log (sqlite in memory), capped at 9,000 entries",
        routes=(
            RouteSpec("articles/<int:pk>/", "GET", "anonymous", 0.35, "/articles/{n}/"),
            RouteSpec("articles/", "GET", "anonymous", 0.20, "/articles/"),
            RouteSpec(
                "articles/<int:pk>/comments/", "GET", "session", 0.15, "/articles/{n}/comments/"
            ),
            RouteSpec("stats/", "GET", "bearer", 0.12, "/stats/"),
            RouteSpec(
                "articles/<int:pk>/comments/",
                "POST",
                "session",
                0.10,
                "/articles/{n}/comments/",
                body=True,
            ),
            RouteSpec("health/", "GET", "anonymous", 0.08, "/health/"),
        ),
        leak=None,
    ),
)

BY_NAME: dict[str, Case] = {case.name: case for case in CASES}
LEAKING: tuple[Case, ...] = tuple(c for c in CASES if c.leaking)
CLEAN: tuple[Case, ...] = tuple(c for c in CASES if not c.leaking)


def fixed_twin(case: Case) -> Case:
    """The clean twin of a leaking case: ``tests.corpus.fixed.<name>``, its app with the change
    memwatch's advice names applied, under the same server and traffic."""
    from dataclasses import replace

    return replace(case, module=f"tests.corpus.fixed.{case.name}", leak=None)
