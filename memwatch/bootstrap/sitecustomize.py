"""Loaded by Python at start-up in every process that ``memwatch run`` starts.

``memwatch run -- COMMAND`` puts this directory first on ``PYTHONPATH``; Python's :mod:`site`
then imports this module before the command's own code. It installs an import hook and nothing
else: when ``gunicorn.app.base`` or ``uvicorn.config`` is imported, :mod:`memwatch.launcher`
patches the server so that the application it loads goes through ``memwatch.wrap()``. memwatch
itself is imported only then (it takes a noticeable fraction of a second), so other Python
processes the command starts pay nothing. Standard library only, for the same reason.

A ``sitecustomize`` module of the user's (later on ``sys.path``) still runs, after this one.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

# Module whose import triggers a patch -> the patch function in memwatch.launcher.
PATCHES = {"gunicorn.app.base": "patch_gunicorn", "uvicorn.config": "patch_uvicorn"}


def _patch(module: ModuleType) -> None:
    try:
        from memwatch import launcher
    except ImportError as exc:  # the command runs an interpreter that has no memwatch
        sys.stderr.write(
            f"memwatch run: cannot import memwatch in {sys.executable} ({exc}); "
            "the application is not watched\n"
        )
        return
    getattr(launcher, PATCHES[module.__name__])(module)


class _PatchingLoader:
    """The module's own loader, then the patch."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _patch(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ...
        return getattr(self._loader, name)


class _Finder:
    """Finds the patched modules through the other finders and wraps their loaders."""

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in PATCHES:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec: ModuleSpec | None = find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)  # type: ignore[assignment]
                return spec
        return None


def install() -> None:
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for name in PATCHES:
        module = sys.modules.get(name)
        if module is not None:  # imported before us (a .pth file): patch it now
            _patch(module)


def chain() -> None:
    """Runs the ``sitecustomize`` that this one shadows, if there is one, as Python would have."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    # Python's import returns whatever sys.modules holds when this module's import finishes:
    # the user's module is then "sitecustomize", as it would have been without memwatch.
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


if __name__ == "sitecustomize":  # not when imported as memwatch.bootstrap.sitecustomize
    install()
    chain()
