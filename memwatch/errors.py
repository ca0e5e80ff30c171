"""memwatch's own failures: counted, logged once, never raised into the wrapped app.

A failure is logged without its message: exception messages can quote the input that caused them
(a ``UnicodeDecodeError`` quotes the bytes of a header), and a header may hold a credential. The
log line names the exception type and the places in memwatch's code where it happened.
"""

from __future__ import annotations

import logging
import threading
import traceback

logger = logging.getLogger("memwatch")

_MAX_KEYS = 256


class InternalErrors:
    """Counts memwatch's internal failures; logs the first of each kind once."""

    def __init__(self) -> None:
        self.total = 0
        self.by_where: dict[str, int] = {}
        self._lock = threading.Lock()

    def record(self, where: str, exc: BaseException) -> None:
        with self._lock:
            self.total += 1
            first = where not in self.by_where
            if first and len(self.by_where) >= _MAX_KEYS:
                where, first = "other", "other" not in self.by_where
            self.by_where[where] = self.by_where.get(where, 0) + 1
        if first:
            logger.warning(
                "memwatch internal error in %s: %s at %s; the request goes on, memwatch counts "
                "further errors in memwatch_internal_errors_total without logging them",
                where,
                type(exc).__name__,
                _where(exc),
            )


def _where(exc: BaseException) -> str:
    """File:line of each frame of the traceback, without the exception's message."""
    frames = traceback.extract_tb(exc.__traceback__, limit=8)
    return " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(frames))
