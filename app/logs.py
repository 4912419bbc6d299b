"""Structured logging: one JSON object per line, timezone-aware timestamps, never a secret.

`configure_logging()` is called once by an entry point (CLI, `wsgi.py`); library code logs
through `logging.getLogger(__name__)` or a `StructuredLogger`, passing context as keywords.
`GunicornLogger` puts gunicorn's own lines in the same shape.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, quote_plus

from gunicorn.glogging import Logger as _GunicornBaseLogger

from app.settings import LOG_LEVELS

REDACTED = "[redacted]"
# The id of the request being served by this thread, added to every log line it writes.
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
_secrets: tuple[str, ...] = ()
_PERCENT_HEX = re.compile(r"%[0-9A-F]{2}")  # a URL-encoded byte, as `quote` writes it


class JsonFormatter(logging.Formatter):
    """Renders a record as one JSON line; context comes from `extra={"context": {...}}`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, tz=timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        current_request = request_id.get()
        if current_request is not None:
            entry["request_id"] = current_request
        context = getattr(record, "context", None)
        if isinstance(context, dict):
            entry.update({k: v for k, v in context.items() if k not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str, ensure_ascii=False))


def redact(text: str) -> str:
    """`text` with every registered secret replaced: the last line of defence for logs."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def register_secrets(secrets: Iterable[str]) -> None:
    """Adds values (tokens, API keys) that must never be written to a log, in every form they
    can take in a JSON line (see `_forms`).
    """
    global _secrets
    forms = {form for secret in secrets if secret for form in _forms(secret)}
    # Longest first, so a secret that contains another is redacted whole.
    _secrets = tuple(sorted({*_secrets, *forms}, key=len, reverse=True))


def _forms(secret: str) -> set[str]:
    """`secret` as it is or as its repr() shows it, each JSON-escaped or not (a quote or a
    backslash in it), and URL-encoded (in a logged URL: any `quote` flavour, upper- or
    lower-case hex). Plain `in` checks on these keep redaction cheap on every log line.
    """
    forms = set()
    for shown in (secret, repr(secret)[1:-1]):
        forms |= {shown, json.dumps(shown, ensure_ascii=False)[1:-1], json.dumps(shown)[1:-1]}
    for encoded in (quote(secret, safe=""), quote(secret), quote_plus(secret)):
        forms |= {encoded, _PERCENT_HEX.sub(lambda m: m.group().lower(), encoded)}
    return forms



def configure_logging(level: str = "INFO", secrets: Iterable[str] = (),
                      stream: Any = None) -> None:
    """Sends every log record to `stream` (stderr) as JSON lines, from `level` up."""
    register_secrets(secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LOG_LEVELS.get(level.upper(), level.upper()))
    # Chatty libraries stay quiet unless we debug; their lines never carry our token.
    for noisy in ("urllib3", "websocket", "werkzeug"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))


class StructuredLogger:
    """A logger that takes context as keywords: `log.info("kernel started", kernel_id=k)`.

    If nothing has configured logging when it first logs, it sends JSON lines to stderr
    itself, so a script using the Python API gets structured logs without further set-up;
    `configure_logging()` replaces that fallback.
    """

    def __init__(self, name: str = "app", level: str | None = None) -> None:
        self.logger = logging.getLogger(name)
        if level:
            self.logger.setLevel(LOG_LEVELS.get(level.upper(), level.upper()))

    def child(self, name: str) -> StructuredLogger:
        """A logger for a sub-component, sharing this one's handlers."""
        return StructuredLogger(f"{self.logger.name}.{name}")

    def log(self, level: int, message: str, exc_info: Any = None, **context: Any) -> None:
        """Logs `message` at `level` with `context` as extra JSON fields."""
        if not self.logger.hasHandlers():
            _install_fallback_handler()
        self.logger.log(level, message, exc_info=exc_info, extra={"context": context})

    def debug(self, message: str, **context: Any) -> None:
        """Logs at DEBUG."""
        self.log(logging.DEBUG, message, **context)

    def info(self, message: str, **context: Any) -> None:
        """Logs at INFO."""
        self.log(logging.INFO, message, **context)

    def warning(self, message: str, **context: Any) -> None:
        """Logs at WARNING."""
        self.log(logging.WARNING, message, **context)

    def error(self, message: str, **context: Any) -> None:
        """Logs at ERROR."""
        self.log(logging.ERROR, message, **context)

    def exception(self, message: str, **context: Any) -> None:
        """Logs at ERROR with the current exception's traceback."""
        self.log(logging.ERROR, message, exc_info=True, **context)


def _install_fallback_handler() -> None:
    """What `logging.basicConfig(level=INFO)` would do, in JSON."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


class GunicornLogger(_GunicornBaseLogger):
    """gunicorn's error and access logs as JSON lines, like the rest of the proxy's."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(JsonFormatter())

    def access(self, resp: Any, req: Any, environ: dict, request_time: Any) -> None:
        if not (self.cfg.accesslog or self.cfg.logconfig or self.cfg.logconfig_dict
                or self.cfg.syslog):
            return
        context = {
            "method": environ.get("REQUEST_METHOD"),
            "path": environ.get("PATH_INFO"),
            "status": getattr(resp, "status_code", None) or str(resp.status).split(None, 1)[0],
            "duration_ms": round(request_time.total_seconds() * 1000, 3),
            "remote_addr": environ.get("REMOTE_ADDR"),
            "user_agent": environ.get("HTTP_USER_AGENT"),
            "request_id": dict(getattr(resp, "headers", []) or []).get("X-Request-ID"),
        }
        self.access_log.info("access", extra={"context": context})
