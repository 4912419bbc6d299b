"""The proxy's settings: one object built from defaults < `.env` < `JUPYTER_*` env < overrides.

Library code takes a `Settings` instance; only entry points (the CLI, `wsgi.py`) read `.env`
files and the process environment, through `Settings.from_environment`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dotenv import dotenv_values

ENV_PREFIX = "JUPYTER_"
LOG_LEVELS = {"DEBUG": "DEBUG", "INFO": "INFO", "WARN": "WARNING", "WARNING": "WARNING",
              "ERROR": "ERROR"}
MIB = 1024 * 1024


class SettingsError(ValueError):
    """A setting has a value the proxy cannot work with; the message names it and says why."""


@dataclass(frozen=True)
class Settings:
    """Everything the proxy can be configured with. Each field `x` is read from `JUPYTER_X`."""

    server_url: str = "http://127.0.0.1:8080"
    token: str = field(default="", repr=False)
    timeout_connect: float = 10.0
    timeout_total: float = 30.0
    crash_sleep_duration: float = 30.0
    log_level: str = "INFO"
    execution_timeout: float = 300.0
    max_execution_timeout: float = 3600.0
    proxy_api_key: str | None = field(default=None, repr=False)
    kernel_name: str = "python3"
    kernel_start_timeout: float = 60.0
    max_request_bytes: int = 10 * MIB
    max_output_bytes: int = 10 * MIB
    max_code_bytes: int = MIB
    max_kernels: int = 0
    max_queued_executions: int = 16
    max_idle_connections: int = 64
    pool_size: int = 0
    allowed_hosts: str = ""
    allow_unauthenticated: bool = False
    proxy_bind: str = "127.0.0.1:8000"
    proxy_workers: int = 2
    proxy_threads: int = 16
    list_kernels: bool = True
    job_store: str = ""
    job_retention: float = 3600.0
    max_running_jobs: int = 32
    kernel_env: str = ""
    websocket_protocol: str = "v1"

    def __post_init__(self) -> None:
        url = str(self.server_url).strip().rstrip("/")
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise SettingsError("JUPYTER_SERVER_URL has a port that is not a number") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(
                "JUPYTER_SERVER_URL must be an http:// or https:// URL with a host, "
                "e.g. http://127.0.0.1:8888"
            )
        if parts.username or parts.password or parts.query or parts.fragment:
            raise SettingsError(
                "JUPYTER_SERVER_URL must not carry credentials, a query or a fragment: "
                "pass the token with JUPYTER_TOKEN"
            )
        object.__setattr__(self, "server_url", url)
        level = LOG_LEVELS.get(str(self.log_level).upper())
        if level is None:
            raise SettingsError(
                "JUPYTER_LOG_LEVEL must be one of DEBUG, INFO, WARN, ERROR "
                f"(got {self.log_level!r})"
            )
        object.__setattr__(self, "log_level", level)
        for name in ("timeout_connect", "timeout_total", "execution_timeout",
                     "max_execution_timeout", "kernel_start_timeout", "job_retention"):
            _require(self, name, lambda v: v > 0, "a number greater than 0")
        _require(self, "crash_sleep_duration", lambda v: v >= 0, "a number of seconds, 0 or more")
        for name in ("max_request_bytes", "max_output_bytes"):
            _require(self, name, lambda v: v > 0, "a whole number of bytes greater than 0")
        _require(self, "max_code_bytes", lambda v: v > 0, "a whole number of bytes greater than 0")
        for name in ("max_idle_connections", "pool_size", "max_kernels", "max_queued_executions",
                     "max_running_jobs"):
            _require(self, name, lambda v: v >= 0, "a whole number, 0 or more")
        for name in ("proxy_workers", "proxy_threads"):
            _require(self, name, lambda v: v >= 1, "a whole number, 1 or more")
        host, _, port = str(self.proxy_bind).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError("JUPYTER_PROXY_BIND must be HOST:PORT, e.g. 127.0.0.1:8000 "
                                f"(got {self.proxy_bind!r})")
        if self.execution_timeout > self.max_execution_timeout:
            raise SettingsError(
                "JUPYTER_EXECUTION_TIMEOUT must not exceed JUPYTER_MAX_EXECUTION_TIMEOUT "
                f"({self.execution_timeout:g} > {self.max_execution_timeout:g})"
            )
        if self.websocket_protocol not in ("v1", "json"):
            raise SettingsError("JUPYTER_WEBSOCKET_PROTOCOL must be v1 or json "
                                f"(got {self.websocket_protocol!r})")
        if not str(self.kernel_name).strip():
            raise SettingsError("JUPYTER_KERNEL_NAME must not be empty")
        self.kernel_env_vars  # noqa: B018 - raises SettingsError for a malformed value
        if self.job_store:
            store = Path(self.job_store)
            if store.is_dir() or not store.parent.is_dir():
                raise SettingsError("JUPYTER_JOB_STORE must name a file in an existing directory "
                                    f"(got {self.job_store!r})")
        if self.proxy_api_key is not None and not self.api_keys:
            raise SettingsError("JUPYTER_PROXY_API_KEY is set but holds no key")
        if any(not key.isascii() or not key.isprintable() for key in self.api_keys):
            # An HTTP header carries bytes, read as latin-1: such a key could never match.
            raise SettingsError("JUPYTER_PROXY_API_KEY must be printable ASCII (letters, "
                                "digits, punctuation)")

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The accepted API keys: `JUPYTER_PROXY_API_KEY` may list several, comma-separated."""
        if not self.proxy_api_key:
            return ()
        return tuple(key.strip() for key in self.proxy_api_key.split(",") if key.strip())

    @property
    def kernel_env_vars(self) -> dict[str, str]:
        """`JUPYTER_KERNEL_ENV` (`KERNEL_A=1,KERNEL_B=2`) as a dict: variables sent with every
        kernel start, which Kernel Gateway and Enterprise Gateway hand to the kernel.
        """
        variables: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in self.kernel_env.split(","))):
            name, sep, value = item.partition("=")
            if not sep or not name.startswith("KERNEL_") or not name.isidentifier():
                raise SettingsError("JUPYTER_KERNEL_ENV must be KERNEL_NAME=value pairs "
                                    "separated by commas (values without commas); "
                                    f"{name.strip()[:40]!r} is not one")
            variables[name] = value
        return variables

    @property
    def extra_hosts(self) -> frozenset[str]:
        """Host names, besides loopback ones, that requests may address when there is no key."""
        return frozenset(h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip())

    def unsafe_bind(self, host: str) -> str | None:
        """Why listening on `host` is refused (a network address and no API key), or None."""
        if self.api_keys or self.allow_unauthenticated or is_loopback(host):
            return None
        return (f"refusing to listen on {host}, which other machines can reach, without an API "
                "key: anyone who reaches this proxy can run code on its kernels. Set "
                "JUPYTER_PROXY_API_KEY=<a long random secret> (clients then send "
                "'Authorization: Bearer <key>'), or pass --allow-unauthenticated "
                "(JUPYTER_ALLOW_UNAUTHENTICATED=1) if something else guards it")

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values that must never appear in a log line or an error body."""
        return tuple(s for s in (self.token, *self.api_keys) if s)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> Settings:
        """Settings from `JUPYTER_*` variables in `environ` (default: the process environment).

        Unknown `JUPYTER_*` names are ignored: Jupyter itself reads some (`JUPYTER_CONFIG_DIR`).
        `overrides` (field name -> value, None meaning "not given") win over the environment.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return cls(**values)


def is_loopback(host: str) -> bool:
    """True for a loopback name or address: localhost, 127.0.0.0/8, ::1 (brackets allowed)."""
    host = host.strip().strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def environment_with_dotenv(path: str | Path = ".env") -> dict[str, str]:
    """The process environment on top of the `.env` file at `path` (if there is one)."""
    merged = {k: v for k, v in dotenv_values(path).items() if v is not None} \
        if Path(path).is_file() else {}
    merged.update(os.environ)
    return merged


def _parse(f: dataclasses.Field, raw: str) -> Any:
    name = ENV_PREFIX + f.name.upper()
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    if kind == "bool":
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{name} must be true or false (got {raw!r})")
    try:
        if kind == "float":
            return float(raw)
        if kind == "int":
            return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a {'number' if kind == 'float' else 'whole number'}"
                            f" (got {raw!r})") from None
    if f.name == "proxy_api_key" and not raw.strip():
        return None
    return raw


def _require(settings: Settings, name: str, check: Any, what: str) -> None:
    value = getattr(settings, name)
    whole = isinstance(Settings.__dataclass_fields__[name].default, int)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or value in (float("inf"), float("-inf")) or not check(value) \
            or (whole and value != int(value)):
        raise SettingsError(f"{ENV_PREFIX}{name.upper()} must be {what} (got {value!r})")
    object.__setattr__(settings, name, int(value) if whole else float(value))


def waiting_limit(threads: int) -> int:
    """How many executions of a worker with `threads` threads may wait for busy kernels: all
    its threads but two, so that however many calls pile up on one kernel, one runs and a
    thread stays free for /health and the rest."""
    return max(threads - 2, 1)
