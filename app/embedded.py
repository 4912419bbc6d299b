"""An embedded Jupyter server for `--embedded`: started on loopback with a random port and
token, supervised, and stopped with every kernel it started.

The token travels in a private config file, never on a command line or in the server's
environment (which its kernels inherit). The server's own log, which prints its URL with the
token, goes to a private file instead of our output.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from app.logs import StructuredLogger, redact

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PR_SET_DUMPABLE = 4

# Variables of ours that a kernel must never be able to read from its environment.
PRIVATE_VARIABLES = ("JUPYTER_TOKEN", "JUPYTER_PROXY_API_KEY", "PROMETHEUS_MULTIPROC_DIR")

CONFIG_TEMPLATE = """\
c = get_config()  # noqa: F821
c.ServerApp.ip = "127.0.0.1"
c.ServerApp.port = {port}
c.ServerApp.port_retries = 0
c.ServerApp.open_browser = False
c.ServerApp.allow_root = True  # containers often run as root; the server is loopback-only
c.ServerApp.terminals_enabled = False  # the proxy needs kernels, not shells
c.IdentityProvider.token = {token!r}
# Ordinary output must reach the proxy whole; the proxy caps output itself.
c.ZMQChannelsWebsocketConnection.limit_rate = {limit_rate}
"""


class EmbeddedServerError(RuntimeError):
    """The embedded Jupyter server could not be started."""


class EmbeddedJupyterServer:
    """A `jupyter_server` child process on 127.0.0.1; use as a context manager or start/stop."""

    def __init__(self, startup_timeout: float = 60.0, root_dir: str | None = None,
                 logger: StructuredLogger | None = None, *, port: int = 0,
                 token: str | None = None, limit_rate: bool = False) -> None:
        """`port` 0 picks a free one; `limit_rate` keeps jupyter_server's iopub rate limit."""
        self.startup_timeout = startup_timeout
        self.root_dir = root_dir
        self.logger = logger or StructuredLogger(__name__)
        self.token = token or secrets.token_urlsafe(32)
        self.requested_port = port
        self.limit_rate = limit_rate
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where the server writes its own log (private: it contains the token)."""
        return Path(self._workdir or ".") / "jupyter_server.log"

    def start(self) -> EmbeddedJupyterServer:
        """Starts the server and returns once it answers its REST API."""
        try:
            import jupyter_server  # noqa: F401
            import ipykernel  # noqa: F401
        except ImportError:
            raise EmbeddedServerError(
                "--embedded needs jupyter_server and ipykernel: "
                "pip install 'jupyter-kernel-proxy[embedded]'"
            ) from None
        self._workdir = tempfile.mkdtemp(prefix="jupyter-kernel-proxy-")
        # Kernels start here unless told otherwise: not in the proxy's directory, whose .env
        # may hold the API key.
        root_dir = self.root_dir or tempfile.mkdtemp(prefix="kernels-", dir=self._workdir)
        self.port = self.requested_port or free_port()
        config = Path(self._workdir) / "jupyter_server_config.py"
        config.write_text(CONFIG_TEMPLATE.format(port=self.port, token=self.token,
                                                 limit_rate=self.limit_rate))
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_VARIABLES}
        env["JUPYTER_RUNTIME_DIR"] = self._workdir  # connection files go away with us
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "jupyter_server", f"--config={config}"],
                env=env, cwd=root_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,  # our Ctrl-C is ours to handle: stop() stops it in order
                preexec_fn=_die_with_parent,
            )
        self.logger.info("embedded jupyter server starting", server_pid=self.process.pid,
                         url=self.url)
        try:
            self._wait_until_serving()
        except BaseException:
            self.stop()
            raise
        config.unlink()  # read at start-up; the token needs no copy on disk from now on
        self.logger.info("embedded jupyter server ready", server_pid=self.process.pid,
                         url=self.url)
        return self

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        headers = {"Authorization": f"token {self.token}"}
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise EmbeddedServerError(
                    "the embedded Jupyter server exited at start-up:\n" + self._log_tail())
            try:
                if requests.get(f"{self.url}/api/status", headers=headers, timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise EmbeddedServerError(f"the embedded Jupyter server did not answer within "
                                  f"{self.startup_timeout:g} s:\n" + self._log_tail())

    def stop(self, timeout: float = 20.0) -> None:
        """Stops the server; it shuts its kernels down first. Safe to call twice."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            # jupyter_server shuts every kernel down on SIGTERM before it exits.
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.logger.warning("embedded jupyter server did not stop; killing it",
                                    server_pid=process.pid)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            self.logger.info("embedded jupyter server stopped", server_pid=process.pid)
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return redact("\n".join(text.splitlines()[-lines:])).replace(self.token, "[redacted]")

    def __enter__(self) -> EmbeddedJupyterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def prctl(option: int, value: int) -> None:
    """Linux's prctl(2); does nothing elsewhere (the callers' protections then don't apply)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(option, value)
    except (OSError, AttributeError):
        pass


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the proxy dies, even by SIGKILL,
    so that the server (and, through ipykernel's parent polling, its kernels) never outlives it.
    Elsewhere stop() still stops the server on every orderly exit.
    """
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
