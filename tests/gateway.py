"""A real Jupyter Kernel Gateway (`jupyter-kernel-gateway`, its default `jupyter-websocket`
API) as a child process: a free loopback port, a random token, private directories, stopped
with its kernels; the second upstream the integration tests run against.

It offers what the tests use of `EmbeddedJupyterServer`: `url`, `token`, `start()`, `stop()`,
the context manager protocol and the constructor's `port`, `token` and `limit_rate`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from app.embedded import PRIVATE_VARIABLES, _die_with_parent, free_port
from app.logs import redact

# The token travels in a config file read at start-up (then removed), never on a command line
# (visible to every user) nor in `KG_AUTH_TOKEN`: KG removes that from the environment it gives
# kernels, but they run as the same user and could read the gateway's /proc/<pid>/environ.
CONFIG_TEMPLATE = """\
c = get_config()  # noqa: F821
c.KernelGatewayApp.ip = "127.0.0.1"
c.KernelGatewayApp.port = {port}
c.KernelGatewayApp.port_retries = 0
c.KernelGatewayApp.auth_token = {token!r}
# KG refuses GET /api/kernels (403) unless told otherwise; JUPYTER_MAX_KERNELS counts kernels
# with it, and tests list kernels.
c.JupyterWebsocketPersonality.list_kernels = {list_kernels}
c.KernelGatewayApp.max_kernels = {max_kernels}
# As for the embedded jupyter_server: ordinary output must reach the proxy whole (KG relays
# kernels through jupyter_server's own websocket connection class, rate limit included).
c.ZMQChannelsWebsocketConnection.limit_rate = {limit_rate}
"""


class GatewayError(RuntimeError):
    """The Kernel Gateway could not be started."""


class KernelGatewayServer:
    """A `jupyter-kernel-gateway` child process on 127.0.0.1."""

    kind = "kernel_gateway"

    def __init__(self, startup_timeout: float = 60.0, *, port: int = 0,
                 token: str | None = None, limit_rate: bool = False, list_kernels: bool = True,
                 max_kernels: int | None = None) -> None:
        """`port` 0 picks a free one; `limit_rate` keeps the server's iopub rate limit;
        `list_kernels` and `max_kernels` are KG's own settings (its defaults: False, None).
        """
        self.startup_timeout = startup_timeout
        self.token = token or secrets.token_urlsafe(32)
        self.requested_port = port
        self.limit_rate = limit_rate
        self.list_kernels = list_kernels
        self.max_kernels = max_kernels
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None

    @property
    def url(self) -> str:
        """The gateway's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where the gateway writes its own log."""
        return Path(self._workdir or ".") / "kernel_gateway.log"

    def start(self) -> KernelGatewayServer:
        """Starts the gateway and returns once it answers its REST API with our token."""
        try:
            import kernel_gateway  # noqa: F401
        except ImportError:
            raise GatewayError("the tests need jupyter-kernel-gateway: "
                               "pip install -e '.[test]'") from None
        self._workdir = tempfile.mkdtemp(prefix="kernel-gateway-")
        kernels_dir = tempfile.mkdtemp(prefix="kernels-", dir=self._workdir)
        self.port = self.requested_port or free_port()
        config = Path(self._workdir) / "kernel_gateway_config.py"
        config.write_text(CONFIG_TEMPLATE.format(
            port=self.port, token=self.token, limit_rate=self.limit_rate,
            list_kernels=self.list_kernels, max_kernels=self.max_kernels))
        env = {k: v for k, v in os.environ.items()
               if k not in PRIVATE_VARIABLES and not k.startswith("KG_")}
        env["JUPYTER_RUNTIME_DIR"] = self._workdir  # connection files go away with us
        env["JUPYTER_CONFIG_DIR"] = self._workdir  # no user configuration
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kernel_gateway", f"--config={config}"],
                env=env, cwd=kernels_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        try:
            self._wait_until_serving()
        except BaseException:
            self.stop()
            raise
        config.unlink()
        return self

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        headers = {"Authorization": f"token {self.token}"}
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise GatewayError("the Kernel Gateway exited at start-up:\n" + self._log_tail())
            try:
                # KG has no /api/status; the kernel specs need the token.
                if requests.get(f"{self.url}/api/kernelspecs", headers=headers, timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise GatewayError(f"the Kernel Gateway did not answer within "
                           f"{self.startup_timeout:g} s:\n" + self._log_tail())

    def stop(self, timeout: float = 20.0) -> None:
        """Stops the gateway, which shuts its kernels down on SIGTERM. Safe to call twice."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return redact("\n".join(text.splitlines()[-lines:])).replace(self.token, "[redacted]")

    def __enter__(self) -> KernelGatewayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
