"""All of memwatch's options, in one frozen dataclass.

Every option can be given as a keyword argument (``memwatch.wrap(app, max_routes=500)``) or as an
environment variable ``MEMWATCH_<NAME>`` (``MEMWATCH_MAX_ROUTES=500``). Keyword arguments win over
the environment, which wins over the defaults, so that code states intent and operators can still
tune a deployment without a release. Values are validated once, at start-up, with errors that
name the option and the variable::

    >>> Config.from_env({"MEMWATCH_MAX_ROUTES": "lots"})
    Traceback (most recent call last):
    ...
    memwatch.config.ConfigError: MEMWATCH_MAX_ROUTES: expected an integer, got 'lots'
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

ENV_PREFIX = "MEMWATCH_"
_SECRETS = frozenset({"token", "metrics_token"})

Protocol = Literal["auto", "wsgi", "asgi"]
DiagnosisMode = Literal["off", "triggered", "always"]


class ConfigError(ValueError):
    """An option has a value memwatch cannot use; the message names the option."""


@dataclasses.dataclass(frozen=True)
class Config:
    """memwatch's options. Each field is also read from ``MEMWATCH_<FIELD NAME IN CAPITALS>``.

    Args:
        enabled: False turns memwatch into a pass-through (nothing measured, nothing served).
        protocol: ``auto`` detects WSGI or ASGI; force ``wsgi`` or ``asgi`` for ambiguous callables.
        metrics_path: Where Prometheus text exposition is served; empty string to disable.
        metrics_token: If set, ``/metrics`` requires ``Authorization: Bearer <token>``.
        report_path: Prefix of the report endpoints (``report.json``, the HTML page).
        token: Token that opens the report endpoints to non-loopback clients.
        trusted_proxies: Addresses of reverse proxies whose ``X-Forwarded-For`` is believed.
            Without it, any forwarded request is treated as non-loopback.
        max_routes: Cap on distinct route labels; further routes count as ``__other__``.
        apikey_headers: Request headers that carry an API key (case-insensitive).
        session_cookies: Cookie names that carry a session identifier.
        query_credentials: Query-string parameters that carry a credential.
        sample_every_requests: Take a periodic sample at least every N requests ...
        sample_every_seconds: ... or every T seconds, whichever comes first.
        sample_budget_us: CPU budget per request, in microseconds, for heap-sized readings; the
            sampling interval stretches when such a reading gets expensive (large heaps).
        request_sample_rate: Fraction of requests measured individually (cheap readings at
            their entry and at the first entry after they finish).
        pair_budget_us: CPU budget per request, in microseconds, for the costly per-request
            readings (heap blocks, RSS); their share of measured requests follows from it.
        warmup_requests: Requests ignored by the detector while the app warms up.
        window_samples: Samples in the detector's sliding window.
        envelope_width: Samples per lower-envelope block (removes the gc sawtooth).
        alpha: Significance level of the trend test.
        min_growth_bytes: Smallest heap growth, in bytes per request, that can be a leak. The
            default (16) sits above the residue that frameworks, servers and memwatch itself
            leave in the first tens of thousands of requests (measured at 5 to 10 B/request
            under gunicorn after full collections); the smallest leak in the detection corpus
            is 23 B/request process-wide.
        min_growth_rss: Smallest RSS growth, in bytes per request, that can be a leak (RSS moves
            in coarse steps, so it needs a higher floor).
        min_route_bytes: Smallest retained bytes per request for a route to be suspected.
        confirm: Consecutive suspicious evaluations before a leak is reported.
        collect_check: Before a heap-only suspicion is reported, confirm it with two full
            garbage collections (``gc.collect()``) at least ``collect_check_requests`` apart:
            growth that a collection reclaims (cyclic garbage promoted to the oldest
            generation, objects parked in the interpreter's free lists) is not a leak. Costs
            two collections per suspicion (tens of milliseconds on a 250,000-object heap, about
            a second at 5 million objects); off, such growth can raise false alarms.
        collect_check_requests: Fewest requests between the two collections of a check; the
            span also grows until the suspected growth adds 32 KiB per request seen in flight
            at once (up to 16), since each request in flight holds its objects at a reading.
        clear: Consecutive clean evaluations before a reported leak clears.
        detector_budget_us: CPU budget per request, in microseconds, for running the detector.
        steady_budget_us: CPU budget per request, in microseconds, for all of the periodic work
            (samples, detector evaluations, measured requests) in steady state: once the
            detector has judged a full window of samples and suspects nothing. Each activity's
            whole cost is timed where it runs and its interval stretches to fit its share; the
            budgets above still rule until then and while a suspicion is being confirmed.
        heap_block_bytes: Mean size assumed for one Python heap block when converting block
            counts to bytes (calibrated from tracemalloc when a diagnosis window runs).
        history_size: Number of periodic samples kept (ring buffer).
        diagnosis: ``off``, ``triggered`` (default: a window when a leak is suspected) or
            ``always`` (development: windows back to back within the duty cycle).
        diagnosis_frames: Frames kept per traced allocation in a window. Deep enough to reach
            the request's trampoline frame through the framework's stack (Django's middleware
            chain is 20 frames deep); more frames cost more while tracing.
        diagnosis_requests: Requests tagged in one window ...
        diagnosis_seconds: ... or its length in seconds, whichever comes first.
        diagnosis_duty_cycle: Largest fraction of wall time spent in windows.
        log_startup: Log one line at start-up saying what is exposed where.
        speedups: Record requests through the compiled module ``memwatch._speedups`` when it
            is built (the same records as the pure-Python path, a few microseconds cheaper per
            request); false forces the pure-Python path.
    """

    enabled: bool = True
    protocol: Protocol = "auto"
    metrics_path: str = "/metrics"
    metrics_token: str | None = None
    report_path: str = "/memwatch/"
    token: str | None = None
    trusted_proxies: tuple[str, ...] = ()
    max_routes: int = 200
    apikey_headers: tuple[str, ...] = ("x-api-key", "api-key", "x-auth-token", "x-access-token")
    session_cookies: tuple[str, ...] = (
        "sessionid",
        "session",
        "connect.sid",
        "jsessionid",
        "phpsessid",
        "_session_id",
    )
    query_credentials: tuple[str, ...] = ("access_token", "api_key", "apikey", "token", "key")
    sample_every_requests: int = 50
    sample_every_seconds: float = 1.0
    sample_budget_us: float = 1.0
    request_sample_rate: float = 0.05
    pair_budget_us: float = 0.2
    warmup_requests: int = 2000
    window_samples: int = 192
    envelope_width: int = 3
    alpha: float = 0.001
    min_growth_bytes: float = 16.0
    min_growth_rss: float = 64.0
    min_route_bytes: float = 16.0
    confirm: int = 2
    collect_check: bool = True
    collect_check_requests: int = 1000
    clear: int = 3
    detector_budget_us: float = 0.5
    steady_budget_us: float = 0.25
    heap_block_bytes: float = 64.0
    history_size: int = 1024
    diagnosis: DiagnosisMode = "triggered"
    diagnosis_frames: int = 32
    diagnosis_requests: int = 1000
    diagnosis_seconds: float = 15.0
    diagnosis_duty_cycle: float = 0.05
    log_startup: bool = True
    speedups: bool = True

    def __post_init__(self) -> None:
        _check_types(self)

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                value = getattr(self, name)
                # A token is a secret even when it is too short: say how long, never what.
                shown = f"{len(value)} characters" if name in _SECRETS else repr(value)
                raise ConfigError(f"{_env_name(name)} ({name}): {what}, got {shown}")

        need(self.protocol in get_args(Protocol), "protocol", "expected auto, wsgi or asgi")
        need(
            self.diagnosis in get_args(DiagnosisMode),
            "diagnosis",
            "expected off, triggered or always",
        )
        need(
            self.metrics_path == "" or self.metrics_path.startswith("/"),
            "metrics_path",
            "expected a path starting with '/' (or empty to disable)",
        )
        need(
            self.report_path.startswith("/") and self.report_path.endswith("/"),
            "report_path",
            "expected a path starting and ending with '/'",
        )
        need(self.report_path != self.metrics_path, "report_path", "must differ from metrics_path")
        need(self.max_routes >= 1, "max_routes", "expected at least 1")
        need(self.sample_every_requests >= 1, "sample_every_requests", "expected at least 1")
        need(self.sample_every_seconds > 0, "sample_every_seconds", "expected a positive number")
        need(self.sample_budget_us > 0, "sample_budget_us", "expected a positive number")
        need(
            0.0 <= self.request_sample_rate <= 1.0,
            "request_sample_rate",
            "expected a fraction between 0 and 1",
        )
        need(self.heap_block_bytes > 0, "heap_block_bytes", "expected a positive number")
        need(self.pair_budget_us > 0, "pair_budget_us", "expected a positive number")
        need(self.detector_budget_us > 0, "detector_budget_us", "expected a positive number")
        need(self.steady_budget_us > 0, "steady_budget_us", "expected a positive number")
        need(self.warmup_requests >= 0, "warmup_requests", "expected 0 or more")
        need(self.envelope_width >= 1, "envelope_width", "expected at least 1")
        need(
            self.window_samples >= 16 * self.envelope_width,
            "window_samples",
            "expected at least 16 envelope blocks (16 * envelope_width)",
        )
        need(0 < self.alpha < 0.5, "alpha", "expected a significance level between 0 and 0.5")
        need(self.min_growth_bytes >= 0, "min_growth_bytes", "expected 0 or more")
        need(self.min_growth_rss >= 0, "min_growth_rss", "expected 0 or more")
        need(self.min_route_bytes >= 0, "min_route_bytes", "expected 0 or more")
        need(self.confirm >= 1, "confirm", "expected at least 1")
        need(1 <= self.diagnosis_frames <= 256, "diagnosis_frames", "expected 1 to 256")
        need(self.diagnosis_requests >= 1, "diagnosis_requests", "expected at least 1")
        need(self.diagnosis_seconds > 0, "diagnosis_seconds", "expected a positive number")
        need(
            0 < self.diagnosis_duty_cycle <= 1,
            "diagnosis_duty_cycle",
            "expected a fraction between 0 and 1",
        )
        need(self.clear >= 1, "clear", "expected at least 1")
        need(self.collect_check_requests >= 1, "collect_check_requests", "expected at least 1")
        need(
            self.history_size >= self.window_samples,
            "history_size",
            "expected at least window_samples",
        )
        for name in ("token", "metrics_token"):
            value = getattr(self, name)
            need(value is None or len(value) >= 8, name, "expected at least 8 characters")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ConfigError(
                    f"{_env_name('trusted_proxies')} (trusted_proxies): {proxy!r} is not an IP "
                    "address or network"
                ) from None
        # Header and cookie names are matched case-insensitively: store them once, lowered.
        object.__setattr__(self, "apikey_headers", tuple(h.lower() for h in self.apikey_headers))
        object.__setattr__(
            self, "query_credentials", tuple(q.lower() for q in self.query_credentials)
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Build a Config from ``MEMWATCH_*`` variables, then apply keyword ``overrides``."""
        environ = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in names:
                known = ", ".join(sorted(names))
                raise ConfigError(f"unknown memwatch option {key!r}; known: {known}")
        for field in dataclasses.fields(cls):
            env = _env_name(field.name)
            if field.name in overrides:
                values[field.name] = overrides[field.name]
            elif env in environ:
                values[field.name] = _parse(env, environ[env], hints[field.name])
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _check_types(config: Config) -> None:
    """Keyword values of the wrong type fail with a ConfigError that names the option (not a
    TypeError from a comparison later); a string given for a tuple option is split on commas,
    as its environment variable is (``apikey_headers="x-key"`` is one header, not five)."""
    hints = get_type_hints(type(config))
    for field in dataclasses.fields(config):
        name, value, hint = field.name, getattr(config, field.name), hints[field.name]
        args = get_args(hint)
        optional = get_origin(hint) in (Union, types.UnionType) and type(None) in args
        if optional:
            if value is None:
                continue
            (hint,) = [a for a in args if a is not type(None)]
        what = None
        if get_origin(hint) is tuple:
            if isinstance(value, str):
                value = tuple(part.strip() for part in value.split(",") if part.strip())
            elif isinstance(value, (list, tuple, set, frozenset)):
                value = tuple(value)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                what = "expected a sequence of strings (or one comma-separated string)"
        elif hint is bool:
            what = None if isinstance(value, bool) else "expected True or False"
        elif hint is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
            what = None if ok else "expected an integer"
        elif hint is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = float(value)
            else:
                what = "expected a number"
        elif hint is str or get_origin(hint) is Literal:
            what = None if isinstance(value, str) else "expected a string"
        if what is not None:
            shown = f"a {type(value).__name__}" if name in _SECRETS else repr(value)
            raise ConfigError(f"{_env_name(name)} ({name}): {what}, got {shown}")
        object.__setattr__(config, name, value)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(env: str, raw: str, hint: Any) -> Any:
    text = raw.strip()
    origin = get_origin(hint)
    args = get_args(hint)
    if origin in (Union, types.UnionType) and type(None) in args:
        if text == "":
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse(env, raw, inner)
    if hint is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{env}: expected a boolean (1/0, true/false, yes/no), got {raw!r}")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{env}: expected an integer, got {raw!r}") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{env}: expected a number, got {raw!r}") from None
    if origin is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if origin is Literal:
        if text not in args:
            raise ConfigError(f"{env}: expected one of {', '.join(args)}, got {raw!r}")
        return text
    return text
