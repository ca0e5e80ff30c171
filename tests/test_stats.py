"""Tests for memwatch.stats on synthetic series with known answers (seeded, no numpy)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import pytest

from memwatch.stats import (
    DEFAULT_MAX_PAIRS,
    MAD_TO_SIGMA,
    first_differences,
    lower_envelope,
    lower_envelope_points,
    mad,
    mann_kendall,
    mean_and_stderr,
    median,
    nnls,
    plateau_test,
    theil_sen,
    welch_t,
)

Series = tuple[list[float], list[float]]


def _normal_p_upper(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


# ---------------------------------------------------------------------------------------------
# Series shapes the detector must tell apart
# ---------------------------------------------------------------------------------------------


def linear(rng: random.Random, n: int, slope: float, sd: float) -> Series:
    xs = [float(t) for t in range(n)]
    return xs, [slope * t + rng.gauss(0.0, sd) for t in xs]


def saturating(rng: random.Random, n: int, tau: float, amplitude: float, sd: float) -> Series:
    xs = [float(t) for t in range(n)]
    return xs, [amplitude * (1.0 - math.exp(-t / tau)) + rng.gauss(0.0, sd) for t in xs]


def step(rng: random.Random, n: int, at: int, height: float, sd: float) -> Series:
    xs = [float(t) for t in range(n)]
    return xs, [(height if t >= at else 0.0) + rng.gauss(0.0, sd) for t in range(n)]


def bounded_cache(rng: random.Random, n: int, cap: int = 128) -> Series:
    """Heap blocks of an lru_cache(maxsize=cap): 0-2 new keys per sample until it is full."""
    entries = 0
    ys = []
    for _ in range(n):
        entries = min(cap, entries + rng.choice((0, 1, 1, 2)))
        ys.append(5000.0 + 3.0 * entries + rng.gauss(0.0, 5.0))
    return [float(t) for t in range(n)], ys


def sawtooth(rng: random.Random, n: int, rise: float, leak: float) -> list[float]:
    """Blocks climb by ``rise`` per sample and drop back at each gen-0 collection.

    Collections come every 80-120 samples (jittered, as in a real app), on top of an underlying
    leak of ``leak`` blocks per sample.
    """
    out = []
    since = 0
    period = rng.randint(80, 120)
    for t in range(n):
        since += 1
        if since >= period:
            since = 0
            period = rng.randint(80, 120)
        out.append(10_000.0 + rise * since + leak * t + rng.gauss(0.0, 3.0))
    return out


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def test_median_and_mad() -> None:
    assert median([3, 1, 2]) == 2.0
    assert median([4, 1, 3, 2]) == 2.5
    # |x - 3| for [1, 2, 3, 4, 100] = [2, 1, 0, 1, 97] -> median 1
    assert mad([1, 2, 3, 4, 100]) == 1.0
    rng = random.Random(7)
    sample = [rng.gauss(0.0, 2.0) for _ in range(20_000)]
    assert MAD_TO_SIGMA * mad(sample) == pytest.approx(2.0, rel=0.03)
    with pytest.raises(ValueError):
        median([])


def test_first_differences() -> None:
    assert first_differences([1, 4, 4, 10]) == [3.0, 0.0, 6.0]
    assert first_differences([5]) == []


def test_mean_and_stderr() -> None:
    mean, se = mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    # s^2 = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; se = sqrt(5/3 / 4)
    assert mean == 2.5
    assert se == pytest.approx(math.sqrt(5.0 / 12.0))
    with pytest.raises(ValueError):
        mean_and_stderr([1.0])


def test_welch_t_hand_computed() -> None:
    # a = [1, 2, 3, 4]: mean 2.5, s^2 = 5/3, s^2/n = 5/12
    # b = [2, 4, 6]:    mean 4,   s^2 = 4,   s^2/n = 4/3 = 16/12
    # t  = (2.5 - 4) / sqrt(21/12) = -1.5 / sqrt(1.75)
    # df = (21/12)^2 / ((5/12)^2 / 3 + (4/3)^2 / 2) = (49/16) / (409/432) = 1323/409
    t, df = welch_t([1, 2, 3, 4], [2, 4, 6])
    assert t == pytest.approx(-1.5 / math.sqrt(1.75), rel=1e-12)
    assert df == pytest.approx(1323.0 / 409.0, rel=1e-12)
    t_rev, df_rev = welch_t([2, 4, 6], [1, 2, 3, 4])
    assert t_rev == pytest.approx(-t)
    assert df_rev == pytest.approx(df)


def test_welch_t_zero_variance() -> None:
    assert welch_t([1, 1, 1], [1, 1]) == (0.0, 3.0)
    t, _ = welch_t([2, 2, 2], [1, 1])
    assert t == math.inf
    with pytest.raises(ValueError):
        welch_t([1.0], [1.0, 2.0])


def test_welch_t_separates_a_leaking_route() -> None:
    # One route retains ~200 bytes per request on top of the shared noise; t well above 3.
    rng = random.Random(3)
    leaking = [200.0 + rng.gauss(0.0, 400.0) for _ in range(400)]
    others = [rng.gauss(0.0, 400.0) for _ in range(4000)]
    t, df = welch_t(leaking, others)
    assert t > 3.0
    assert 300 < df < 4400


# ---------------------------------------------------------------------------------------------
# Mann-Kendall
# ---------------------------------------------------------------------------------------------


def test_mann_kendall_hand_computed() -> None:
    # x = [1, 3, 2, 5, 4]; signs of x_j - x_i for i < j:
    #   i=0 (1): 3 2 5 4 -> + + + +   = +4
    #   i=1 (3): 2 5 4   -> - + +     = +1
    #   i=2 (2): 5 4     -> + +       = +2
    #   i=3 (5): 4       -> -         = -1
    # S = 6; var = n(n-1)(2n+5)/18 = 5*4*15/18 = 50/3; z = (S-1)/sqrt(var); tau = 6/10
    result = mann_kendall([1, 3, 2, 5, 4])
    assert result.n == 5
    assert result.s == 6
    assert result.var_s == pytest.approx(50.0 / 3.0)
    assert result.z == pytest.approx(5.0 / math.sqrt(50.0 / 3.0))
    assert result.tau == pytest.approx(0.6)
    assert result.p_value == pytest.approx(_normal_p_upper(result.z))
    assert result.p_two_sided == pytest.approx(2.0 * result.p_value)


def test_mann_kendall_ties_hand_computed() -> None:
    # x = [1, 2, 2, 3]: pairs (1,2)+ (1,2)+ (1,3)+ (2,2)0 (2,3)+ (2,3)+ -> S = 5
    # var = [4*3*13 - 2*1*9] / 18 = (156 - 18) / 18 = 138/18   (one tie group of size 2)
    # tau-b = S / sqrt(6 * (6 - 1)) = 5 / sqrt(30)               (one tied pair in x)
    result = mann_kendall([1, 2, 2, 3])
    assert result.s == 5
    assert result.var_s == pytest.approx(138.0 / 18.0)
    assert result.z == pytest.approx(4.0 / math.sqrt(138.0 / 18.0))
    assert result.tau == pytest.approx(5.0 / math.sqrt(30.0))


def test_mann_kendall_matches_brute_force_with_ties() -> None:
    for seed in range(20):
        rng = random.Random(seed)
        values = [float(rng.randint(0, 12)) for _ in range(rng.randint(2, 60))]
        n = len(values)
        brute = sum(
            (values[j] > values[i]) - (values[j] < values[i])
            for i in range(n)
            for j in range(i + 1, n)
        )
        groups = [values.count(v) for v in set(values)]
        var = (n * (n - 1) * (2 * n + 5) - sum(t * (t - 1) * (2 * t + 5) for t in groups)) / 18
        result = mann_kendall(values)
        assert result.s == brute
        assert result.var_s == pytest.approx(var)


def test_mann_kendall_constant_and_decreasing() -> None:
    flat = mann_kendall([4.0] * 10)
    assert (flat.s, flat.z, flat.p_value, flat.p_two_sided, flat.tau) == (0, 0.0, 0.5, 1.0, 0.0)
    down = mann_kendall([float(-t) for t in range(30)])
    assert down.s == -435
    assert down.tau == pytest.approx(-1.0)
    assert down.p_value > 0.999999
    assert down.p_two_sided < 1e-6


def test_mann_kendall_false_positive_rate_near_alpha() -> None:
    alpha = 0.05
    hits = 0
    for seed in range(200):
        rng = random.Random(seed)
        hits += mann_kendall([rng.gauss(0.0, 1.0) for _ in range(100)]).p_value < alpha
    assert 0.01 <= hits / 200 <= 0.10


def test_mann_kendall_linear_growth() -> None:
    _, ys = linear(random.Random(11), 200, slope=0.5, sd=10.0)
    result = mann_kendall(ys)
    assert result.p_value < 1e-6
    assert result.tau > 0.3


def test_mann_kendall_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        mann_kendall([1.0])
    with pytest.raises(ValueError):
        mann_kendall([1.0, math.nan, 2.0])


def test_mann_kendall_is_fast_at_256() -> None:
    rng = random.Random(5)
    values = [rng.gauss(0.0, 1.0) for _ in range(256)]
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        mann_kendall(values)
        best = min(best, time.perf_counter() - start)
    assert best < 0.020


# ---------------------------------------------------------------------------------------------
# Theil-Sen
# ---------------------------------------------------------------------------------------------


def test_theil_sen_exact_line() -> None:
    xs = [float(t) for t in range(10)]
    fit = theil_sen(xs, [3.0 * x + 2.0 for x in xs])
    assert (fit.slope, fit.intercept, fit.low, fit.high) == (3.0, 2.0, 3.0, 3.0)
    assert fit.pairs_used == 45


def test_theil_sen_matches_brute_force_median() -> None:
    rng = random.Random(2)
    xs = [rng.uniform(0.0, 100.0) for _ in range(40)]
    ys = [0.7 * x + rng.gauss(0.0, 5.0) for x in xs]
    slopes = sorted((ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(40) for j in range(i + 1, 40))
    fit = theil_sen(xs, ys)
    assert fit.slope == pytest.approx(median(slopes))
    assert fit.low <= fit.slope <= fit.high


def test_theil_sen_repeated_x() -> None:
    xs = [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    ys = [2.0 * x + 1.0 + (0.1 if i % 2 else -0.1) for i, x in enumerate(xs)]
    fit = theil_sen(xs, ys)
    assert fit.slope == pytest.approx(2.0, abs=0.1)
    assert fit.pairs_used == 28 - 4  # pairs with equal x are skipped
    with pytest.raises(ValueError):
        theil_sen([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])


def test_theil_sen_resists_twenty_percent_wild_values() -> None:
    for seed in range(20):
        rng = random.Random(seed)
        xs, ys = linear(rng, 100, slope=2.0, sd=1.0)
        for i in rng.sample(range(100), 20):
            ys[i] = rng.uniform(-1000.0, 1000.0)
        assert theil_sen(xs, ys).slope == pytest.approx(2.0, rel=0.05)


def test_theil_sen_interval_coverage() -> None:
    covered = 0
    trials = 200
    for seed in range(trials):
        rng = random.Random(1000 + seed)
        xs, ys = linear(rng, 30, slope=2.0, sd=3.0)
        fit = theil_sen(xs, ys, confidence=0.95)
        covered += fit.low <= 2.0 <= fit.high
    assert covered / trials >= 0.90


def test_theil_sen_subsamples_pairs_deterministically() -> None:
    xs, ys = linear(random.Random(9), 512, slope=0.5, sd=10.0)
    all_pairs = 512 * 511 // 2
    fit = theil_sen(xs, ys)
    assert fit.pairs_used <= DEFAULT_MAX_PAIRS < all_pairs
    assert theil_sen(xs, ys) == fit
    full = theil_sen(xs, ys, max_pairs=all_pairs)
    assert full.pairs_used == all_pairs
    assert fit.slope == pytest.approx(full.slope, rel=0.01)
    assert fit.low == pytest.approx(full.low, rel=0.02)
    assert fit.high == pytest.approx(full.high, rel=0.02)


def test_theil_sen_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        theil_sen([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        theil_sen([1.0, 2.0], [1.0, 2.0], confidence=1.0)
    with pytest.raises(ValueError):
        theil_sen([1.0, 2.0], [math.nan, 2.0])


# ---------------------------------------------------------------------------------------------
# Lower envelope and the gc sawtooth
# ---------------------------------------------------------------------------------------------


def test_lower_envelope_blocks() -> None:
    values = [5, 3, 4, 2, 6, 7, 1, 1, 9, 8]  # the trailing partial block [8] is dropped
    assert lower_envelope(values, 3) == [3.0, 2.0, 1.0]
    assert lower_envelope_points(values, 3) == ([1.0, 3.0, 6.0], [3.0, 2.0, 1.0])
    xs = [10.0 * i for i in range(10)]
    assert lower_envelope_points(values, 3, xs) == ([10.0, 30.0, 60.0], [3.0, 2.0, 1.0])
    assert lower_envelope(values, 20) == []
    with pytest.raises(ValueError):
        lower_envelope(values, 0)
    with pytest.raises(ValueError):
        lower_envelope_points(values, 2, xs[:3])


@pytest.mark.parametrize(
    ("leak", "expect_trend"),
    [
        pytest.param(0.0, False, id="sawtooth only"),
        pytest.param(0.02, True, id="sawtooth over a 0.02 block/sample leak"),
        pytest.param(0.05, True, id="sawtooth over a 0.05 block/sample leak"),
    ],
)
def test_sawtooth_envelope_trend_only_with_leak(leak: float, expect_trend: bool) -> None:
    # Amplitude ~500 blocks per collection cycle; the leak adds 60-150 over the window, less
    # than a single tooth, and is found only on the low points.
    trends = 0
    for seed in range(20):
        values = sawtooth(random.Random(seed), 3000, rise=5.0, leak=leak)
        xs, ys = lower_envelope_points(values, 150)  # width > longest period (120)
        trend = mann_kendall(ys)
        trends += trend.p_value < 0.01
        if expect_trend:
            assert theil_sen(xs, ys).slope == pytest.approx(leak, rel=0.2)
    if expect_trend:
        assert trends == 20
    else:
        assert trends <= 1


# ---------------------------------------------------------------------------------------------
# Plateau recognition
# ---------------------------------------------------------------------------------------------


def test_linear_leak_is_not_a_plateau() -> None:
    plateaus = 0
    for seed in range(200):
        xs, ys = linear(random.Random(seed), 300, slope=0.2, sd=10.0)
        result = plateau_test(xs, ys)
        plateaus += result.plateau
        assert not result.decelerating or result.plateau
    assert plateaus <= 2  # at most 1 %


@pytest.mark.parametrize(
    ("name", "make"),
    [
        pytest.param(
            "saturating, recent part from 3 tau",
            lambda rng: saturating(rng, 300, tau=200.0 / 3.0, amplitude=1000.0, sd=10.0),
            id="saturating 1-exp(-t/tau), recent part starts at 3 tau",
        ),
        pytest.param(
            "saturating, recent part from 4 tau",
            lambda rng: saturating(rng, 300, tau=50.0, amplitude=1000.0, sd=10.0),
            id="saturating 1-exp(-t/tau), recent part starts at 4 tau",
        ),
        pytest.param(
            "bounded cache", lambda rng: bounded_cache(rng, 300), id="cache fills to 128, flat"
        ),
        pytest.param(
            "early step", lambda rng: step(rng, 300, 60, 50.0, 1.0), id="step at 20 %, flat"
        ),
        pytest.param(
            "middle step", lambda rng: step(rng, 300, 150, 50.0, 1.0), id="step at 50 %, flat"
        ),
    ],
)
def test_bounded_growth_is_a_plateau(name: str, make: Callable[[random.Random], Series]) -> None:
    for seed in range(50):
        xs, ys = make(random.Random(seed))
        result = plateau_test(xs, ys)
        assert result.plateau, (name, seed, result)
        assert result.decelerating
        # And the trend test alone would have alarmed: this is what the plateau test is for.
        assert mann_kendall(ys).p_value < 1e-3


def test_step_in_recent_part_is_not_a_plateau_yet() -> None:
    xs, ys = step(random.Random(1), 300, 250, 50.0, 1.0)
    assert not plateau_test(xs, ys).plateau


def test_slow_logarithmic_warm_up_is_decelerating_not_plateau() -> None:
    # a*log(1+t) never stops growing: the recent slope stays about a third of the window's
    # reference rate, so plateau_test says "decelerating" but not "plateau". The detector must
    # handle it with its warm-up length and minimum growth rate (min_slope).
    for seed in range(20):
        rng = random.Random(seed)
        xs = [float(t) for t in range(0, 3000, 10)]
        ys = [100.0 * math.log1p(t) + rng.gauss(0.0, 1.0) for t in xs]
        result = plateau_test(xs, ys)
        assert not result.plateau
        assert result.decelerating
        assert 0.25 < result.ratio < 0.45
        # Recent slope ~ 100/2500 = 0.04 per x; with a minimum growth rate above it: plateau.
        assert plateau_test(xs, ys, min_slope=0.1).plateau


def test_min_slope_makes_flat_noise_a_plateau() -> None:
    xs, ys = linear(random.Random(4), 300, slope=0.0, sd=10.0)
    assert plateau_test(xs, ys, min_slope=1.0).plateau


def test_plateau_test_rejects_short_windows() -> None:
    with pytest.raises(ValueError):
        plateau_test([float(t) for t in range(10)], [0.0] * 10)
    with pytest.raises(ValueError):
        plateau_test([1.0, 2.0], [1.0])


# ---------------------------------------------------------------------------------------------
# Non-negative least squares
# ---------------------------------------------------------------------------------------------


def _gradient(a: list[list[float]], b: list[float], x: list[float]) -> list[float]:
    resid = [
        bi - sum(aij * xj for aij, xj in zip(row, x, strict=True))
        for row, bi in zip(a, b, strict=True)
    ]
    return [sum(a[i][j] * resid[i] for i in range(len(a))) for j in range(len(x))]


def _assert_kkt(a: list[list[float]], b: list[float], x: list[float]) -> None:
    """x solves NNLS iff x >= 0, w = A^T (b - A x) <= 0, and w_j = 0 where x_j > 0."""
    w = _gradient(a, b, x)
    scale = max(abs(v) for row in a for v in row) * max(abs(v) for v in b) * len(b)
    assert all(v >= 0.0 for v in x)
    for xj, wj in zip(x, w, strict=True):
        assert wj <= 1e-9 * scale
        if xj > 0.0:
            assert abs(wj) <= 1e-9 * scale


def test_nnls_clamps_negative_unconstrained_solution() -> None:
    # Least squares on y = c0 + c1 * t through (1, 3), (2, 2), (3, 1) gives c = (4, -1).
    # With c1 >= 0 the best is c1 = 0 and c0 = mean(b) = 2 (residual 2, versus 6.86 for the
    # other face c0 = 0, c1 = 10/14). KKT: w1 = [1, 2, 3] . [1, 0, -1] = -2 <= 0.
    a = [[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]]
    b = [3.0, 2.0, 1.0]
    x = nnls(a, b)
    assert x == pytest.approx([2.0, 0.0], abs=1e-12)
    _assert_kkt(a, b, x)


def test_nnls_exact_recovery() -> None:
    a = [[1.0, 0.0, 2.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [2.0, 1.0, 1.0], [0.0, 3.0, 1.0]]
    truth = [1.0, 2.0, 0.5]
    b = [sum(aij * tj for aij, tj in zip(row, truth, strict=True)) for row in a]
    assert nnls(a, b) == pytest.approx(truth, abs=1e-10)


def test_nnls_identity_and_zero() -> None:
    assert nnls([[1.0, 0.0], [0.0, 1.0]], [1.0, -1.0]) == [1.0, 0.0]
    assert nnls([[1.0, 0.0], [0.0, 1.0]], [-1.0, -1.0]) == [0.0, 0.0]
    assert nnls([], []) == []


def test_nnls_random_problems_satisfy_kkt() -> None:
    for seed in range(10):
        rng = random.Random(seed)
        m, k = rng.randint(5, 60), rng.randint(1, 12)
        a = [[rng.uniform(0.0, 100.0) for _ in range(k)] for _ in range(m)]
        truth = [rng.choice((0.0, rng.uniform(0.0, 50.0))) for _ in range(k)]
        b = [
            sum(r * t for r, t in zip(row, truth, strict=True)) + rng.gauss(0.0, 500.0) for row in a
        ]
        _assert_kkt(a, b, nnls(a, b))


def test_nnls_attributes_window_growth_to_routes() -> None:
    # Per-window counts of three routes; only route 1 retains 240 bytes per request.
    rng = random.Random(8)
    a = [[float(rng.randint(50, 150)) for _ in range(3)] for _ in range(80)]
    b = [240.0 * row[1] + rng.gauss(0.0, 300.0) for row in a]
    x = nnls(a, b)
    assert x[1] == pytest.approx(240.0, rel=0.05)
    assert x[0] < 10.0
    assert x[2] < 10.0


def test_nnls_duplicate_columns() -> None:
    # Two identical route columns: any split is optimal; the total must match.
    a = [[1.0, 1.0, 0.0], [2.0, 2.0, 1.0], [3.0, 3.0, 0.0], [4.0, 4.0, 1.0]]
    b = [2.0, 5.0, 6.0, 9.0]  # = 2 * col0 + 1 * col2
    x = nnls(a, b)
    assert x[0] + x[1] == pytest.approx(2.0, abs=1e-9)
    assert x[2] == pytest.approx(1.0, abs=1e-9)


def test_nnls_wide_problem() -> None:
    a = [[1.0, 2.0, 3.0]]
    x = nnls(a, [6.0])
    assert sum(v * c for v, c in zip(x, a[0], strict=True)) == pytest.approx(6.0)
    assert all(v >= 0.0 for v in x)


def test_nnls_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        nnls([[1.0, 2.0], [1.0]], [1.0, 2.0])
    with pytest.raises(ValueError):
        nnls([[1.0]], [1.0, 2.0])
    with pytest.raises(ValueError):
        nnls([[math.inf]], [1.0])
