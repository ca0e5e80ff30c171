"""The per-request record: auth scheme, credential fingerprint, one queued tuple.

Every request that is neither measured nor inside a diagnosis window ends with one call::

    monitor.recorder.record_scope(scope, template, path, status)        # ASGI
    monitor.recorder.record_environ(environ, template, path, status)    # WSGI

which classifies the request's authentication (:class:`memwatch.auth.AuthClassifier`),
fingerprints its credential (:class:`memwatch.sketch.Fingerprinter`) and appends the record
``(template, path, method, auth, status, fingerprint)`` to the monitor's queue.

Two implementations give the same records: :class:`PyRecorder` here, the reference, and
``memwatch._speedups.Recorder``, a C extension built at install time when a compiler is there.
The C one decides only the common cases itself (no credential, a plain Bearer token, an ASCII
API key) and calls the reference for everything else, so it can never classify differently;
``tests/test_recorder.py`` checks both on generated headers. ``Config(speedups=False)``
(``MEMWATCH_SPEEDUPS=0``) keeps the pure-Python path.

The compiled ASGI path (``memwatch._speedups.StatusSend.finish``) keeps an ordinary request's
method, headers list and query string (never its scope, which holds the app's objects) and
records up to ``_speedups.BATCH_SIZE`` of them in a row, when the batch is full or before
anything reads the heap (``flush()``: samples, measured pairs, drains): done one at a time, the
recorder's code and tally are evicted from the CPU's caches by the app in between.
"""

from __future__ import annotations

import itertools
import types
import typing as t
from collections.abc import Callable

from memwatch.auth import AuthClassifier
from memwatch.sketch import Fingerprinter, HyperLogLog

__all__ = [
    "Gate",
    "PyGate",
    "PyRecorder",
    "Recorder",
    "compiled_available",
    "make_gate",
    "make_recorder",
]

Append = Callable[[tuple[t.Any, ...]], object]

_speedups: types.ModuleType | None
try:
    from memwatch import _speedups
except ImportError:  # not built (no compiler at install time): the pure-Python path
    _speedups = None


class Recorder(t.Protocol):
    """What the middlewares call at the end of a request (see the module docstring)."""

    def record_scope(
        self, scope: t.Any, template: str | None, path: str | None, status: int
    ) -> None: ...

    def record_environ(
        self,
        environ: dict[str, t.Any],
        template: str | None,
        path: str | None,
        status: str | None,
    ) -> None: ...

    def take(self) -> tuple[dict[tuple[t.Any, ...], int], list[int], int]:
        """What the recorder counted itself since the last call (the compiled recorder with
        ``sketches``): requests per (template, path, method, auth, status), the fingerprints
        sampled for the first-seen filter, requests lost to a full tally. Empty otherwise."""
        ...

    def flush(self) -> None:
        """Counts now what the recorder keeps for a batch (the compiled recorder keeps a few
        ordinary ASGI requests and counts them together): called before every reading of the
        heap, since a kept request holds its headers."""
        ...


class PyRecorder:
    """The reference recorder, in Python."""

    def __init__(
        self, append: Append, classifier: AuthClassifier, fingerprinter: Fingerprinter
    ) -> None:
        self._append = append
        self._from_scope = classifier.from_scope
        self._from_environ = classifier.from_environ
        self._fingerprint = fingerprinter.fingerprint

    def record_scope(
        self, scope: t.Any, template: str | None, path: str | None, status: int
    ) -> None:
        method = scope.get("method") or "GET"
        auth, credential = self._from_scope(scope)
        fingerprint = self._fingerprint(credential) if credential else None
        self._append((template, path, method, auth, status, fingerprint))

    def record_environ(
        self,
        environ: dict[str, t.Any],
        template: str | None,
        path: str | None,
        status: str | None,
    ) -> None:
        method = environ.get("REQUEST_METHOD") or "GET"
        auth, credential = self._from_environ(environ)
        fingerprint = self._fingerprint(credential) if credential else None
        self._append((template, path, method, auth, status, fingerprint))

    def take(self) -> tuple[dict[tuple[t.Any, ...], int], list[int], int]:
        return {}, [], 0  # every request went to the queue

    def flush(self) -> None:
        pass  # nothing kept: every request went to the queue


class Gate(t.Protocol):
    """Numbers the requests as they enter and says when the monitor has work due.

    ``due()`` takes the next number (0, 1, 2, ...) and returns it when it has reached
    ``next_event`` (the monitor's ``_event`` then runs for it), else None: one call and one
    comparison per request. The compiled middlewares read the C gate's fields directly."""

    next_event: int
    window_open: bool  # a diagnosis window runs (kept by Diagnosis.attach)
    retired: bool  # the monitor made a new gate: whoever kept this one looks again
    recorder: Recorder | None  # the monitor's recorder (Monitor.recorder is kept here)

    def due(self) -> int | None: ...


class PyGate:
    """The reference gate, in Python."""

    __slots__ = ("_numbers", "next_event", "recorder", "retired", "window_open")

    def __init__(self) -> None:
        self._numbers = itertools.count()
        self.next_event = 0
        self.window_open = False
        self.retired = False
        self.recorder: Recorder | None = None

    def due(self) -> int | None:
        number = next(self._numbers)
        return number if number >= self.next_event else None


def make_gate(*, compiled: bool = True) -> Gate:
    """The C gate when asked for and built, else :class:`PyGate`."""
    if not compiled or _speedups is None:
        return PyGate()
    gate: Gate = _speedups.Gate()
    return gate


def compiled_available() -> bool:
    """Whether the C recorder (``memwatch._speedups``) was built and imports."""
    return _speedups is not None


def make_recorder(
    append: Append,
    classifier: AuthClassifier,
    fingerprinter: Fingerprinter,
    *,
    compiled: bool = True,
    sketches: dict[str, HyperLogLog] | None = None,
) -> Recorder:
    """The C recorder when asked for and built, else :class:`PyRecorder`.

    With ``sketches`` (the monitor's HyperLogLog per auth scheme) the C recorder counts the
    requests itself instead of queueing them (``take()`` hands the counts over): runs of
    requests with the same labels cost one comparison each, fingerprints go straight into the
    sketches, and one in :data:`FIRST_SEEN_SAMPLING` is kept for the first-seen filter.
    """
    if not compiled or _speedups is None:
        return PyRecorder(append, classifier, fingerprinter)
    tables = classifier.fast_path_tables()
    recorder: Recorder = _speedups.Recorder(
        append=append,
        classify_scope=classifier.from_scope,
        classify_environ=classifier.from_environ,
        fingerprint=fingerprinter.fingerprint,
        apikey_raw=tables.apikey_raw,
        apikey_environ=tables.apikey_environ,
        query_needles=tables.query_needles,
        cookie_needles=tables.cookie_needles,
        blank=tables.blank,
        hash_key=fingerprinter.hash_key,
        sketches=None
        if sketches is None
        else {scheme: sketch.register_view() for scheme, sketch in sketches.items()},
    )
    return recorder
