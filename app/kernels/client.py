"""`JupyterClient`: the Jupyter server's REST API (`/api/kernels`, `/api/kernelspecs`) and
kernel websockets, blocking, with a timeout on every call.

Thread safety: one client is shared by every thread of a worker. Its `requests.Session` pools
connections (urllib3's pool is thread-safe) and it keeps no per-call state; the kernel spec
cache is replaced whole under a lock. Websockets it opens belong to the caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from app.kernels.channel import KernelChannel
from app.kernels.errors import (
    KernelError,
    KernelNotFound,
    KernelSpecNotFound,
    TooManyKernels,
    UpstreamAuthError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.logs import StructuredLogger
from app.settings import Settings

KERNELSPEC_CACHE_SECONDS = 10.0

# Kernel Gateway and Enterprise Gateway answer 403 to refusals that have nothing to do with the
# token (which they refuse with 401): a kernel start past their own kernel limit (KG: "Resource
# Limit"; EG: "A max kernels limit has been set ..." and "A max kernels per user limit ..."),
# and any listing of kernels unless it is turned on.
KERNEL_LIMIT_WORDS = ("resource limit", "max kernels")
START_REQUEST = "POST /api/kernels"  # as errors name it in their `request` detail
LISTING_REFUSED = (
    "the Jupyter server refuses to list its kernels (HTTP 403) although it accepts the proxy's "
    "token: Kernel Gateway and Enterprise Gateway do unless listing is turned on "
    "(KG_LIST_KERNELS=True, EG_LIST_KERNELS=True); GET /kernels and JUPYTER_MAX_KERNELS need it"
)


class JupyterClient:
    """A blocking client of one Jupyter server (jupyter_server, Kernel or Enterprise Gateway)."""

    def __init__(self, settings: Settings, logger: StructuredLogger | None = None) -> None:
        self.settings = settings
        self.logger = logger or StructuredLogger(__name__)
        self.base_url = settings.server_url
        self.session = self._new_session()
        self._specs_lock = threading.Lock()
        self._specs: tuple[float, dict[str, Any]] | None = None

    def _new_session(self) -> requests.Session:
        session = requests.Session()
        # Connection errors happen before a request is sent, so retrying them is safe for every
        # method; nothing is retried once the server may have acted on a request (`False`
        # re-raises read errors as they are, so that a read timeout stays a timeout).
        retry = Retry(total=None, connect=2, read=False, status=0, other=False, redirect=0,
                      backoff_factor=0.25, raise_on_status=False)
        adapter = HTTPAdapter(max_retries=retry, pool_maxsize=32)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.trust_env = False  # never send our token through an environment proxy
        if self.settings.token:
            session.headers["Authorization"] = f"token {self.settings.token}"
        return session

    def reset_connections(self) -> None:
        """Forgets pooled connections without closing them: for a forked child, whose parent
        still uses them.
        """
        self.session = self._new_session()

    # -- REST ------------------------------------------------------------------------------

    def kernelspecs(self) -> dict[str, Any]:
        """`GET /api/kernelspecs`, cached for a few seconds: `{"default": ..., "kernelspecs"}`."""
        with self._specs_lock:
            cached = self._specs
        if cached and time.monotonic() - cached[0] < KERNELSPEC_CACHE_SECONDS:
            return cached[1]
        specs = self._request("GET", "/api/kernelspecs")
        if not isinstance(specs, dict) or not isinstance(specs.get("kernelspecs"), dict):
            raise UpstreamError("the Jupyter server sent an unusable kernel spec list")
        with self._specs_lock:
            self._specs = (time.monotonic(), specs)
        return specs

    def start_kernel(self, name: str, env: dict[str, str] | None = None,
                     kernel_id: str | None = None) -> dict[str, Any]:
        """`POST /api/kernels`: the new kernel's model (it may still be starting).

        `kernel_id` (a new UUID) asks for the new kernel's id: jupyter_server (2.21 checked) and
        Kernel Gateway 3 take it from the body, Enterprise Gateway 3 from `KERNEL_ID` in `env`
        (so it goes there too when an `env` is sent); other servers choose their own. The
        answer's id is the kernel's, whichever was taken.

        `env` is sent in the body when given: Kernel Gateway and Enterprise Gateway pass its
        `KERNEL_*` variables (and those their `env_whitelist` allows) to the kernel, which then
        inherits only PATH and their `env_process_whitelist` from the gateway's environment
        instead of all of it; Enterprise Gateway reads `KERNEL_USERNAME` and
        `KERNEL_LAUNCH_TIMEOUT` from it. jupyter_server ignores it.

        The name is checked against the server's kernel specs first: jupyter_server (and the
        gateways built on it) answer an unknown name with a bare 500. That read also shows that
        the server takes the token, so a 403 to the start is a refusal of another kind.
        """
        names = sorted(self.kernelspecs()["kernelspecs"])
        if name not in names:
            raise KernelSpecNotFound(f"no kernel spec named {name!r} on the Jupyter server",
                                     available=names)
        body: dict[str, Any] = {"name": name}
        if kernel_id:
            body["kernel_id"] = kernel_id
        if env:
            body["env"] = {**env, "KERNEL_ID": kernel_id} if kernel_id else dict(env)
        model = self._request("POST", "/api/kernels", json=body,
                              timeout=self.settings.kernel_start_timeout,
                              forbidden=_start_refused)
        if not isinstance(model, dict) or not isinstance(model.get("id"), str):
            raise UpstreamError("the Jupyter server answered a kernel start without a kernel id")
        return model

    def get_kernel(self, kernel_id: str, timeout: float | None = None,
                   connect_timeout: float | None = None) -> dict[str, Any]:
        """`GET /api/kernels/{id}`: the kernel's model (timeouts: see `_request`)."""
        model = self._request("GET", f"/api/kernels/{kernel_id}", kernel_id=kernel_id,
                              timeout=timeout, connect_timeout=connect_timeout)
        if not isinstance(model, dict):
            raise UpstreamError("the Jupyter server sent an unusable kernel model",
                                request="GET /api/kernels/{id}")
        return model

    def list_kernels(self) -> list[dict[str, Any]]:
        """`GET /api/kernels`: every kernel the server runs.

        jupyter_server can fail a listing while a kernel is being removed; a read is safe to
        repeat, so it is asked twice more before the failure counts. A gateway that does not
        list kernels answers 403, as jupyter_server answers a wrong token: a second read (of
        the kernel specs) tells the two apart.
        """
        for attempt in range(3):
            try:
                kernels = self._request("GET", "/api/kernels")
            except UpstreamAuthError as err:
                if err.details.get("upstream_status") == 403 and self._takes_token():
                    raise UpstreamError(LISTING_REFUSED, request="GET /api/kernels",
                                        upstream_status=403) from None
                raise
            except UpstreamError as err:
                if attempt == 2 or err.details.get("upstream_status", 0) < 500:
                    raise
                time.sleep(0.1)
                continue
            if isinstance(kernels, list):
                return kernels
            raise UpstreamError("the Jupyter server sent an unusable kernel list")
        raise AssertionError("unreachable")

    def shutdown_kernel(self, kernel_id: str) -> None:
        """`DELETE /api/kernels/{id}`: stops the kernel and forgets it."""
        self._request("DELETE", f"/api/kernels/{kernel_id}", kernel_id=kernel_id)

    def interrupt_kernel(self, kernel_id: str, timeout: float | None = None,
                         connect_timeout: float | None = None) -> None:
        """`POST /api/kernels/{id}/interrupt`: the kernel stops what it runs, keeps its state."""
        self._request("POST", f"/api/kernels/{kernel_id}/interrupt", kernel_id=kernel_id,
                      timeout=timeout, connect_timeout=connect_timeout)

    def restart_kernel(self, kernel_id: str, connect_timeout: float | None = None) -> None:
        """`POST /api/kernels/{id}/restart`: a fresh process under the same id, state lost."""
        self._request("POST", f"/api/kernels/{kernel_id}/restart", kernel_id=kernel_id,
                      timeout=self.settings.kernel_start_timeout,
                      connect_timeout=connect_timeout)

    def _takes_token(self) -> bool:
        """True if the server answers an authenticated read (its kernel specs) with our token."""
        try:
            self._request("GET", "/api/kernelspecs")
        except KernelError:
            return False
        return True

    def _request(self, method: str, path: str, *, json: Any = None, timeout: float | None = None,
                 kernel_id: str | None = None, connect_timeout: float | None = None,
                 forbidden: Callable[[requests.Response, str], KernelError] | None = None) -> Any:
        """One REST call; foreign errors become `KernelError`s without upstream text.

        `timeout` bounds the wait for the answer (default `JUPYTER_TIMEOUT_TOTAL`),
        `connect_timeout` each of the (up to three) connection attempts (default
        `JUPYTER_TIMEOUT_CONNECT`). `forbidden` makes the error for a 403 when the caller knows
        the token is accepted.
        """
        timeouts = (min(connect_timeout or self.settings.timeout_connect,
                        self.settings.timeout_connect), timeout or self.settings.timeout_total)
        what = f"{method} {path}"
        try:
            response = self.session.request(method, self.base_url + path, json=json,
                                            timeout=timeouts, allow_redirects=False)
        except requests.ConnectTimeout:
            raise UpstreamUnavailable("cannot connect to the Jupyter server (connect timeout)",
                                      request=what) from None
        except requests.Timeout:
            raise UpstreamTimeout(f"the Jupyter server did not answer {what} within "
                                  f"{timeouts[1]:g} s", request=what) from None
        except requests.RequestException:
            raise UpstreamUnavailable("cannot reach the Jupyter server", request=what) from None
        status = response.status_code
        if status == 404 and kernel_id is not None:
            raise KernelNotFound(kernel_id)
        if status == 403 and forbidden is not None:
            self.logger.warning("upstream refusal", request=what, upstream_status=status)
            raise forbidden(response, what)
        if status in (401, 403):
            raise UpstreamAuthError("the Jupyter server refused the proxy's token; check "
                                    "JUPYTER_TOKEN", request=what, upstream_status=status)
        if status >= 400 or 300 <= status < 400:
            self.logger.warning("upstream error", request=what, upstream_status=status)
            raise UpstreamError(f"the Jupyter server answered {what} with HTTP {status}",
                                request=what, upstream_status=status)
        if status == 204 or not response.content:
            return None
        try:
            return response.json()
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            raise UpstreamError(f"the Jupyter server answered {what} with something that is "
                                "not JSON", request=what) from None

    # -- websocket -------------------------------------------------------------------------

    def open_channel(self, kernel_id: str, timeout: float | None = None,
                     session_id: str | None = None) -> KernelChannel:
        """Opens a websocket to the kernel's channels; the caller owns (and closes) it."""
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        url = urlunsplit((scheme, parts.netloc, f"{parts.path}/api/kernels/{kernel_id}/channels",
                          "", ""))
        headers = [f"Authorization: token {self.settings.token}"] if self.settings.token else []
        return KernelChannel.open(url, kernel_id, headers,
                                  timeout or self.settings.timeout_connect, session_id,
                                  offer_v1=self.settings.websocket_protocol == "v1")

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Closes pooled connections; safe to call twice."""
        self.session.close()

    def __enter__(self) -> JupyterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start_refused(response: requests.Response, what: str) -> KernelError:
    """The error for a 403 to `POST /api/kernels` sent with a token the server takes.

    The upstream text is only looked at, never passed on.
    """
    try:
        body = response.json()
        said = " ".join(str(body.get(key) or "") for key in ("message", "reason")).lower()
    except (ValueError, AttributeError):
        said = ""
    if any(words in said for words in KERNEL_LIMIT_WORDS):
        return TooManyKernels(
            "the Jupyter server refuses to start another kernel: its own kernel limit is reached "
            "(Kernel Gateway's KG_MAX_KERNELS, Enterprise Gateway's EG_MAX_KERNELS or "
            "EG_MAX_KERNELS_PER_USER); shut one down first", upstream_status=403)
    return UpstreamError(
        "the Jupyter server refused to start a kernel (HTTP 403) although it accepts the "
        "proxy's token; Enterprise Gateway does so when KERNEL_USERNAME (JUPYTER_KERNEL_ENV, or "
        "the gateway's own user) is not allowed to start kernels (EG_AUTHORIZED_USERS, "
        "EG_UNAUTHORIZED_USERS, which holds root by default)", request=what, upstream_status=403)
