"""Checks every request passes before a view runs: the Host of a keyless proxy (403), the API
key (401) and the content type (415).
"""

from __future__ import annotations

import hmac

from flask import Flask, current_app, request

from app.errors import ApiError
from app.settings import is_loopback

PUBLIC_PATHS = frozenset({"/health"})


def register_guards(app: Flask) -> None:
    """Installs the checks as `before_request` hooks."""
    app.before_request(require_known_host)
    app.before_request(require_api_key)
    app.before_request(require_json_body)


def require_known_host() -> None:
    """Without an API key, only requests addressed to a loopback name (or a configured host)
    are served: a web page cannot reach a local proxy by pointing its own name at 127.0.0.1
    (DNS rebinding), since the browser then sends that name as the Host.
    """
    settings = current_app.config["SETTINGS"]
    if settings.api_keys:
        return
    host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
    if is_loopback(host) or host.lower() in settings.extra_hosts:
        return
    raise ApiError(403, "host_not_allowed",
                   "this proxy has no API key, so it only answers requests addressed to "
                   "localhost or a loopback address; set JUPYTER_PROXY_API_KEY, or list this "
                   "host name in JUPYTER_ALLOWED_HOSTS")


def require_api_key() -> None:
    """With `JUPYTER_PROXY_API_KEY` set, every endpoint but `/health` needs the bearer key."""
    keys = current_app.config["SETTINGS"].api_keys
    if not keys or request.path in PUBLIC_PATHS:
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    given_bytes = given.strip().encode()
    # Compare with every key, in constant time, whatever matches: no early exit to time.
    matches = [hmac.compare_digest(given_bytes, key.encode()) for key in keys]
    if scheme.lower() != "bearer" or not any(matches):
        raise ApiError(401, "unauthorized",
                       "this proxy requires an API key: send 'Authorization: Bearer <key>'")


def require_json_body() -> None:
    """A POST that carries a body must say `Content-Type: application/json`."""
    if request.method != "POST":
        return
    has_body = bool(request.content_length) or \
        request.headers.get("Transfer-Encoding", "").lower() == "chunked"
    if has_body and request.mimetype != "application/json":
        raise ApiError(415, "unsupported_media_type",
                       "send the body as JSON with 'Content-Type: application/json'")
