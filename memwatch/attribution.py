"""Which route and auth path the growth comes with, and whether it follows credentials.

**Per-request deltas, entry to entry.** A sampled request reads the Python heap when it enters;
the next request to enter (on any thread) reads it again. The delta between the two entries
holds everything the sampled request kept, after its response was released; an in-request delta
(entry to exit) would still hold the response body. The interval also holds the parsing of the
next request, which biases toward routes with small headers; charging each delta to both
neighbouring requests cancels that bias. Each route is then tested against the rest (Welch's t)
and its retained bytes per request estimated from the contrast. Intervals that span a garbage
collection are dropped: a collection frees garbage made by earlier requests and would charge it
to whoever happened to be running. Under threads and asyncio the intervals overlap other
requests; the estimates stay unbiased but need more requests.

**Growth that follows credentials.** Growth between envelope points of the detector's window is
regressed (non-negative least squares) on the requests and the first-seen credentials of each
interval. A cache keyed by the token puts nearly all growth on first-seen credentials. When every
request brings a new credential the two cannot be told apart, and the answer says so.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from memwatch.signals import Sample
from memwatch.stats import lower_envelope_points, nnls

RouteKey = tuple[str, str, str]  # route, method, auth

MIN_PAIRS = 30  # deltas needed on each side before a route is tested
T_THRESHOLD = 3.0


class Probe:
    """The heap reading at the entry of a sampled request (or of the request after it)."""

    __slots__ = ("collections", "first", "heap", "key", "pair")

    def __init__(self, heap: int, collections: int, first: bool) -> None:
        self.heap = heap
        self.collections = collections
        self.first = first  # True for the sampled request, False for the one after it
        self.key: RouteKey | None = None
        self.pair: Pair | None = None


class Pair:
    """Two consecutive request entries and the heap delta between them."""

    __slots__ = ("a", "b", "delta")

    def __init__(self, a: Probe, b: Probe, delta: float | None) -> None:
        self.a = a
        self.b = b
        self.delta = delta  # bytes; None when a collection ran in between


@dataclass
class Moments:
    n: int = 0
    total: float = 0.0
    squares: float = 0.0

    def add(self, value: float) -> None:
        self.n += 1
        self.total += value
        self.squares += value * value

    def minus(self, other: Moments) -> Moments:
        return Moments(self.n - other.n, self.total - other.total, self.squares - other.squares)

    def mean_var(self) -> tuple[float, float]:
        if self.n < 2:
            return (self.total / self.n if self.n else 0.0), math.inf
        mean = self.total / self.n
        var = max((self.squares - self.n * mean * mean) / (self.n - 1), 0.0)
        return mean, var


@dataclass(frozen=True)
class RouteEstimate:
    key: RouteKey
    pairs: int
    retained_bytes_per_request: float | None
    t: float | None
    significant: bool  # t >= T_THRESHOLD
    suspected: bool = False  # significant, large enough, and the process is leaking


class RouteAttribution:
    """Accumulates entry-to-entry deltas per route key; bounded by the route label cap."""

    def __init__(self) -> None:
        self.by_key: dict[RouteKey, Moments] = {}
        self.total = Moments()

    def add(self, a: RouteKey, b: RouteKey, delta: float) -> None:
        self.total.add(delta)
        self._charge(a, delta)
        if b != a:
            self._charge(b, delta)

    def _charge(self, key: RouteKey, delta: float) -> None:
        moments = self.by_key.get(key)
        if moments is None:
            moments = self.by_key[key] = Moments()
        moments.add(delta)

    def copy(self) -> RouteAttribution:
        other = RouteAttribution()
        other.total = Moments(self.total.n, self.total.total, self.total.squares)
        other.by_key = {k: Moments(m.n, m.total, m.squares) for k, m in self.by_key.items()}
        return other

    def estimates(self, shares: dict[RouteKey, float]) -> list[RouteEstimate]:
        """Each route against the rest: retained bytes per request and Welch's t.

        With a leak of L bytes per request on route r (share s of the traffic), intervals that
        involve r hold L when r is the earlier request and nothing extra when it is the later
        one; the contrast with the other intervals is L / (2 - s), hence the correction.
        """
        out: list[RouteEstimate] = []
        for key, mine in self.by_key.items():
            rest = self.total.minus(mine)
            share = min(max(shares.get(key, 0.0), 0.0), 1.0)
            if mine.n < MIN_PAIRS:
                out.append(RouteEstimate(key, mine.n, None, None, False))
                continue
            m_mine, v_mine = mine.mean_var()
            if rest.n < MIN_PAIRS:
                # (Nearly) the only route: its absolute mean is the estimate.
                se = math.sqrt(v_mine / mine.n) if math.isfinite(v_mine) else math.inf
                t = m_mine / se if se > 0 else (math.inf if m_mine > 0 else 0.0)
                out.append(RouteEstimate(key, mine.n, m_mine, t, t >= T_THRESHOLD))
                continue
            m_rest, v_rest = rest.mean_var()
            se = math.sqrt(v_mine / mine.n + v_rest / rest.n)
            diff = m_mine - m_rest
            t = diff / se if se > 0 else (math.inf if diff > 0 else 0.0)
            retained = diff * (2.0 - share)
            out.append(RouteEstimate(key, mine.n, retained, t, t >= T_THRESHOLD))
        return out


def scales_with(samples: Sequence[Sample], values: Sequence[float], width: int) -> str | None:
    """``distinct_credentials``, ``requests`` or ``undetermined`` for the growth in ``values``.

    :param samples: the detector's window (for the request and first-seen counts).
    :param values: the verdict signal's readings for the same samples, in bytes.
    :param width: envelope block width (growth is measured between sawtooth low points).
    """
    if len(samples) != len(values) or len(samples) < 2 * width:
        return None
    idx, lows = lower_envelope_points(values, width, list(range(len(values))))
    points = [
        (samples[int(i)].requests, samples[int(i)].first_seen, y)
        for i, y in zip(idx, lows, strict=True)
    ]
    d_req: list[float] = []
    d_new: list[float] = []
    d_val: list[float] = []
    for (r0, f0, y0), (r1, f1, y1) in itertools.pairwise(points):
        if r1 <= r0:
            continue
        d_req.append(float(r1 - r0))
        d_new.append(float(f1 - f0))
        d_val.append(y1 - y0)
    if len(d_val) < 4:
        return None
    total_req, total_new = sum(d_req), sum(d_new)
    if total_new <= 0:
        return "requests"
    if total_new >= 0.8 * total_req and _correlation(d_req, d_new) > 0.9:
        return "undetermined"  # nearly every request brings a new credential
    alpha, beta = nnls([[r, f] for r, f in zip(d_req, d_new, strict=True)], d_val)
    from_requests = alpha * total_req
    from_credentials = beta * total_new
    grown = from_requests + from_credentials
    if grown <= 0:
        return None
    share = from_credentials / grown
    if share >= 0.8:
        return "distinct_credentials"
    if share <= 0.2:
        return "requests"
    return "undetermined"


def _correlation(a: Sequence[float], b: Sequence[float]) -> float:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    if va <= 0 or vb <= 0:
        return 1.0 if va == vb == 0 else 0.0
    return cov / math.sqrt(va * vb)
