"""Tests for memwatch.sketch: keyed fingerprints, HyperLogLog and the first-seen Bloom filter."""

from __future__ import annotations

import hashlib
import math
import random
import sys

import pytest

from memwatch.sketch import Fingerprinter, FirstSeenFilter, HyperLogLog

TOKEN = b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"


def fingerprints(seed: int, count: int) -> list[int]:
    """``count`` distinct uniform 64-bit values, as Fingerprinter would produce."""
    rng = random.Random(seed)
    out: set[int] = set()
    while len(out) < count:
        out.add(rng.getrandbits(64))
    return list(out)


# ---------------------------------------------------------------------------------------------
# Fingerprinter
# ---------------------------------------------------------------------------------------------


def test_fingerprint_is_stable_per_instance_and_differs_between_instances() -> None:
    first, second = Fingerprinter(), Fingerprinter()
    assert first.fingerprint(TOKEN) == first.fingerprint(TOKEN)
    assert first.fingerprint(TOKEN) != second.fingerprint(TOKEN)
    assert first.fingerprint(TOKEN) != first.fingerprint(TOKEN + b"x")
    assert 0 <= first.fingerprint(TOKEN) < 2**64


def test_fingerprint_is_keyed_blake2b() -> None:
    key = bytes(range(16))
    expected = hashlib.blake2b(TOKEN, key=key, digest_size=8).digest()
    assert Fingerprinter(key=key).fingerprint(TOKEN) == int.from_bytes(expected, "little")
    with pytest.raises(ValueError):
        Fingerprinter(key=b"")


def test_fingerprint_accepts_text() -> None:
    fp = Fingerprinter()
    assert fp.fingerprint(TOKEN.decode()) == fp.fingerprint(TOKEN)
    fp.fingerprint("\udcff lone surrogate from a latin-1 header")  # must not raise


def test_fingerprinter_keeps_neither_credential_nor_shows_key() -> None:
    fp = Fingerprinter()
    fp.fingerprint(TOKEN)
    state = vars(fp)
    assert all(TOKEN not in value for value in state.values() if isinstance(value, bytes))
    assert TOKEN.decode() not in repr(state)
    assert repr(fp) == "Fingerprinter(key=<hidden>)"
    assert fp._key.hex() not in repr(fp)


def test_fingerprint_is_the_compiled_keyed_hash_where_built_else_hash() -> None:
    speedups = pytest.importorskip("memwatch._speedups")
    fp = Fingerprinter()
    assert fp.hash_key is not None and len(fp.hash_key) == 16
    assert fp.fingerprint(TOKEN) == speedups.keyed_hash(fp.hash_key, TOKEN)
    python = Fingerprinter(compiled=False)
    assert python.hash_key is None
    if sys.hash_info.algorithm.startswith("siphash"):
        salt = int.from_bytes(python._key[:8], "little")
        assert python.fingerprint(TOKEN) == (hash(TOKEN) ^ salt) % 2**64
    assert Fingerprinter(key=b"k" * 16).hash_key is None  # the BLAKE2b reference


def test_keyed_hash_reads_text_and_buffers_as_their_bytes() -> None:
    speedups = pytest.importorskip("memwatch._speedups")
    key = bytes(range(16))

    class Sub(bytes):
        pass

    want = speedups.keyed_hash(key, TOKEN)
    for same in (TOKEN.decode(), bytearray(TOKEN), memoryview(TOKEN), Sub(TOKEN)):
        assert speedups.keyed_hash(key, same) == want
    text = "jeton-é-\udcff"
    assert speedups.keyed_hash(key, text) == speedups.keyed_hash(
        key, text.encode("utf-8", "surrogatepass")
    )
    with pytest.raises(ValueError):
        speedups.keyed_hash(b"short", TOKEN)
    with pytest.raises(TypeError):
        speedups.keyed_hash(key, 12345)


def test_keyed_hash_separates_lengths_keys_and_block_order() -> None:
    speedups = pytest.importorskip("memwatch._speedups")
    key, other = bytes(range(16)), bytes(range(1, 17))
    zeros = {speedups.keyed_hash(key, bytes(n)) for n in range(80)}
    assert len(zeros) == 80  # zero padding of the tail never makes two lengths collide
    assert speedups.keyed_hash(key, TOKEN) != speedups.keyed_hash(other, TOKEN)
    blocks = b"A" * 16 + b"B" * 16
    assert speedups.keyed_hash(key, blocks) != speedups.keyed_hash(key, blocks[16:] + blocks[:16])


def test_keyed_hash_avalanches() -> None:
    # Every single-bit change of a 150-byte token flips about half of the 64 output bits (32 on
    # average for an ideal hash; the standard error of the mean over 1,200 flips is 0.12).
    speedups = pytest.importorskip("memwatch._speedups")
    key = bytes(range(16))
    token = bytes(random.Random(3).randrange(33, 127) for _ in range(150))
    base = speedups.keyed_hash(key, token)
    flipped = []
    for i in range(len(token)):
        for bit in range(8):
            changed = bytearray(token)
            changed[i] ^= 1 << bit
            flipped.append(bin(base ^ speedups.keyed_hash(key, bytes(changed))).count("1"))
    assert min(flipped) >= 12
    assert 31.0 <= sum(flipped) / len(flipped) <= 33.0


def test_keyed_hash_bits_are_uniform_on_similar_tokens() -> None:
    # 100,000 JWT-shaped tokens that differ in a few characters: every output bit is set in half
    # of them (standard error 0.0016; 0.01 is six of it) and the HyperLogLog counts them within
    # its error (1.6 % at precision 12).
    speedups = pytest.importorskip("memwatch._speedups")
    key = bytes(range(16))
    count = 100_000
    ones = [0] * 64
    hll = HyperLogLog(precision=12)
    for n in range(count):
        h = speedups.keyed_hash(key, b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyLT%08d" % n)
        hll.add(h)
        for b in range(64):
            ones[b] += (h >> b) & 1
    assert all(abs(c / count - 0.5) < 0.01 for c in ones), ones
    assert hll.estimate() == pytest.approx(count, rel=0.04)


# ---------------------------------------------------------------------------------------------
# HyperLogLog
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1_000, 10_000, 100_000])
def test_hyperloglog_estimate_within_three_percent(count: int) -> None:
    hll = HyperLogLog(precision=12)  # standard error 1.04 / 64 = 1.6 %
    for h in fingerprints(count, count):
        hll.add(h)
    assert hll.estimate() == pytest.approx(count, rel=0.03)


def test_hyperloglog_mean_error_over_seeds() -> None:
    # Across the linear-counting / raw switch-over region too (1.5k to 40k at m = 4096).
    errors = []
    for seed, count in enumerate([1_500, 4_000, 8_000, 10_240, 12_000, 20_000, 40_000]):
        hll = HyperLogLog()
        for h in fingerprints(100 + seed, count):
            hll.add(h)
        errors.append(hll.estimate() / count - 1.0)
    assert math.fsum(abs(e) for e in errors) / len(errors) < 0.025
    assert abs(math.fsum(errors) / len(errors)) < 0.015


def test_hyperloglog_duplicates_do_not_change_estimate() -> None:
    values = fingerprints(1, 5_000)
    once, many = HyperLogLog(), HyperLogLog()
    for h in values:
        once.add(h)
    for _ in range(5):
        for h in values:
            many.add(h)
    assert many.registers == once.registers
    assert many.estimate() == once.estimate()


def test_hyperloglog_merge_is_union() -> None:
    values = fingerprints(2, 30_000)
    left, right, union = HyperLogLog(), HyperLogLog(), HyperLogLog()
    for h in values[:20_000]:
        left.add(h)
    for h in values[10_000:]:
        right.add(h)
    for h in values:
        union.add(h)
    left.merge(right)
    assert left.registers == union.registers
    assert left.estimate() == pytest.approx(30_000, rel=0.03)
    with pytest.raises(ValueError):
        left.merge(HyperLogLog(precision=10))


def test_hyperloglog_memory_is_constant() -> None:
    hll = HyperLogLog(precision=12)
    assert len(hll.registers) == 4096
    for h in fingerprints(3, 100_000):
        hll.add(h)
    assert len(hll.registers) == 4096


def test_hyperloglog_copy_clear_and_empty() -> None:
    hll = HyperLogLog()
    assert hll.estimate() == 0.0
    for h in fingerprints(4, 2_000):
        hll.add(h)
    snapshot = hll.copy()
    hll.clear()
    assert hll.estimate() == 0.0
    assert snapshot.estimate() == pytest.approx(2_000, rel=0.03)
    assert snapshot.precision == 12
    hll.add(0)  # all-zero fingerprint: maximum rank in register 0
    hll.add(2**64 - 1)
    assert hll.estimate() == pytest.approx(2.0, abs=0.1)
    with pytest.raises(ValueError):
        HyperLogLog(precision=3)


# ---------------------------------------------------------------------------------------------
# FirstSeenFilter
# ---------------------------------------------------------------------------------------------


def test_first_seen_counts_new_fingerprints_at_low_saturation() -> None:
    seen = FirstSeenFilter()
    values = fingerprints(5, 10_000)
    first = sum(seen.add(h) for h in values)
    assert 0.99 * len(values) <= first <= len(values)
    assert not any(seen.add(h) for h in values)  # no false negatives: repeats are never "new"
    # 3 bits per fingerprint, distinct within one fingerprint: 1 - exp(-3n/m) of the bits.
    assert seen.saturation() == pytest.approx(1.0 - math.exp(-3 * 10_000 / 2**20), rel=0.02)
    assert seen.false_positive_rate() == pytest.approx(seen.saturation() ** 3)


def test_first_seen_saturation_grows_and_reset_restores() -> None:
    seen = FirstSeenFilter(bits=2**14, hashes=3)
    values = fingerprints(6, 8_000)
    previous = seen.saturation()
    assert previous == 0.0
    for chunk in range(0, len(values), 1_000):
        for h in values[chunk : chunk + 1_000]:
            seen.add(h)
        assert seen.saturation() > previous
        previous = seen.saturation()
    assert previous > 0.5
    assert seen.memory_bytes == 2**14 // 8
    seen.reset()
    assert seen.saturation() == 0.0
    assert seen.add(values[0])
    assert seen.memory_bytes == 2**14 // 8


def test_first_seen_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        FirstSeenFilter(bits=1000)
    with pytest.raises(ValueError):
        FirstSeenFilter(hashes=0)
