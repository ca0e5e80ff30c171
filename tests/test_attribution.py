"""Tests for memwatch.attribution: which growth follows credentials (synthetic series with
known answers, fixed seeds)."""

from __future__ import annotations

import random

import pytest

from memwatch.attribution import scales_with
from memwatch.detector import MIN_POINTS
from memwatch.signals import Sample

WIDTH = 3


def series(
    count: int,
    *,
    per_request: float,
    per_credential: float,
    new_share: float,
    seed: int,
    steady_share: bool = False,
) -> tuple[list[Sample], list[float]]:
    """``count`` samples 50 requests apart; a share of the requests brings a new credential (its
    share varies from interval to interval, as real traffic does); the heap grows by the given
    bytes per request and per new credential, under a sawtooth of garbage and some noise.
    ``steady_share``: the same share in every interval."""
    rng = random.Random(seed)
    samples: list[Sample] = []
    values: list[float] = []
    requests = first_seen = 0
    retained = 0.0
    for i in range(count):
        share = new_share if steady_share else new_share * rng.uniform(0.3, 1.7)
        new = sum(rng.random() < share for _ in range(50))
        requests += 50
        first_seen += new
        retained += 50 * per_request + new * per_credential
        garbage = (i % WIDTH) * 4096.0  # the sawtooth: lowest at the start of each block
        values.append(retained + garbage + rng.gauss(0.0, 64.0))
        samples.append(
            Sample(
                time=float(i),
                wall=float(i),
                requests=requests,
                rss_bytes=None,
                heap_blocks=None,
                gc_pending=0,
                gc_collections=(),
                traced_bytes=None,
                first_seen=first_seen,
            )
        )
    return samples, values


@pytest.mark.parametrize(
    ("per_request", "per_credential", "expected"),
    [
        (0.0, 2000.0, "distinct_credentials"),  # a cache keyed by the token
        (200.0, 0.0, "requests"),  # a per-request leak
    ],
)
def test_a_full_window_tells_credentials_from_requests(
    per_request: float, per_credential: float, expected: str
) -> None:
    samples, values = series(
        192, per_request=per_request, per_credential=per_credential, new_share=0.1, seed=5
    )
    assert scales_with(samples, values, WIDTH) == expected


def test_no_answer_before_the_detector_could_give_a_verdict() -> None:
    # Right after a diagnosis window the window restarts: with fewer envelope points than a
    # verdict needs, no answer (the caller keeps its last one); from there on, the answer.
    samples, values = series(192, per_request=200.0, per_credential=0.0, new_share=0.1, seed=11)
    short = WIDTH * (MIN_POINTS - 1)
    assert scales_with(samples[:short], values[:short], WIDTH) is None
    enough = WIDTH * MIN_POINTS
    assert scales_with(samples[:enough], values[:enough], WIDTH) == "requests"


def test_every_request_a_new_credential_is_undetermined() -> None:
    samples, values = series(
        192, per_request=0.0, per_credential=200.0, new_share=1.0, seed=3, steady_share=True
    )
    assert scales_with(samples, values, WIDTH) == "undetermined"
