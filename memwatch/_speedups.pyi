# Types of the compiled module memwatch/_speedups.c (optional: see memwatch/recorder.py).
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

class Recorder:
    def __init__(
        self,
        *,
        append: Callable[[tuple[Any, ...]], object],
        classify_scope: Callable[[Any], tuple[str, str | None]],
        classify_environ: Callable[[dict[str, object]], tuple[str, str | None]],
        fingerprint: Callable[[bytes | str], int],
        apikey_raw: tuple[bytes, ...],
        apikey_environ: tuple[str, ...],
        query_needles: tuple[bytes, ...],
        cookie_needles: tuple[bytes, ...],
        blank: bytes,
        salt: int | None,
        mix: bool,
        sketches: dict[str, tuple[bytearray, int]] | None = None,
    ) -> None: ...
    def take(self) -> tuple[dict[tuple[Any, ...], int], list[int], int]: ...
    def record_scope(
        self, scope: Any, template: str | None, path: str | None, status: int
    ) -> None: ...
    def record_environ(
        self, environ: dict[str, Any], template: str | None, path: str | None, status: str | None
    ) -> None: ...

class WSGIBase:
    app: Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
    monitor: Any
    def _wsgi_setup(
        self, metrics_path: str | None, report_path: str, unmatched: bool, fast: bool
    ) -> None: ...
    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]: ...

class WSGIResponse:
    def __call__(self, status: str, headers: Any, exc_info: Any = None) -> Any: ...
    def __iter__(self) -> WSGIResponse: ...
    def __next__(self) -> bytes: ...
    def close(self) -> None: ...

class ASGIFast:
    def __init__(
        self,
        *,
        monitor: Any,
        metrics_path: str | None,
        report_path: str,
        finish: Callable[..., None],
        unmatched: bool,
        fast: bool,
    ) -> None: ...
    def enter(self, scope: Any, send: Callable[[Any], Awaitable[None]]) -> StatusSend | None: ...

class StatusSend:
    @property
    def status(self) -> Any: ...
    def __call__(self, message: Any) -> Awaitable[None]: ...
    def failed(self) -> None: ...
    def finish(self) -> None: ...

def bloom_add(array: bytearray, mask: int, hashes: int, h: int) -> int: ...

class RuleSlot:
    def __init__(self, route_key: str) -> None: ...
    def __get__(self, obj: object, owner: type | None = None) -> Any: ...
    def __set__(self, obj: object, value: Any) -> None: ...
    def __delete__(self, obj: object) -> None: ...

class Gate:
    next_event: int
    @property
    def issued(self) -> int: ...
    def due(self) -> int | None: ...
