"""memwatch's own failures: counted, logged once per place, never with the exception's message."""

from __future__ import annotations

import logging
import threading

import pytest

from memwatch.errors import InternalErrors

CANARY = "hdr-value-Bearer-eyJhbGciOiJIUzI1NiJ9"


def failure(message: str = CANARY) -> BaseException:
    """A raised exception (so: with a traceback) whose message quotes the input.

    ``"decode"`` gives a real UnicodeDecodeError, whose message quotes the offending byte.
    """
    try:
        if message == "decode":
            b"\xff".decode("utf-8")
        raise ValueError(f"bad header {message!r}")
    except Exception as exc:
        return exc


def test_counts_every_failure_by_place() -> None:
    errors = InternalErrors()
    for where in ("wsgi.finish", "wsgi.finish", "signals.rss", "wsgi.finish"):
        errors.record(where, failure())
    assert errors.total == 4
    assert errors.by_where == {"wsgi.finish": 3, "signals.rss": 1}


def test_logs_the_first_failure_of_each_place_once_without_its_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # GIVEN failures whose messages quote a credential
    errors = InternalErrors()
    caplog.set_level(logging.DEBUG, logger="memwatch")
    # WHEN the same place fails three times and another place once
    for _ in range(3):
        errors.record("asgi.finish", failure())
    errors.record("signals.heap", failure("decode"))
    # THEN one warning per place, naming the place, the type and the code location
    records = [r for r in caplog.records if r.name == "memwatch"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING]
    first, second = (r.getMessage() for r in records)
    assert "asgi.finish" in first and "ValueError" in first and "test_errors.py:" in first
    assert "signals.heap" in second and "UnicodeDecodeError" in second
    # AND never the message (which quotes the input)
    assert CANARY not in caplog.text
    assert "0xff" not in caplog.text and "\\xff" not in caplog.text


def test_exception_without_traceback_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="memwatch")
    InternalErrors().record("exporter", RuntimeError(CANARY))
    assert "RuntimeError" in caplog.text and CANARY not in caplog.text


def test_places_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN far more distinct places than the bound (a bug that formats data into the name)
    errors = InternalErrors()
    caplog.set_level(logging.WARNING, logger="memwatch")
    for i in range(1000):
        errors.record(f"place-{i}", failure())
    # THEN the extra places are folded into "other", counted, and logged once
    assert errors.total == 1000
    assert len(errors.by_where) <= 257
    assert errors.by_where["other"] == 1000 - (len(errors.by_where) - 1)
    assert sum(errors.by_where.values()) == 1000
    assert len(caplog.records) == len(errors.by_where)


def test_recording_is_thread_safe() -> None:
    errors = InternalErrors()
    barrier = threading.Barrier(8)
    exc = failure()

    def hammer(n: int) -> None:
        barrier.wait()
        for _ in range(2000):
            errors.record(f"t{n % 2}", exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors.total == 16_000
    assert errors.by_where == {"t0": 8000, "t1": 8000}
