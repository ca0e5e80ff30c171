"""gunicorn hooks for multi-worker deployments.

In ``gunicorn.conf.py``::

    from memwatch.gunicorn import child_exit  # noqa: F401  (gunicorn looks the hook up by name)

With ``PROMETHEUS_MULTIPROC_DIR`` set, a worker that exits (``max_requests`` recycling, a
crash, a reload) has its per-worker gauges removed from ``/metrics``; its counters stay summed.
Worker recycling (``max_requests`` with ``max_requests_jitter``) contains a leak; it does not
cure it.
"""

from __future__ import annotations

from typing import Any

from memwatch.multiprocess import mark_process_dead


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn's ``child_exit`` server hook: marks the worker's process dead."""
    mark_process_dead(worker.pid)
