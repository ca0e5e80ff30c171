"""Which route and auth path the growth comes with, and whether it follows credentials.

**Per-request deltas, entry to entry.** A measured request takes readings when it enters; the
first request to enter after it has finished (on any thread or task) takes them again. The delta
between the two entries holds everything the measured request kept once its response was
released (an in-request delta, entry to exit, would still hold the response body), whatever the
concurrency: the measured request's whole life is inside the interval. The interval also holds
the parsing of the next request, which biases toward routes with small headers; charging each
delta to both requests cancels that bias. Each route is then tested against the rest (Welch's t)
and its retained amount per request estimated from the contrast. Other requests running during
the interval add noise, not bias, so threads and asyncio need more requests, not other maths.

Three channels, from cheap to costly:

- ``containers``: ``gc.get_count()[0]``, the net number of new container objects (dicts, lists,
  tuples, instances) since the last collection. O(1) (0.1 µs), so it is read on every probe. Blind
  to strings and bytes. Intervals that span a collection are dropped.
- ``heap``: ``sys.getallocatedblocks()``, every Python object; its cost grows with the heap, so
  it is read on a fraction of probes derived from its measured cost (more while a leak is
  suspected and not yet attributed).
- ``rss``: the resident set, read with the heap; the only channel that sees large buffers.

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

from memwatch.detector import MIN_POINTS
from memwatch.diagnosis import DiagnosisResult
from memwatch.signals import Sample
from memwatch.stats import lower_envelope_points, nnls

RouteKey = tuple[str, str, str]  # route, method, auth

MIN_PAIRS = 30  # deltas needed on each side before a route is tested
WINDOW_MIN_REQUESTS = 20  # requests of a route in a diagnosis window before it can be named
T_THRESHOLD = 3.0


CHANNELS = ("heap", "containers", "rss")


class Probe:
    """Readings at the entry of a measured request (or of the request that closes its pair).

    ``containers`` (``gc.get_count()[0]``) is O(1) and always read; ``heap`` and ``rss`` are
    read on "heavy" probes only, at a rate derived from their measured cost.
    """

    __slots__ = ("collections", "containers", "heap", "key", "pair", "rss")

    def __init__(
        self, containers: int, collections: int, heap: int | None, rss: int | None
    ) -> None:
        self.containers = containers
        self.collections = collections
        self.heap = heap
        self.rss = rss
        self.key: RouteKey | None = None
        self.pair: Pair | None = None


class Pair:
    """A measured request's entry, the first entry after it exited, and the deltas between."""

    __slots__ = ("a", "b", "deltas")

    def __init__(self, a: Probe, b: Probe, heap_block_bytes: float) -> None:
        self.a = a
        self.b = b
        deltas: dict[str, float] = {}
        if a.collections == b.collections:
            # A collection in between frees garbage of earlier requests: drop those channels.
            deltas["containers"] = float(b.containers - a.containers)
            if a.heap is not None and b.heap is not None:
                deltas["heap"] = (b.heap - a.heap) * heap_block_bytes
        if a.rss is not None and b.rss is not None:
            deltas["rss"] = float(b.rss - a.rss)
        self.deltas = deltas


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
    channel: str = "heap"  # which reading the estimate comes from


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


def merge_estimates(
    by_channel: dict[str, list[RouteEstimate]], container_bytes: float
) -> list[RouteEstimate]:
    """One estimate per route: the most significant positive channel, in bytes.

    A container count converts to bytes at ``container_bytes`` per container (an estimate:
    a small dict or list object and its item storage).
    """
    merged: dict[RouteKey, RouteEstimate] = {}
    for channel in CHANNELS:
        for e in by_channel.get(channel, []):
            retained = e.retained_bytes_per_request
            if retained is not None and channel == "containers":
                retained *= container_bytes
            candidate = RouteEstimate(e.key, e.pairs, retained, e.t, e.significant, False, channel)
            current = merged.get(e.key)
            if current is None or _better(candidate, current):
                merged[e.key] = candidate
    return list(merged.values())


def window_estimates(
    window: DiagnosisResult, estimates: list[RouteEstimate], minimum: float
) -> list[RouteEstimate]:
    """Replaces statistical estimates by what a diagnosis window measured, route by route.

    In a window every retained allocation carries its request's trampoline frame, so the
    bytes per request of each route are measured, not inferred; a route is significant when
    it retained at least ``minimum`` bytes per request and at least a tenth of the largest
    route's rate, over at least ``WINDOW_MIN_REQUESTS`` requests.
    """
    by_key = {e.key: e for e in estimates}
    top = max((r.retained_bytes_per_request for r in window.routes), default=0.0)
    floor = max(minimum, 0.1 * top)
    seen = set()
    for r in window.routes:
        seen.add(r.key)
        # Steady retention: the second half keeps about what the first half kept per request
        # (a cache that turns over keeps much less in the second half: an lru_cache at its
        # size with a 2:1 miss ratio keeps about 0.4 of it).
        steady = r.retained_bytes_per_request >= 0.6 * r.first_half_bytes_per_request
        # Consistently above the floor: all but one of the route's replicates (its requests
        # spread round-robin over several trampolines) retain at least the floor each. A route
        # whose retention is a few objects that happened to be allocated under it does not;
        # a leak does, even when a container's occasional reallocation lands in one replicate
        # (which is why this is not a t test: that one large step inflates the spread).
        rates = sorted(r.replicate_rates)
        replicated = len(rates) < 3 or rates[1] >= floor
        significant = (
            r.requests >= WINDOW_MIN_REQUESTS
            and r.retained_bytes_per_request >= floor
            and steady
            and replicated
        )
        by_key[r.key] = RouteEstimate(
            r.key,
            r.requests,
            r.retained_bytes_per_request,
            r.t,
            significant,
            False,
            "diagnosis",
        )
    return list(by_key.values())


def _better(a: RouteEstimate, b: RouteEstimate) -> bool:
    """Prefer a significant positive estimate, then the one from the sharper channel."""
    def rank(e: RouteEstimate) -> tuple[int, int, float]:
        positive = e.retained_bytes_per_request is not None and e.retained_bytes_per_request > 0
        return (
            int(e.significant and positive),
            int(e.retained_bytes_per_request is not None),
            e.t if e.t is not None and math.isfinite(e.t) else 0.0,
        )

    return rank(a) > rank(b)


def scales_with(samples: Sequence[Sample], values: Sequence[float], width: int) -> str | None:
    """``distinct_credentials``, ``requests`` or ``undetermined`` for the growth in ``values``.

    :param samples: the detector's window (for the request and first-seen counts).
    :param values: the verdict signal's readings for the same samples, in bytes.
    :param width: envelope block width (growth is measured between sawtooth low points).

    None (no answer: the caller keeps its last one) until the window holds as many envelope
    points as the detector needs for a verdict (``MIN_POINTS``). Right after a diagnosis window
    the window restarts, and a regression on its first four or five intervals could overturn a
    well-founded answer on noise.
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
    if len(d_val) < MIN_POINTS - 1:
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
