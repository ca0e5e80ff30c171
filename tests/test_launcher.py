"""``memwatch run``'s parts, without servers (tests/integration/test_integrations.py runs real
ones): the command line, the bootstrap ``sitecustomize`` (hooks installed, memwatch not imported
until a server is, the user's own ``sitecustomize`` still run), the gunicorn and uvicorn patches,
and :func:`memwatch.launcher.watch` (wraps once; leaves apps memwatch already watches alone)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings
from prometheus_client import CollectorRegistry

import memwatch
from memwatch import launcher
from memwatch.cli import main
from memwatch.flask import Memwatch as FlaskMemwatch
from tests.apps import bare_asgi, bare_wsgi, django_app, fastapi_app, flask_app, starlette_app
from tests.apps.support import make_environ, run_wsgi

REPO_ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("flask", "django", "starlette", "fastapi", "gunicorn", "uvicorn", "werkzeug")


def python(code: str, *, extra_path: list[str] | None = None, bootstrap: bool = True) -> str:
    """Runs ``code`` in a fresh interpreter (under the bootstrap, unless told); returns stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWATCH_")}
    env["PYTHONPATH"] = os.pathsep.join([*(extra_path or []), str(REPO_ROOT)])
    if bootstrap:
        env = launcher.command_environment(env)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# --- imports stay lazy ------------------------------------------------------------------------


def test_import_memwatch_imports_no_framework() -> None:
    out = python(
        f"""
        import sys, memwatch
        print(sorted(m for m in sys.modules if m.split(".")[0] in {FRAMEWORKS!r}
                     or m in ("memwatch.django", "memwatch.flask", "memwatch.launcher")))
        """,
        bootstrap=False,
    )
    assert out.strip() == "[]"


def test_bootstrap_imports_nothing_until_a_server_is_imported() -> None:
    out = python(
        """
        import sys
        print("memwatch" in sys.modules, type(sys.meta_path[0]).__name__)
        import gunicorn.app.base, uvicorn.config
        print("memwatch" in sys.modules)
        print(getattr(gunicorn.app.base.BaseApplication.wsgi, "__memwatch_patched__", False))
        print(getattr(uvicorn.config.Config.load_app, "__memwatch_patched__", False))
        print(gunicorn.app.base.__spec__.origin.endswith("gunicorn/app/base.py"))
        """
    )
    assert out.split() == ["False", "_Finder", "True", "True", "True", "True"]


def test_the_users_sitecustomize_still_runs(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text("import os\nUSER = 'ran'\nos.environ['SEEN'] = '1'\n")
    out = python(
        """
        import os, sys
        print(sys.modules["sitecustomize"].USER, os.environ.get("SEEN"))
        print(type(sys.meta_path[0]).__name__)
        """,
        extra_path=[str(tmp_path)],
    )
    assert out.split() == ["ran", "1", "_Finder"]


# --- the command line -------------------------------------------------------------------------


def test_run_without_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 2
    assert main(["run", "--"]) == 2
    assert "no command given" in capsys.readouterr().err


def test_run_an_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--", "memwatch-no-such-command-xyz"]) == 127
    assert "cannot run 'memwatch-no-such-command-xyz'" in capsys.readouterr().err


def test_command_environment_puts_the_bootstrap_first_once() -> None:
    bootstrap = str(launcher.BOOTSTRAP_DIR)
    env = launcher.command_environment({"PYTHONPATH": f"/a{os.pathsep}{bootstrap}{os.pathsep}/b"})
    assert env["PYTHONPATH"].split(os.pathsep) == [bootstrap, "/a", "/b"]
    assert launcher.command_environment(env) == env
    assert launcher.command_environment({})["PYTHONPATH"] == bootstrap
    assert sorted(p.name for p in launcher.BOOTSTRAP_DIR.glob("*.py")) == [
        "__init__.py",
        "sitecustomize.py",
    ]


def test_run_replaces_itself_with_the_command() -> None:
    # The command gets the process (its exit status comes back as is) and the bootstrap.
    code = "import os, sys; print(os.environ['PYTHONPATH']); sys.exit(3)"
    done = subprocess.run(
        [sys.executable, "-m", "memwatch", "run", "--", sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip().split(os.pathsep)[0] == str(launcher.BOOTSTRAP_DIR)


# --- watch(): once, and never over another integration ----------------------------------------


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("MEMWATCH_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MEMWATCH_LOG_STARTUP", "0")


# watch() decides once per application object and process: each test makes its own objects.


def new_wsgi_app() -> Any:
    def app(environ: Any, start_response: Any) -> Any:
        return bare_wsgi.app(environ, start_response)

    return app


def new_asgi_app() -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await bare_asgi.app(scope, receive, send)

    return app


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(new_wsgi_app, memwatch.WSGIMiddleware, id="bare WSGI"),
        pytest.param(new_asgi_app, memwatch.ASGIMiddleware, id="bare ASGI"),
        pytest.param(flask_app.create_app, memwatch.WSGIMiddleware, id="Flask"),
        pytest.param(fastapi_app.create_app, memwatch.ASGIMiddleware, id="FastAPI"),
    ],
)
def test_watch_wraps_once(make: Any, expected: type, capsys: pytest.CaptureFixture[str]) -> None:
    app = make()
    watched = launcher.watch(app, server="test")
    assert isinstance(watched, expected)
    assert watched.app is app
    # the same object loaded again (uvicorn loads it twice), or the middleware: the same middleware
    assert launcher.watch(app, server="test") is watched
    assert launcher.watch(watched, server="test") is watched
    assert capsys.readouterr().err.count("memwatch run: watching") == 1


def _flask_extension() -> Any:
    app = flask_app.create_app()
    FlaskMemwatch(app, log_startup=False)
    return app


def _flask_wsgi_app_wrapped() -> Any:
    app = flask_app.create_app()
    app.wsgi_app = memwatch.wrap(app.wsgi_app, log_startup=False)  # type: ignore[method-assign]
    return app


def _starlette_add_middleware() -> Any:
    app = starlette_app.create_app()
    app.add_middleware(memwatch.ASGIMiddleware, log_startup=False, registry=CollectorRegistry())
    return app


def _django_settings_middleware() -> Any:
    with override_settings(
        ROOT_URLCONF=django_app.__name__, MIDDLEWARE=["memwatch.django.MemwatchMiddleware"]
    ):
        return django_app.wsgi_handler()


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_flask_extension, id="Flask extension"),
        pytest.param(_flask_wsgi_app_wrapped, id="Flask wsgi_app wrapped"),
        pytest.param(_starlette_add_middleware, id="Starlette add_middleware"),
        pytest.param(_django_settings_middleware, id="Django settings middleware"),
    ],
)
def test_watch_leaves_other_integrations_alone(make: Any) -> None:
    app = make()
    with override_settings(MIDDLEWARE=["memwatch.django.MemwatchMiddleware"]):
        assert launcher.watch(app, server="test") is app


@pytest.mark.usefixtures("quiet")
def test_watch_a_factory() -> None:
    create = launcher.watch(flask_app.create_app, factory=True, server="test")
    assert isinstance(create(), memwatch.WSGIMiddleware)
    # uvicorn calls a zero-argument callable as a factory even without --factory
    create = launcher.watch(fastapi_app.create_app, server="test")
    assert isinstance(create(), memwatch.ASGIMiddleware)


@pytest.mark.usefixtures("quiet")
def test_watch_leaves_what_it_cannot_tell_alone(capsys: pytest.CaptureFixture[str]) -> None:
    def odd(a: Any, b: Any, c: Any, d: Any) -> None:
        """Neither WSGI nor ASGI."""

    assert launcher.watch(odd, server="test") is odd
    assert "the application is not watched" in capsys.readouterr().err


@pytest.mark.usefixtures("quiet")
def test_watch_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMWATCH_ENABLED", "0")
    app = new_wsgi_app()
    assert launcher.watch(app, server="test") is app
    monkeypatch.setenv("MEMWATCH_ENABLED", "1")
    monkeypatch.setenv("MEMWATCH_MAX_ROUTES", "lots")
    with pytest.raises(memwatch.ConfigError, match="MEMWATCH_MAX_ROUTES"):
        launcher.watch(new_wsgi_app(), server="test")


# --- the server patches, on the real servers' classes -----------------------------------------


@pytest.mark.usefixtures("quiet")
def test_patch_gunicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    from gunicorn.app import base

    monkeypatch.setattr(base.BaseApplication, "wsgi", base.BaseApplication.wsgi)  # restored after
    launcher.patch_gunicorn(base)
    patched = base.BaseApplication.wsgi
    launcher.patch_gunicorn(base)
    assert base.BaseApplication.wsgi is patched  # patched once

    class Application(base.BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            pass

        def load(self) -> Any:
            return new_wsgi_app()

    application = Application()
    served = application.wsgi()
    assert isinstance(served, memwatch.WSGIMiddleware)
    assert application.wsgi() is served
    assert run_wsgi(served, make_environ("/status/401")).status == 401
    assert sum(served.monitor.snapshot().counts.values()) == 1


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize(
    ("target", "factory", "interface", "expected"),
    [
        pytest.param("tests.apps.bare_asgi:app", False, "auto", memwatch.ASGIMiddleware, id="ASGI app"),
        pytest.param("tests.apps.fastapi_app:create_app", True, "auto", memwatch.ASGIMiddleware, id="factory"),
        pytest.param(
            "tests.apps.bare_wsgi:app",
            False,
            "wsgi",
            memwatch.WSGIMiddleware,
            id="--interface wsgi",
            marks=pytest.mark.filterwarnings("ignore:Uvicorn's native WSGI:DeprecationWarning"),
        ),
    ],
)
def test_patch_uvicorn(
    monkeypatch: pytest.MonkeyPatch, target: str, factory: bool, interface: str, expected: type
) -> None:
    from uvicorn import config

    monkeypatch.setattr(config.Config, "load_app", config.Config.load_app)  # restored after
    launcher.patch_uvicorn(config)
    settings = config.Config(target, factory=factory, interface=interface, proxy_headers=False)  # type: ignore[arg-type]
    settings.load()
    loaded = settings.loaded_app
    watched = loaded.app if interface == "wsgi" else loaded  # uvicorn's own WSGI adapter outside
    assert isinstance(watched, expected)
