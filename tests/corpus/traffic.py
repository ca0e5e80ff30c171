"""Load generator for the detection corpus: seeded random traffic, N keep-alive clients, and a
poller that reads memwatch's verdict from ``/memwatch/report.json`` as the requests go by.

Traffic (:class:`Traffic`) is random but reproducible (one ``random.Random(seed)``): each
request picks a route by the case's weights (never a fixed cycle), fills the path's ids, and
carries the route's auth scheme with a credential drawn from that scheme's pool
(:class:`tests.corpus.catalog.Pool`): a fixed pool with Zipf popularity, or a stream in which a
share of the requests brings a never-seen credential. Routes with a ``reject_share`` send that
share of their requests with a wrong credential from a small set of stale ones. Every request has
a realistic header set (User-Agent from a few, a random ``X-Request-Id``).

The driver (:func:`run_load`) runs ``clients`` threads, each with its own
``http.client.HTTPConnection`` (kept alive where the server allows; gunicorn's sync worker closes
after each response and the connection reopens by itself). The calling thread polls the report
every ``poll_every`` completed requests and asks ``stop(poll)`` whether to stop. No httpx and no
per-request thread hand-off in the hot loop: about 1,000-2,000 requests/s on two cores.
"""

from __future__ import annotations

import bisect
import collections
import http.client
import itertools
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from tests.corpus import common
from tests.corpus.catalog import Case, Pool, RouteKey, RouteSpec

USER_AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari/605.1.15",
    "okhttp/4.12.0",
    "python-requests/2.32.3",
    "corpus-mobile/3.4.1 (Android 14; Pixel 8)",
)
ZIPF_EXPONENT = 0.8


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None
    key: RouteKey
    rejected: bool  # sent with a wrong credential on purpose


class CredentialPool:
    """Credentials of one auth scheme; :meth:`draw` returns the value for the auth header."""

    def __init__(self, scheme: str, spec: Pool, rng: random.Random) -> None:
        self.scheme = scheme
        self.spec = spec
        self._rng = rng
        weights = [1.0 / (i + 1) ** ZIPF_EXPONENT for i in range(max(spec.size, 1))]
        self._cumulative = list(itertools.accumulate(weights))
        # Shuffle which ids are popular so that different schemes' heavy users differ.
        self._ids = list(range(1, max(spec.size, 1) + 1))
        rng.shuffle(self._ids)
        # Minted up front: the generator's own memory must stay flat once traffic starts (the
        # in-process soak and leak measurement share its heap).
        self._fixed: dict[int, str] = (
            {n: self._mint(n) for n in self._ids} if spec.new_share <= 0.0 else {}
        )
        self._recent: collections.deque[str] = collections.deque(maxlen=max(spec.recent, 1))
        self._minted = itertools.count(1)
        self.new = 0  # never-seen credentials sent (streams only)

    def draw(self) -> str:
        spec = self.spec
        if spec.new_share > 0.0:
            if not self._recent or self._rng.random() < spec.new_share:
                value = self._mint(next(self._minted) + 10_000_000)
                self._recent.append(value)
                self.new += 1
                return value
            return self._rng.choice(self._recent)
        rank = bisect.bisect_left(self._cumulative, self._rng.random() * self._cumulative[-1])
        return self._fixed[self._ids[min(rank, len(self._ids) - 1)]]

    def draw_bad(self) -> str:
        n = self._rng.randrange(max(self.spec.bad, 1)) + 1
        scheme = self.scheme
        if scheme == "bearer":
            return self._mint(n)[:-6] + "AAAAAA"  # bad signature
        if scheme == "basic":
            # A few stale service accounts retrying passwords that were rotated away.
            return common.basic_header(common.user_name(9000 + n % 7), f"stale-password-{n}")
        if scheme == "apikey":
            return f"ak_{n:05d}_revoked{n:09d}"
        if scheme == "session":
            return f"{n:08x}.expired{n:017d}"
        raise ValueError(f"no credentials for {scheme!r}")

    def _mint(self, n: int) -> str:
        scheme = self.scheme
        if scheme == "bearer":
            return common.mint_token(user=self._rng.randrange(1, 1_000_000), session=n)
        if scheme == "basic":
            user = common.user_name(n)
            return common.basic_header(user, common.password_for(user))
        if scheme == "apikey":
            return common.api_key(n)
        if scheme == "session":
            return common.session_id(n)
        raise ValueError(f"no credentials for {scheme!r}")


def auth_headers(scheme: str, value: str) -> dict[str, str]:
    if scheme == "bearer":
        return {"Authorization": "Bearer " + value}
    if scheme == "basic":
        return {"Authorization": value}
    if scheme == "apikey":
        return {"X-Api-Key": value}
    if scheme == "session":
        return {"Cookie": f"sessionid={value}; theme=dark; consent=1"}
    return {}


class Traffic:
    """The request stream of one case; thread-safe, reproducible for a given seed and order."""

    def __init__(self, case: Case, seed: int = 1, host: str = "127.0.0.1") -> None:
        self.case = case
        self.host = host
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._routes: list[RouteSpec] = list(case.routes)
        self._cumulative = list(itertools.accumulate(r.weight for r in self._routes))
        self.pools = {
            scheme: CredentialPool(scheme, spec, random.Random(f"{seed}-{scheme}"))
            for scheme, spec in case.pools.items()
        }
        self.sent: collections.Counter[RouteKey] = collections.Counter()
        self.rejected_sent = 0

    def next(self) -> Request:
        with self._lock:
            return self._next()

    def _next(self) -> Request:
        rng = self._rng
        spec = self._routes[
            bisect.bisect_left(self._cumulative, rng.random() * self._cumulative[-1])
        ]
        path = (
            spec.path.replace("{n}", str(rng.randint(*spec.ids)))
            if "{n}" in spec.path
            else spec.path
        )
        headers = {
            "Host": self.host,
            "User-Agent": rng.choice(USER_AGENTS),
            "Accept": "application/json",
            "X-Request-Id": f"{rng.getrandbits(128):032x}",
        }
        rejected = spec.reject_share > 0.0 and rng.random() < spec.reject_share
        if spec.auth != "anonymous":
            pool = self.pools[spec.auth]
            value = pool.draw_bad() if rejected else pool.draw()
            headers.update(auth_headers(spec.auth, value))
        body: bytes | None = None
        if spec.body:
            n = rng.randint(1, 99_999)
            body = json.dumps(
                {
                    "kind": rng.choice(("click", "view", "purchase", "signup")),
                    "source": rng.choice(("web", "ios", "android")),
                    "name": f"item-{n}",
                    "amount": n,
                    "amount_cents": n,
                    "currency": "EUR",
                    "reference": f"ref-{rng.getrandbits(40):010x}",
                }
            ).encode()
            headers["Content-Type"] = "application/json"
        if body is not None or spec.method in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body or b""))
        self.sent[spec.key] += 1
        self.rejected_sent += rejected
        return Request(spec.method, path, headers, body, spec.key, rejected)


# --- polling memwatch ------------------------------------------------------------------------


@dataclass
class RouteRow:
    route: str
    method: str
    auth: str
    requests: int
    retained_bytes_per_request: float | None
    suspected: bool

    @property
    def key(self) -> RouteKey:
        return (self.route, self.method, self.auth)


@dataclass
class Poll:
    """memwatch's verdict as ``/memwatch/report.json`` gave it after ``requests`` requests."""

    requests: int  # requests the clients had completed
    server_requests: int  # requests memwatch had counted (report ``process.requests``)
    seconds: float
    suspected: bool
    status: str
    signal: str | None
    growth_bytes_per_request: float | None
    growth_bytes_per_second: float | None
    confidence: float | None
    scales_with: str | None
    rss_bytes: int | None
    heap_blocks: int | None
    routes: list[RouteRow] = field(default_factory=list)
    windows: int = 0  # diagnosis windows finished

    @property
    def suspected_routes(self) -> list[RouteKey]:
        return [r.key for r in self.routes if r.suspected]

    def brief(self) -> dict[str, Any]:
        data = asdict(self)
        data["routes"] = [asdict(r) for r in self.routes[:8]]
        return data


def poll_from_report(report: dict[str, Any], requests: int, seconds: float) -> Poll:
    leak = report.get("leak") or {}
    process = report.get("process") or {}
    return Poll(
        requests=requests,
        server_requests=int(process.get("requests") or 0),
        seconds=round(seconds, 2),
        suspected=bool(leak.get("suspected")),
        status=str(leak.get("status")),
        signal=leak.get("signal"),
        growth_bytes_per_request=leak.get("growth_bytes_per_request"),
        growth_bytes_per_second=leak.get("growth_bytes_per_second"),
        confidence=leak.get("confidence"),
        scales_with=leak.get("scales_with"),
        rss_bytes=process.get("rss_bytes"),
        heap_blocks=process.get("heap_blocks"),
        windows=int((report.get("diagnosis") or {}).get("windows") or 0),
        routes=[
            RouteRow(
                r["route"],
                r["method"],
                r["auth"],
                int(r["requests"]),
                r.get("retained_bytes_per_request"),
                bool(r.get("suspected")),
            )
            for r in report.get("routes") or []
        ],
    )


def fetch(port: int, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": "127.0.0.1", "Accept": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def fetch_report(port: int) -> dict[str, Any]:
    status, body = fetch(port, "/memwatch/report.json")
    if status != 200:
        raise RuntimeError(f"/memwatch/report.json answered {status}")
    return json.loads(body)  # type: ignore[no-any-return]


def metric_value(exposition: str, name: str) -> float | None:
    """The value of an unlabelled sample ``name`` in Prometheus text (None if absent)."""
    for line in exposition.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            return float(line.rsplit(" ", 1)[1])
    return None


# --- the load driver -------------------------------------------------------------------------


@dataclass
class LoadStats:
    requests: int = 0
    seconds: float = 0.0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    unexpected: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: list[str] = field(default_factory=list)
    polls: list[Poll] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def _expected(request: Request, status: int) -> bool:
    if request.rejected:
        return status == 401
    return status < 400


def run_load(
    port: int,
    traffic: Traffic,
    *,
    clients: int,
    max_requests: int,
    poll_every: int = 500,
    stop: Callable[[Poll], bool] | None = None,
    progress: Callable[[str], None] | None = None,
    label: str = "",
) -> LoadStats:
    """Sends up to ``max_requests`` requests over ``clients`` connections, polling the report.

    :param stop: called with each poll; True stops the run (the requests in flight finish).
    :param progress: called with one line per poll.
    """
    stats = LoadStats()
    lock = threading.Lock()
    issued = 0
    done = 0
    halt = threading.Event()

    def claim() -> bool:
        nonlocal issued
        with lock:
            if halt.is_set() or issued >= max_requests:
                return False
            issued += 1
            return True

    def worker() -> None:
        nonlocal done
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            while claim():
                request = traffic.next()
                status = -1
                for attempt in range(3):
                    try:
                        conn.request(request.method, request.path, request.body, request.headers)
                        response = conn.getresponse()
                        response.read()
                        status = response.status
                        if response.will_close:
                            conn.close()
                        break
                    except (OSError, http.client.HTTPException) as exc:
                        conn.close()
                        if attempt == 2:
                            with lock:
                                stats.errors.append(f"{request.method} {request.path}: {exc!r}")
                            if len(stats.errors) > 20:
                                halt.set()
                with lock:
                    done += 1
                    stats.statuses[status] += 1
                    if not _expected(request, status):
                        stats.unexpected[f"{request.method} {request.key[0]} -> {status}"] += 1
        finally:
            conn.close()

    start = time.monotonic()
    threads = [
        threading.Thread(target=worker, name=f"client-{i}", daemon=True) for i in range(clients)
    ]
    for thread in threads:
        thread.start()

    def take_poll(at: int) -> Poll:
        poll = poll_from_report(fetch_report(port), at, time.monotonic() - start)
        stats.polls.append(poll)
        if progress is not None:
            progress(_poll_line(label, poll))
        return poll

    next_poll = poll_every
    try:
        while any(t.is_alive() for t in threads):
            if done >= next_poll:
                poll = take_poll(done)
                next_poll += poll_every
                if stop is not None and stop(poll):
                    stats.stopped_early = True
                    halt.set()
            else:
                time.sleep(0.002)
    finally:
        halt.set()
        for thread in threads:
            thread.join(timeout=60)
    stats.requests = done
    stats.seconds = time.monotonic() - start
    if not stats.polls or stats.polls[-1].requests != done:
        take_poll(done)
    return stats


def _poll_line(label: str, poll: Poll) -> str:
    marked = ", ".join(f"{m} {r} {a}" for r, m, a in poll.suspected_routes) or "-"
    growth = (
        f" {poll.signal} {poll.growth_bytes_per_request:.0f} B/req"
        if poll.growth_bytes_per_request is not None
        else ""
    )
    rss = f"{poll.rss_bytes / 2**20:.1f} MiB" if poll.rss_bytes else "?"
    return (
        f"[{label}] {poll.requests:6d} req {poll.seconds:6.1f}s status={poll.status}"
        f"{growth} rss={rss} heap_blocks={poll.heap_blocks} scales_with={poll.scales_with} "
        f"routes={marked}"
    )
