"""Readings of the process's memory: resident set, Python heap, garbage collector, tracemalloc.

Each reading is a seam: :class:`Signals` takes the file, the functions and the process object it
reads from, so tests point it at fixture files or plain functions instead of patching the OS.

Costs (Python 3.11, measured on the project's machines; see docs/performance.md):

- RSS from ``/proc/self/statm`` with ``os.pread`` on a kept descriptor: about 2 µs; psutil
  elsewhere: about 20 µs.
- ``sys.getallocatedblocks()`` walks every pymalloc pool: 0.8 µs at 40 k live blocks, 30 µs at
  1 M, 144 µs at 5 M. It is therefore timed on every reading so that callers can stretch the
  sampling interval as the heap grows (:attr:`Signals.heap_cost_us`).
- ``gc.get_count()``: 0.1 µs at any heap size.
- Collections per generation: counted by a ``gc.callbacks`` hook (O(1) to read);
  ``gc.get_stats()``, which builds three dicts, took 9 µs per sample in place.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import dataclasses
import gc
import math
import os
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

psutil: Any
try:  # psutil is a dependency, but a broken install must not break the wrapped app
    import psutil
except ImportError:  # pragma: no cover
    psutil = None


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """One periodic reading. ``None`` means the reading was not available."""

    time: float  # monotonic seconds
    wall: float  # seconds since the epoch
    requests: int  # requests finished when the sample was taken
    rss_bytes: int | None
    heap_blocks: int | None
    gc_pending: int  # container objects allocated since the last generation-0 collection
    gc_collections: tuple[int, ...]  # collections so far, per generation
    traced_bytes: int | None  # tracemalloc's current traced size, when tracing
    first_seen: int = 0  # credentials seen for the first time so far (estimated)


class SampleRing:
    """The last ``capacity`` samples, stored column-wise in preallocated arrays.

    A ring of Sample objects would grow memwatch's own heap by a few blocks per sample until it
    filled (about 100,000 requests at default settings), which its own detector would see.
    Arrays of machine numbers allocate nothing per sample; Samples are built when read.
    """

    _INT_FIELDS = (
        "requests",
        "rss_bytes",
        "heap_blocks",
        "gc_pending",
        "traced_bytes",
        "first_seen",
    )
    _GENERATIONS = 3

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._times = array.array("d", bytes(8 * capacity))
        self._walls = array.array("d", bytes(8 * capacity))
        self._ints = {name: array.array("q", bytes(8 * capacity)) for name in self._INT_FIELDS}
        self._gcs = array.array("q", bytes(8 * capacity * self._GENERATIONS))
        self._ngcs = array.array("b", bytes(capacity))
        self._start = 0
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def clear(self) -> None:
        self._start = self._len = 0

    def append(self, sample: Sample) -> None:
        i = (self._start + self._len) % self.capacity
        if self._len < self.capacity:
            self._len += 1
        else:
            self._start = (self._start + 1) % self.capacity
        self._times[i] = sample.time
        self._walls[i] = sample.wall
        for name, column in self._ints.items():
            value = getattr(sample, name)
            column[i] = -1 if value is None else value
        gens = sample.gc_collections[: self._GENERATIONS]
        self._ngcs[i] = len(gens)
        for g, value in enumerate(gens):
            self._gcs[i * self._GENERATIONS + g] = value

    def _at(self, i: int) -> Sample:
        # Positional, without an intermediate dict: the detector builds its whole window of
        # samples (192 by default) at every evaluation, and this was half of an evaluation.
        ints = self._ints
        rss = ints["rss_bytes"][i]
        heap = ints["heap_blocks"][i]
        traced = ints["traced_bytes"][i]
        base = i * self._GENERATIONS
        return Sample(
            self._times[i],
            self._walls[i],
            ints["requests"][i],
            None if rss < 0 else rss,
            None if heap < 0 else heap,
            ints["gc_pending"][i],
            tuple(self._gcs[base : base + self._ngcs[i]]),
            None if traced < 0 else traced,
            ints["first_seen"][i],
        )

    def __getitem__(self, index: int) -> Sample:
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError("sample index out of range")
        return self._at((self._start + index) % self.capacity)

    def count_since(self, requests: int, limit: int) -> int:
        """How many of the last samples (at most ``limit``) were taken at ``requests`` or later
        (no Sample is built)."""
        column = self._ints["requests"]
        count = 0
        while count < min(limit, self._len):
            i = (self._start + self._len - 1 - count) % self.capacity
            if column[i] < requests:
                break
            count += 1
        return count

    def lows(self, back: int, width: int) -> tuple[int, int | None, int | None]:
        """Over the ``width`` samples that end ``back`` samples before the last one: (requests at
        the newest of them, the lowest heap blocks net of pending containers, the lowest RSS),
        a reading None when one of the samples lacks it. No Sample is built: the steady
        state's sentinel reads this at every sample."""
        if not 0 < width <= self._len - back or back < 0:
            raise IndexError("sample index out of range")
        ints = self._ints
        requests, heaps, pending, rsses = (
            ints["requests"],
            ints["heap_blocks"],
            ints["gc_pending"],
            ints["rss_bytes"],
        )
        newest = (self._start + self._len - 1 - back) % self.capacity
        heap: int | None = None
        rss: int | None = None
        heap_ok = rss_ok = True
        for k in range(width):
            i = (newest - k) % self.capacity
            if heap_ok:
                blocks = heaps[i]
                if blocks < 0:
                    heap_ok, heap = False, None
                else:
                    net = blocks - pending[i]
                    heap = net if heap is None else min(heap, net)
            if rss_ok:
                value = rsses[i]
                if value < 0:
                    rss_ok, rss = False, None
                else:
                    rss = value if rss is None else min(rss, value)
        return requests[newest], heap, rss

    def tail(self, count: int) -> list[Sample]:
        """The last ``count`` samples, oldest first (only those are built)."""
        first = max(self._len - count, 0)
        return [self._at((self._start + k) % self.capacity) for k in range(first, self._len)]

    def thinned(self, max_points: int) -> list[Sample]:
        """At most ``max_points`` samples spread evenly over the ring, the last one included.

        Only those are built: readers of the whole history (the report, every scrape) would
        otherwise build up to ``capacity`` Sample objects per read, and the peak raises the
        interpreter's free lists, which memwatch's own detector sees as heap growth.
        """
        n = self._len
        if n == 0:
            return []
        # Every step-th sample from the first, plus the last: ceil((n - 1) / (max - 1)) keeps
        # that within max_points.
        step = max(1, -(-(n - 1) // max(max_points - 1, 1)))
        picks = list(range(0, n, step))
        if picks[-1] != n - 1:
            picks.append(n - 1)
        return [self._at((self._start + k) % self.capacity) for k in picks]

    def __iter__(self) -> Iterator[Sample]:
        for k in range(self._len):
            yield self._at((self._start + k) % self.capacity)


class Signals:
    """Reads memory signals; every source can be replaced for tests or other platforms.

    :param statm_path: Linux ``statm`` file (pages); None skips it and uses psutil.
    :param page_size: Bytes per page for ``statm``; defaults to the system's.
    :param heap_blocks: Function returning the number of allocated Python heap blocks.
    :param gc_count: Function returning ``gc.get_count()``-like pending counts.
    :param gc_stats: Function returning ``gc.get_stats()``-like per-generation statistics;
        None (the default): the collections counted by memwatch's ``gc.callbacks`` hook since
        it was imported.
    :param process: A ``psutil.Process``-like object with ``memory_info().rss``.
    :param clock: Clock for timing readings (this thread's CPU time by default).
    :param malloc_in_use: Function returning the C allocator's bytes in use, or None where it
        cannot tell (default: glibc's ``mallinfo2()``; None elsewhere).
    """

    def __init__(
        self,
        *,
        statm_path: str | None = "/proc/self/statm",
        page_size: int | None = None,
        heap_blocks: Callable[[], int] = sys.getallocatedblocks,
        gc_count: Callable[[], tuple[int, ...]] = gc.get_count,
        gc_stats: Callable[[], list[dict[str, Any]]] | None = None,
        process: Any = None,
        clock: Callable[[], float] = time.thread_time,
        malloc_in_use: Callable[[], int | None] | None = None,
    ) -> None:
        self._malloc_in_use = malloc_in_use or glibc_in_use
        self.statm_path = statm_path if statm_path and os.path.exists(statm_path) else None
        self.page_size = page_size or _page_size()
        self._heap_blocks = heap_blocks
        self._gc_count = gc_count
        self._gc_stats = gc_stats
        self._process = process
        self._clock = clock
        self._fd: int | None = None
        self._fd_pid = 0
        self.heap_cost_us = 1.0  # last measured cost of one heap reading, microseconds
        # What reading the clock itself costs, taken off every timing: time.thread_time() is a
        # system call of about 2.6 µs on some virtual machines, more than a small heap's walk.
        self.clock_overhead_us = _clock_overhead_us(clock)

    def rss_bytes(self) -> int:
        """Resident set size in bytes. Raises OSError when no source can be read."""
        if self.statm_path is not None:
            try:
                return self._statm_rss()
            except (OSError, ValueError, IndexError):
                # Unreadable or malformed: fall back for good, on this very reading (a sample
                # must not lose its RSS while another source works), and drop the descriptor.
                self.statm_path = None
                self.close()
        process = self._process
        if process is None:
            if psutil is None:
                raise OSError("no RSS source: /proc/self/statm unreadable and psutil missing")
            process = self._process = psutil.Process()
        return int(process.memory_info().rss)

    def _statm_rss(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._fd_pid != pid:
            # /proc/self is resolved at open time: after a fork the child must reopen it, or it
            # would go on reading its parent's memory.
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)  # the inherited copy; the parent keeps its own
            assert self.statm_path is not None
            self._fd = os.open(self.statm_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._fd_pid = pid
        data = os.pread(self._fd, 128, 0)
        return int(data.split()[1]) * self.page_size

    def heap_blocks(self) -> int:
        """Allocated Python heap blocks, timing the reading (its cost grows with the heap)."""
        start = self._clock()
        blocks = self._heap_blocks()
        cost = max((self._clock() - start) * 1e6 - self.clock_overhead_us, 0.01)
        # This thread's CPU time (other threads' turns and preemption are not the reading's
        # cost), with outliers clamped and smoothed: one slow reading must not stop sampling.
        self.heap_cost_us = 0.8 * self.heap_cost_us + 0.2 * min(cost, 4.0 * self.heap_cost_us)
        return blocks

    def malloc_in_use(self) -> int | None:
        """Bytes the C allocator has handed out and not had back (every Python object, large
        buffers included, and C extensions' memory), or None where it cannot be read.

        Unlike RSS it goes down when memory is freed, and it does not grow with fragmentation
        or per-thread arenas. It walks the allocator's free lists (0.3 µs in a tidy process,
        milliseconds with many threads' arenas): for rare checks only, never per request.
        """
        return self._malloc_in_use()

    def gc_pending(self) -> int:
        """Container objects allocated since the last generation-0 collection (O(1))."""
        return self._gc_count()[0]

    def collections_total(self) -> int:
        """Garbage collections (any generation) since memwatch started watching: O(1).

        Counted by a ``gc.callbacks`` hook; ``gc.get_stats()`` costs about 3 µs.
        """
        return sum(_GC_BY_GENERATION)

    def gc_collections(self) -> tuple[int, ...]:
        """Collections so far, per generation (youngest first)."""
        if self._gc_stats is None:
            return tuple(_GC_BY_GENERATION)
        return tuple(int(gen.get("collections", 0)) for gen in self._gc_stats())

    def traced_bytes(self) -> int | None:
        if not tracemalloc.is_tracing():
            return None
        return tracemalloc.get_traced_memory()[0]

    def close(self) -> None:
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd = None


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _load_mallinfo2() -> Callable[[], _Mallinfo2] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        function = libc.mallinfo2  # glibc 2.33 and later
    except (OSError, AttributeError):
        return None
    function.restype = _Mallinfo2
    function.argtypes = []
    return function


_MALLINFO2 = _load_mallinfo2()


def glibc_in_use() -> int | None:
    """glibc's bytes in use: small chunks (``uordblks``) plus mmapped chunks (``hblkhd``)."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks) + int(info.hblkhd)


# Collections per generation, youngest first, since memwatch was imported (their sum is
# Signals.collections_total()).
_GC_BY_GENERATION = [0, 0, 0]


def _count_collection(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        # (An interpreter with more generations would count the older ones with the oldest.)
        _GC_BY_GENERATION[min(info.get("generation", 0), len(_GC_BY_GENERATION) - 1)] += 1


if _count_collection not in gc.callbacks:
    gc.callbacks.append(_count_collection)


def _clock_overhead_us(clock: Callable[[], float]) -> float:
    """The smallest difference between two consecutive readings of ``clock``, microseconds."""
    best = math.inf
    for _ in range(5):
        start = clock()
        best = min(best, clock() - start)
    return max(best * 1e6, 0.0) if math.isfinite(best) else 0.0


def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
        return 4096
