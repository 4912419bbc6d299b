"""Checks every request passes before a view runs: the Host of a keyless proxy (403), the API
key (401) and the content type (415).
"""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, current_app, request

from app.errors import ApiError
from app.settings import is_loopback

PUBLIC_PATHS = frozenset({"/health"})  # CONTRACT.md: every other endpoint needs the key


def register_guards(app: Flask) -> None:
    """Installs the checks as `before_request` hooks."""
    app.before_request(require_known_host)
    app.before_request(require_api_key)
    app.before_request(require_json_body)


def require_known_host() -> None:
    """Without an API key, serve only what a local client sent, directly.

    - The `Host` must be a loopback name (or a configured host): a web page cannot reach a
      local proxy by pointing its own name at 127.0.0.1 (DNS rebinding), since the browser then
      sends that name as the Host.
    - A request relayed by a reverse proxy (`Forwarded`, `X-Forwarded-For`, `X-Real-IP`) comes
      from the network, where a Host header proves nothing: that needs a key.
    - A browser request from another site (`Origin`, `Sec-Fetch-Site: cross-site`) is refused,
      so that no web page can start kernels on a local proxy.
    """
    settings = current_app.config["SETTINGS"]
    if settings.api_keys:
        return
    host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
    if not _known(host, settings):
        raise ApiError(403, "host_not_allowed",
                       "this proxy has no API key, so it only answers requests addressed to "
                       "localhost or a loopback address; set JUPYTER_PROXY_API_KEY, or list "
                       "this host name in JUPYTER_ALLOWED_HOSTS")
    # (Before the reverse-proxy rule, which JUPYTER_ALLOW_UNAUTHENTICATED lifts: a browser
    # sends the credentials a reverse proxy checks along with another site's request.)
    origin = urlsplit(request.headers.get("Origin", "")).hostname
    if request.headers.get("Sec-Fetch-Site") == "cross-site" or (
            "Origin" in request.headers and not (origin and _known(origin, settings))):
        raise ApiError(403, "cross_site_request",
                       "requests from web pages of other sites are refused; set "
                       "JUPYTER_PROXY_API_KEY to call this proxy from a browser")
    if settings.allow_unauthenticated:
        return
    if any(h in request.headers for h in ("Forwarded", "X-Forwarded-For", "X-Real-IP")):
        raise ApiError(403, "api_key_required",
                       "this request came through a reverse proxy, but this proxy has no API "
                       "key: set JUPYTER_PROXY_API_KEY (or JUPYTER_ALLOW_UNAUTHENTICATED=1 if "
                       "the reverse proxy authenticates clients)")


def _known(host: str, settings: Any) -> bool:
    return is_loopback(host) or host.lower() in settings.extra_hosts


def require_api_key() -> None:
    """With `JUPYTER_PROXY_API_KEY` set, every endpoint but `PUBLIC_PATHS` needs the bearer key."""
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
    has_body = bool(request.content_length) or bool(request.headers.get("Transfer-Encoding"))
    if has_body and request.mimetype != "application/json":
        raise ApiError(415, "unsupported_media_type",
                       "send the body as JSON with 'Content-Type: application/json'")
