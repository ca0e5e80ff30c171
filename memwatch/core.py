"""What both middlewares share: the options, the monitor, the registry and the endpoints."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from memwatch import multiprocess
from memwatch.config import Config
from memwatch.endpoints import Endpoints
from memwatch.exporter import MemwatchCollector, render_metrics
from memwatch.monitor import LeakCallback, Monitor
from memwatch.multiprocess import Publisher
from memwatch.signals import Signals

if TYPE_CHECKING:
    # The report model and its renderers (memwatch.report, memwatch.html, and the advice they
    # use) are imported by the first report request or verdict, not at start-up: a process
    # that is never asked for its report does not hold their code.
    from memwatch.report import Leak, Report

logger = logging.getLogger("memwatch")

# After the multiprocess directory failed, the seconds before a worker tries it again.
PUBLISHER_RETRY_SECONDS = 30.0


def open_window(monitor: Monitor, reason: str, *, force: bool = False) -> tuple[bool, float]:
    """Opens an on-demand diagnosis window in one monitor; returns (opened, seconds to wait).

    ``(False, seconds)`` with seconds > 0: refused, because the duty-cycle pause after a
    previous window is still running (the monitor's first on-demand window is never refused);
    ``force=True`` opens it anyway. ``(False, 0.0)``: a window is already running (or could not
    start: an internal error, counted).
    """
    if not force:
        wait = monitor.diagnosis.on_demand_wait()
        if wait > 0.0:
            logger.info(
                "memwatch: on-demand diagnosis window refused (%s): the duty-cycle pause after "
                "the last window runs %.0f s more; force=True (POST ...diagnose?force=1, "
                "memwatch diagnose --force) opens one anyway",
                reason,
                wait,
            )
            return False, wait
    return monitor.start_diagnosis(reason, force=True), 0.0


class Memwatch:
    """One memwatch instance: everything a wrapped application's middleware needs.

    :param config: The options.
    :param registry: A prometheus_client registry to add memwatch's collector to; by default a
        private one, so that memwatch never clashes with the app's own metrics.
    :param signals: Readings source (a seam for tests and other platforms).
    :param monitor: An existing monitor to share (for example between a WSGI and an ASGI entry
        point of the same process).
    :param on_leak: Called as ``on_leak(monitor, verdict)`` when a leak is first suspected.
    :param on_clear: Called as ``on_clear(monitor, verdict)`` when it clears.
    """

    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        signals: Signals | None = None,
        monitor: Monitor | None = None,
        on_leak: LeakCallback | None = None,
        on_clear: LeakCallback | None = None,
    ) -> None:
        self.config = config
        self.monitor = monitor or Monitor(
            config, signals=signals, on_leak=on_leak, on_clear=on_clear
        )
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
        self._publisher: Publisher | None = None
        self._publisher_pid = 0
        self._publisher_failed_pid = 0
        self._publisher_failed_at = 0.0
        if multiprocess.enabled():
            self.monitor.sample_hooks.append(self._publish_if_due)
        self.collector = MemwatchCollector(self.monitor)
        self.registry.register(self.collector)
        self.endpoints = Endpoints(
            config,
            metrics=self.render_metrics,
            report_json=self._report_json,
            report_html=self._report_html,
            diagnose=self._diagnose_endpoint,
        )

    def diagnose(self, reason: str = "on demand", *, force: bool = False) -> bool:
        """Opens a diagnosis window now; False if one is already running, or if the duty-cycle
        pause after a previous window is still running (see :meth:`diagnosis_wait`; the first
        on-demand window is never refused) and ``force`` is not set."""
        return open_window(self.monitor, reason, force=force)[0]

    def diagnosis_wait(self) -> float:
        """Seconds before :meth:`diagnose` would open a window without ``force`` (0.0: now)."""
        return self.monitor.diagnosis.on_demand_wait()

    def _diagnose_endpoint(self, force: bool) -> tuple[bytes, float | None]:
        started, wait = open_window(self.monitor, "requested over HTTP", force=force)
        if wait > 0.0:
            seconds = math.ceil(wait)
            body = {
                "started": False,
                "active": False,
                "refused": "duty-cycle pause after the last window; ?force=1 overrides",
                "retry_after_seconds": seconds,
                "not_before": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds)
                ),
            }
            return json.dumps(body).encode(), float(seconds)
        active = self.monitor.diagnosis.window is not None
        return json.dumps({"started": started, "active": active}).encode(), None

    def verdict(self) -> Leak:
        """The current leak verdict, as the report's ``leak`` section."""
        from memwatch.report import leak_of

        return leak_of(self.monitor.snapshot())

    def report(self) -> Report:
        from memwatch.report import build_report

        return build_report(self.monitor.snapshot(), now=time.time())

    def _report_json(self) -> bytes:
        from memwatch.report import to_json

        return to_json(self.report())

    def _report_html(self) -> bytes:
        from memwatch import html

        return html.render(self.report()).encode("utf-8")

    def publisher(self) -> Publisher | None:
        """This worker's multiprocess publisher, when PROMETHEUS_MULTIPROC_DIR is set."""
        if not multiprocess.enabled():
            return None
        pid = os.getpid()
        if self._publisher is None or self._publisher_pid != pid:
            if pid == self._publisher_failed_pid and (
                time.monotonic() - self._publisher_failed_at < PUBLISHER_RETRY_SECONDS
            ):
                return None  # the directory failed a moment ago: do not retry on every sample
            try:
                self._publisher = Publisher(self.monitor)  # per process: made after the fork
            except Exception:
                self._publisher_failed_pid = pid
                self._publisher_failed_at = time.monotonic()
                raise
            self._publisher_pid = pid
            # A worker that goes idle still publishes its last counts within a second.
            threading.Thread(
                target=self._publish_loop,
                args=(self._publisher,),
                name="memwatch-publish",
                daemon=True,
            ).start()
        return self._publisher

    def _publish_loop(self, publisher: Publisher) -> None:
        while self._publisher is publisher:
            time.sleep(multiprocess.PUBLISH_EVERY_SECONDS)
            try:
                publisher.maybe_publish()
            except Exception as exc:
                self.monitor.errors.record("multiprocess.publish", exc)

    def _publish_if_due(self) -> None:
        publisher = self.publisher()
        if publisher is not None:
            publisher.maybe_publish()

    def render_metrics(self, accept: str | None) -> tuple[str, bytes]:
        if multiprocess.enabled():
            try:
                publisher = self.publisher()
                if publisher is not None:
                    publisher.publish()
                    return render_metrics(multiprocess.aggregate_registry(), accept)
            except Exception as exc:
                # The multiprocess directory cannot be written or read: this worker's own
                # figures (its internal errors included) rather than no answer.
                self.monitor.errors.record("multiprocess.metrics", exc)
        return render_metrics(self.registry, accept)

    def log_startup(self, app: object, protocol: str) -> None:
        """One INFO line saying what memwatch serves, where, and to whom (never a token)."""
        if not self.config.log_startup:
            return
        cfg = self.config
        if not cfg.metrics_path:
            metrics = "metrics off"
        elif cfg.metrics_token:
            metrics = f"metrics at {cfg.metrics_path} with its bearer token"
        else:
            metrics = f"metrics at {cfg.metrics_path} open to any client"
        report_access = "loopback clients " + ("or its bearer token" if cfg.token else "only")
        proxies = ", ".join(cfg.trusted_proxies) or "no proxy"
        logger.info(
            "memwatch watching %s (%s): %s; report at %s (HTML), %sreport.json and POST %sdiagnose "
            "for %s; X-Forwarded-For believed from %s",
            getattr(app, "__qualname__", type(app).__qualname__),
            protocol,
            metrics,
            cfg.report_path,
            cfg.report_path,
            cfg.report_path,
            report_access,
            proxies,
        )
