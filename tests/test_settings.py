"""Unit tests of `app.settings`: defaults, `JUPYTER_*` parsing, `.env` files, validation, secrets.

Pure tests: no server, no network. The process environment is only touched via `monkeypatch`.
"""

from __future__ import annotations

import pytest

from app.settings import Settings, SettingsError, environment_with_dotenv

TOKEN = "tok-5ecret-abc123"
API_KEY = "key-5ecret-xyz789"


def settings_error(**fields) -> str:
    """The message of the SettingsError that `Settings(**fields)` raises."""
    with pytest.raises(SettingsError) as caught:
        Settings(**fields)
    return str(caught.value)


def env_error(environ: dict[str, str]) -> str:
    """The message of the SettingsError that `Settings.from_environment(environ)` raises."""
    with pytest.raises(SettingsError) as caught:
        Settings.from_environment(environ)
    return str(caught.value)


# -- defaults and environment parsing --------------------------------------------------------

def test_defaults_match_the_contract_table():
    settings = Settings.from_environment({})
    assert settings.server_url == "http://127.0.0.1:8080"
    assert settings.token == ""
    assert settings.timeout_connect == 10.0
    assert settings.timeout_total == 30.0
    assert settings.crash_sleep_duration == 30.0
    assert settings.log_level == "INFO"
    assert settings.execution_timeout == 300
    assert settings.proxy_api_key is None
    assert settings.api_keys == ()


def test_environment_values_are_parsed_to_their_types():
    settings = Settings.from_environment({
        "JUPYTER_SERVER_URL": "https://jupyter.example:8888/",
        "JUPYTER_TOKEN": TOKEN,
        "JUPYTER_TIMEOUT_CONNECT": "2.5",
        "JUPYTER_EXECUTION_TIMEOUT": "42",
        "JUPYTER_MAX_OUTPUT_BYTES": "2048",
        "JUPYTER_KERNEL_NAME": "ir",
    })
    assert settings.server_url == "https://jupyter.example:8888"  # trailing slash dropped
    assert settings.token == TOKEN
    assert settings.timeout_connect == 2.5
    assert settings.execution_timeout == 42.0 and isinstance(settings.execution_timeout, float)
    assert settings.max_output_bytes == 2048 and isinstance(settings.max_output_bytes, int)
    assert settings.kernel_name == "ir"


@pytest.mark.parametrize("given, expected", [
    ("WARN", "WARNING"), ("warn", "WARNING"), ("debug", "DEBUG"), ("ERROR", "ERROR"),
])
def test_log_level_is_normalised(given, expected):
    assert Settings.from_environment({"JUPYTER_LOG_LEVEL": given}).log_level == expected


@pytest.mark.parametrize("raw", ["", "   "])
def test_empty_api_key_in_environment_means_no_key(raw):
    settings = Settings.from_environment({"JUPYTER_PROXY_API_KEY": raw})
    assert settings.proxy_api_key is None
    assert settings.api_keys == ()


def test_unrelated_jupyter_variables_are_ignored():
    settings = Settings.from_environment({"JUPYTER_CONFIG_DIR": "/etc/jupyter",
                                          "JUPYTER_RUNTIME_DIR": "/tmp/rt"})
    assert settings == Settings()


def test_overrides_win_over_environment_and_none_means_not_given():
    environ = {"JUPYTER_SERVER_URL": "http://from-env:1", "JUPYTER_TOKEN": "env-token"}
    settings = Settings.from_environment(environ, server_url="http://from-flag:2", token=None)
    assert settings.server_url == "http://from-flag:2"
    assert settings.token == "env-token"


def test_unknown_override_is_refused():
    with pytest.raises(SettingsError, match="no_such_setting"):
        Settings.from_environment({}, no_such_setting=1)


# -- .env files ------------------------------------------------------------------------------

def test_dotenv_file_is_read(tmp_path, monkeypatch):
    monkeypatch.delenv("JUPYTER_SERVER_URL", raising=False)
    monkeypatch.delenv("JUPYTER_TOKEN", raising=False)
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"JUPYTER_SERVER_URL=http://dotenv-host:9999\nJUPYTER_TOKEN={TOKEN}\n")
    settings = Settings.from_environment(environment_with_dotenv(dotenv))
    assert settings.server_url == "http://dotenv-host:9999"
    assert settings.token == TOKEN


def test_real_environment_wins_over_dotenv(tmp_path, monkeypatch):
    dotenv = tmp_path / ".env"
    dotenv.write_text("JUPYTER_SERVER_URL=http://dotenv-host:9999\nJUPYTER_LOG_LEVEL=DEBUG\n")
    monkeypatch.setenv("JUPYTER_SERVER_URL", "http://env-host:7777")
    monkeypatch.delenv("JUPYTER_LOG_LEVEL", raising=False)
    settings = Settings.from_environment(environment_with_dotenv(dotenv))
    assert settings.server_url == "http://env-host:7777"
    assert settings.log_level == "DEBUG"


def test_missing_dotenv_file_is_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_KERNEL_NAME", "from-env")
    merged = environment_with_dotenv(tmp_path / "does-not-exist.env")
    assert merged["JUPYTER_KERNEL_NAME"] == "from-env"


# -- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["not a url", "ftp://127.0.0.1:21", "http://", "127.0.0.1:8888"])
def test_bad_server_url_is_refused_naming_the_variable(url):
    assert "JUPYTER_SERVER_URL" in settings_error(server_url=url)


def test_server_url_with_credentials_is_refused_without_echoing_them():
    message = settings_error(server_url=f"http://admin:{TOKEN}@127.0.0.1:8888")
    assert "JUPYTER_SERVER_URL" in message
    assert TOKEN not in message


def test_server_url_with_token_query_is_refused_without_echoing_it():
    message = settings_error(server_url=f"http://127.0.0.1:8888/?token={TOKEN}")
    assert "JUPYTER_SERVER_URL" in message
    assert TOKEN not in message


def test_scheme_less_server_url_with_credentials_is_not_echoed():
    # A value like "TOKEN@127.0.0.1:8888" (a forgotten "http://") must not put the credential
    # in the error message, which the CLI prints to stderr.
    message = settings_error(server_url=f"{TOKEN}@127.0.0.1:8888")
    assert "JUPYTER_SERVER_URL" in message
    assert TOKEN not in message


def test_server_url_with_non_numeric_port_is_refused():
    # Otherwise every later request fails with a misleading "cannot reach the Jupyter server".
    assert "JUPYTER_SERVER_URL" in settings_error(server_url="http://127.0.0.1:88a8")


@pytest.mark.parametrize("variable, raw", [
    ("JUPYTER_TIMEOUT_CONNECT", "0"),
    ("JUPYTER_TIMEOUT_TOTAL", "-1"),
    ("JUPYTER_EXECUTION_TIMEOUT", "0"),
    ("JUPYTER_KERNEL_START_TIMEOUT", "-5"),
    ("JUPYTER_CRASH_SLEEP_DURATION", "-0.5"),
    ("JUPYTER_TIMEOUT_TOTAL", "nan"),
    ("JUPYTER_TIMEOUT_TOTAL", "inf"),
    ("JUPYTER_MAX_OUTPUT_BYTES", "0"),
])
def test_out_of_range_numbers_are_refused_naming_the_variable(variable, raw):
    assert variable in env_error({variable: raw})


@pytest.mark.parametrize("variable, raw", [
    ("JUPYTER_TIMEOUT_CONNECT", "ten"),
    ("JUPYTER_EXECUTION_TIMEOUT", ""),
    ("JUPYTER_MAX_REQUEST_BYTES", "1.5"),
    ("JUPYTER_MAX_OUTPUT_BYTES", "10MB"),
])
def test_non_numbers_are_refused_naming_the_variable_and_value(variable, raw):
    message = env_error({variable: raw})
    assert variable in message
    assert repr(raw) in message


def test_crash_sleep_duration_may_be_zero():
    assert Settings.from_environment({"JUPYTER_CRASH_SLEEP_DURATION": "0"}) \
        .crash_sleep_duration == 0


def test_fractional_byte_cap_is_refused():
    # int(0.5) == 0 would drop every output as truncated.
    with pytest.raises(SettingsError, match="JUPYTER_MAX_OUTPUT_BYTES"):
        Settings(max_output_bytes=0.5)


def test_bad_log_level_is_refused():
    assert "JUPYTER_LOG_LEVEL" in env_error({"JUPYTER_LOG_LEVEL": "LOUD"})


def test_websocket_protocol_is_v1_or_json():
    assert Settings.from_environment({"JUPYTER_WEBSOCKET_PROTOCOL": "json"}) \
        .websocket_protocol == "json"
    assert "JUPYTER_WEBSOCKET_PROTOCOL" in env_error({"JUPYTER_WEBSOCKET_PROTOCOL": "v2"})


def test_execution_timeout_above_its_maximum_is_refused():
    message = env_error({"JUPYTER_EXECUTION_TIMEOUT": "100",
                         "JUPYTER_MAX_EXECUTION_TIMEOUT": "50"})
    assert "JUPYTER_EXECUTION_TIMEOUT" in message
    assert "JUPYTER_MAX_EXECUTION_TIMEOUT" in message


def test_replace_validates_again():
    with pytest.raises(SettingsError, match="JUPYTER_TIMEOUT_TOTAL"):
        Settings().replace(timeout_total=0)


# -- secrets ---------------------------------------------------------------------------------

def test_token_and_api_key_never_appear_in_repr():
    settings = Settings(token=TOKEN, proxy_api_key=f"{API_KEY},other-key-42")
    text = repr(settings) + str(settings)
    assert TOKEN not in text
    assert API_KEY not in text
    assert "other-key-42" not in text


def test_api_keys_splits_comma_separated_keys():
    settings = Settings.from_environment({"JUPYTER_PROXY_API_KEY": f" {API_KEY} ,, second ,"})
    assert settings.api_keys == (API_KEY, "second")


def test_api_key_of_only_commas_is_refused():
    assert "JUPYTER_PROXY_API_KEY" in env_error({"JUPYTER_PROXY_API_KEY": " , ,"})


def test_secrets_lists_token_and_every_api_key():
    settings = Settings(token=TOKEN, proxy_api_key=f"{API_KEY},second")
    assert set(settings.secrets) == {TOKEN, API_KEY, "second"}
    assert Settings().secrets == ()


def test_kernel_env_is_parsed_into_kernel_variables():
    settings = Settings(kernel_env="KERNEL_USERNAME=svc, KERNEL_LAUNCH_TIMEOUT=240")
    assert settings.kernel_env_vars == {"KERNEL_USERNAME": "svc", "KERNEL_LAUNCH_TIMEOUT": "240"}
    assert Settings().kernel_env_vars == {}


@pytest.mark.parametrize("value", ["PATH=/tmp", "KERNEL_X", "KERNEL-X=1", "=1"])
def test_kernel_env_refuses_what_is_not_a_kernel_variable(value):
    with pytest.raises(SettingsError, match="JUPYTER_KERNEL_ENV"):
        Settings(kernel_env=value)


@pytest.mark.parametrize("key", ["clé-secrète", "two words\tand a tab"])
def test_an_api_key_no_client_could_send_is_refused_at_start(key):
    """A header carries bytes (read as latin-1): a non-ASCII key would answer 401 to all."""
    with pytest.raises(SettingsError, match="printable ASCII"):
        Settings.from_environment({"JUPYTER_PROXY_API_KEY": key})
