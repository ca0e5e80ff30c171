"""Config: defaults, MEMWATCH_* parsing for every field, keyword precedence, clear errors."""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import pytest

from memwatch.config import ENV_PREFIX, Config, ConfigError

FIELDS = {f.name: f for f in dataclasses.fields(Config)}
HINTS = get_type_hints(Config)

# Values whose format the type alone does not give (paths, addresses).
SPECIAL: dict[str, tuple[str, Any]] = {
    "metrics_path": ("/internal/metrics", "/internal/metrics"),
    "report_path": ("/_memwatch/", "/_memwatch/"),
    "trusted_proxies": ("10.0.0.1, 192.168.0.0/16", ("10.0.0.1", "192.168.0.0/16")),
    "apikey_headers": ("X-Custom-Key, Authorization-Key", ("x-custom-key", "authorization-key")),
    "query_credentials": ("Sig,  auth ", ("sig", "auth")),
}


def _env_case(name: str) -> tuple[str, Any]:
    """A valid, non-default raw environment value for a field, and the value it must parse to.

    Derived from the field's type, so a field added later is covered without editing a table.
    """
    if name in SPECIAL:
        return SPECIAL[name]
    hint = HINTS[name]
    default = FIELDS[name].default
    if get_origin(hint) in (Union, types.UnionType):  # an optional secret
        return "s3cret-token-value", "s3cret-token-value"
    if hint is bool:
        return ("no", False) if default else ("yes", True)
    if hint is int:
        return str(default + 3), default + 3
    if hint is float:
        value = default / 2  # stays inside every documented range (fractions, levels, rates)
        return repr(value), value
    if get_origin(hint) is tuple:
        return "alpha, beta", ("alpha", "beta")
    if get_origin(hint) is Literal:
        other = next(a for a in get_args(hint) if a != default)
        return other, other
    raise AssertionError(f"no test value for {name}: {hint}")  # pragma: no cover


def env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def test_defaults_are_the_documented_ones() -> None:
    config = Config.from_env({})
    assert config == Config()
    assert config.enabled is True
    assert config.protocol == "auto"
    assert config.metrics_path == "/metrics"
    assert config.report_path == "/memwatch/"
    assert config.token is None and config.metrics_token is None
    assert config.trusted_proxies == ()
    assert config.max_routes >= 1
    assert "x-api-key" in config.apikey_headers
    assert {"access_token", "api_key", "token"} <= set(config.query_credentials)
    assert "sessionid" in config.session_cookies
    assert config.diagnosis == "triggered"


@pytest.mark.parametrize("name", sorted(FIELDS), ids=sorted(FIELDS))
def test_every_field_is_settable_from_its_environment_variable(name: str) -> None:
    raw, expected = _env_case(name)
    assert expected != FIELDS[name].default, "the test value must differ from the default"
    config = Config.from_env({env(name): raw})
    assert getattr(config, name) == expected
    # Only that field changed.
    assert dataclasses.replace(config, **{name: FIELDS[name].default}) == Config()


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        pytest.param("enabled", "0", False, id="bool 0"),
        pytest.param("enabled", " FALSE ", False, id="bool upper case, padded"),
        pytest.param("enabled", "off", False, id="bool off"),
        pytest.param("log_startup", "On", True, id="bool On"),
        pytest.param("log_startup", "1", True, id="bool 1"),
        pytest.param("max_routes", " 42 ", 42, id="int padded"),
        pytest.param("sample_every_seconds", "2.5", 2.5, id="float"),
        pytest.param("sample_every_seconds", "1e-1", 0.1, id="float exponent"),
        pytest.param("sample_every_seconds", "3", 3.0, id="float from integer text"),
        pytest.param("session_cookies", "a, ,b,,c ", ("a", "b", "c"), id="tuple drops empties"),
        pytest.param("trusted_proxies", "", (), id="tuple empty"),
        pytest.param("apikey_headers", "X-One", ("x-one",), id="tuple single, lowered"),
        pytest.param("token", "", None, id="optional empty is None"),
        pytest.param("token", "  padded-token  ", "padded-token", id="optional stripped"),
        pytest.param("protocol", "asgi", "asgi", id="literal"),
        pytest.param("diagnosis", " off ", "off", id="literal padded"),
    ],
)
def test_environment_parsing(name: str, raw: str, expected: Any) -> None:
    assert getattr(Config.from_env({env(name): raw}), name) == expected


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMWATCH_MAX_ROUTES", "17")
    monkeypatch.setenv("MEMWATCH_ENABLED", "false")
    config = Config.from_env()
    assert (config.max_routes, config.enabled) == (17, False)


def test_keyword_overrides_win_over_the_environment() -> None:
    environ = {"MEMWATCH_MAX_ROUTES": "10", "MEMWATCH_TOKEN": "from-the-env-1"}
    config = Config.from_env(environ, max_routes=20)
    assert config.max_routes == 20  # the keyword wins ...
    assert config.token == "from-the-env-1"  # ... and the rest of the environment still applies


def test_keyword_override_is_not_parsed_from_a_bad_environment_value() -> None:
    # A broken variable is irrelevant when code states the value.
    config = Config.from_env({"MEMWATCH_MAX_ROUTES": "lots"}, max_routes=5)
    assert config.max_routes == 5


def test_unrelated_environment_variables_are_ignored() -> None:
    config = Config.from_env({"MEMWATCH_SOAK": "1", "PATH": "/bin", "MAX_ROUTES": "1"})
    assert config == Config()


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        pytest.param("max_routes", "lots", "expected an integer", id="non-integer"),
        pytest.param("max_routes", "1.5", "expected an integer", id="float for int"),
        pytest.param("max_routes", "0", "expected at least 1", id="int out of range"),
        pytest.param("sample_every_requests", "-3", "expected at least 1", id="negative"),
        pytest.param("sample_every_seconds", "soon", "expected a number", id="non-number"),
        pytest.param("sample_every_seconds", "0", "expected a positive number", id="zero"),
        pytest.param("sample_every_seconds", "nan", "expected a positive number", id="nan"),
        pytest.param("request_sample_rate", "1.5", "between 0 and 1", id="fraction above 1"),
        pytest.param("enabled", "maybe", "expected a boolean", id="bad boolean"),
        pytest.param("protocol", "http", "expected one of auto, wsgi, asgi", id="bad protocol"),
        pytest.param("protocol", "WSGI", "expected one of", id="protocol is case-sensitive"),
        pytest.param("diagnosis", "sometimes", "expected one of", id="bad diagnosis"),
        pytest.param("metrics_path", "metrics", "starting with '/'", id="relative metrics path"),
        pytest.param("report_path", "/memwatch", "ending with '/'", id="report path no slash"),
        pytest.param(
            "trusted_proxies",
            "10.0.0.1, proxy.local",
            "'proxy.local' is not an IP",
            id="bad trusted proxy",
        ),
        pytest.param("trusted_proxies", "10.0.0.300", "is not an IP", id="bad octet"),
        pytest.param("token", "short", "at least 8 characters", id="short token"),
        pytest.param("metrics_token", "1234567", "at least 8 characters", id="short metrics token"),
    ],
)
def test_bad_environment_values_name_the_variable(name: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({env(name): raw})
    text = str(caught.value)
    assert text.startswith(env(name)), text
    assert message in text


def test_report_path_equal_to_metrics_path_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"MEMWATCH_REPORT_PATH.*must differ"):
        Config(metrics_path="/ops/", report_path="/ops/")


@pytest.mark.parametrize("name", ["token", "metrics_token"])
def test_a_rejected_token_is_not_echoed(name: str) -> None:
    # GIVEN a secret that is too short
    canary = "Zq7!"
    # WHEN it is refused
    with pytest.raises(ConfigError) as caught:
        Config.from_env({env(name): canary})
    # THEN the message says why, but never quotes the secret (it ends up in logs)
    assert "at least 8 characters" in str(caught.value)
    assert canary not in str(caught.value)
    with pytest.raises(ConfigError) as caught_kw:
        Config(**{name: canary})
    assert canary not in str(caught_kw.value)


def test_unknown_keyword_option_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({}, max_route=5)
    text = str(caught.value)
    assert "'max_route'" in text
    assert "max_routes" in text  # the list of known options points at the typo


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param(
            {"max_routes": "5"},
            "MEMWATCH_MAX_ROUTES (max_routes): expected an integer",
            id="str for int",
        ),
        pytest.param({"max_routes": True}, "expected an integer", id="bool for int"),
        pytest.param(
            {"enabled": "yes"},
            "MEMWATCH_ENABLED (enabled): expected True or False",
            id="str for bool",
        ),
        pytest.param({"sample_every_seconds": "1"}, "expected a number", id="str for float"),
        pytest.param(
            {"trusted_proxies": [10]}, "expected a sequence of strings", id="int in tuple"
        ),
        pytest.param({"protocol": None}, "expected a string", id="None for literal"),
    ],
)
def test_keyword_values_of_the_wrong_type_raise_config_error(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({}, **options)
    assert message in str(caught.value)


def test_keyword_tuple_options_accept_a_comma_separated_string_or_a_list() -> None:
    config = Config(apikey_headers="X-My-Key", session_cookies=["sid", "auth"])
    assert config.apikey_headers == ("x-my-key",)  # one header, not one per character
    assert config.session_cookies == ("sid", "auth")
    assert hash(config) == hash(
        Config(apikey_headers=("x-my-key",), session_cookies=("sid", "auth"))
    )


def test_keyword_int_for_float_is_accepted() -> None:
    assert Config(sample_every_seconds=2).sample_every_seconds == 2.0


def test_header_and_query_names_are_stored_lowered() -> None:
    config = Config(apikey_headers=("X-API-KEY",), query_credentials=("Api_Key",))
    assert config.apikey_headers == ("x-api-key",)
    assert config.query_credentials == ("api_key",)


def test_config_is_frozen_and_replace_validates() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_routes = 1  # type: ignore[misc]
    assert config.replace(max_routes=7).max_routes == 7
    with pytest.raises(ConfigError, match="MEMWATCH_MAX_ROUTES"):
        config.replace(max_routes=0)
