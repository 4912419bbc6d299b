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
import threading
import time
from pathlib import Path
from typing import TypeVar

import requests

from app.logs import StructuredLogger, redact

_Server = TypeVar("_Server", bound="ServerProcess")

STABLE_SECONDS = 30.0  # a server that ran this long before it died is started again at once
MAX_RESTART_PAUSE = 30.0
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


class ServerProcess:
    """A Jupyter server child process on 127.0.0.1, configured by a private file (removed once
    read), logging to a private file, and stopped with its kernels; a context manager or
    start/stop. Subclasses say which server, how it is configured and when it is ready.
    """

    name = "Jupyter server"
    command = ("jupyter_server",)  # run as `python -m ...`
    requires = ("jupyter_server",)  # modules that must import
    install_hint = ""
    ready_path = "/api/status"  # answers 200 with our token once the server is ready
    error: type[RuntimeError] = EmbeddedServerError

    def __init__(self, startup_timeout: float = 60.0, logger: StructuredLogger | None = None,
                 *, port: int = 0, token: str | None = None, limit_rate: bool = False) -> None:
        """`port` 0 picks a free one; `limit_rate` keeps the server's iopub rate limit."""
        self.startup_timeout = startup_timeout
        self.logger = logger or StructuredLogger(__name__)
        self.token = token or secrets.token_urlsafe(32)
        self.requested_port = port
        self.limit_rate = limit_rate
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None
        self._stopping = threading.Event()
        self._lifecycle = threading.Lock()  # a restart and stop() never overlap
        self._watcher: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where the server writes its own log (private: it may contain the token)."""
        return Path(self._workdir or ".") / "server.log"

    def config(self) -> str:
        """The server's config file (it holds the token)."""
        raise NotImplementedError

    def python(self) -> str:
        """The Python interpreter that runs the server (and, through it, its kernels)."""
        return sys.executable

    def environment(self) -> dict[str, str]:
        """The server's environment: ours, without our secrets (its kernels inherit it)."""
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_VARIABLES}
        env["JUPYTER_RUNTIME_DIR"] = self.workdir  # connection files go away with us
        return env

    @property
    def workdir(self) -> str:
        """The private directory of this run (config, log, runtime files); gone after stop."""
        assert self._workdir is not None, "the server is not started"
        return self._workdir

    def kernels_dir(self) -> str:
        """Where kernels start: not in the proxy's directory, whose .env may hold the key."""
        return tempfile.mkdtemp(prefix="kernels-", dir=self.workdir)

    def start(self: _Server) -> _Server:
        """Starts the server and returns once it answers its REST API with our token."""
        for module in self.requires:
            try:
                __import__(module)
            except ImportError:
                raise self.error(f"the {self.name} needs {module}: {self.install_hint}") from None
        self._workdir = tempfile.mkdtemp(prefix="jupyter-kernel-proxy-")
        cwd = self.kernels_dir()
        self.port = self.requested_port or free_port()
        config = Path(self.workdir) / "server_config.py"
        config.write_text(self.config())
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [self.python(), "-m", *self.command, f"--config={config}"],
                env=self.environment(), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                stderr=log,
                start_new_session=True,  # our Ctrl-C is ours to handle: stop() stops it in order
                preexec_fn=_die_with_parent,
            )
        self.logger.info(f"{self.name} starting", server_pid=self.process.pid, url=self.url)
        try:
            self._wait_until_serving()
        except BaseException:
            self._stop(20.0)
            raise
        config.unlink()  # read at start-up; the token needs no copy on disk from now on
        self.logger.info(f"{self.name} ready", server_pid=self.process.pid, url=self.url)
        return self

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        headers = {"Authorization": f"token {self.token}"}
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise self.error(f"the {self.name} exited at start-up:\n" + self._log_tail())
            try:
                if requests.get(self.url + self.ready_path, headers=headers, timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise self.error(f"the {self.name} did not answer within {self.startup_timeout:g} s:"
                         "\n" + self._log_tail())

    def supervise(self, interval: float = 1.0) -> None:
        """Restarts the server, on the same port with the same token, whenever it exits on its
        own (killed, crashed), until stop(). Its kernels are gone with it; the proxy answers
        503 `upstream_unavailable` meanwhile.

        The watching thread starts the new server, which (PR_SET_PDEATHSIG) dies with that
        thread: it lives until stop().
        """
        self._stopping.clear()
        self._watcher = threading.Thread(target=self._watch, args=(interval,), daemon=True,
                                         name="embedded-server-watcher")
        self._watcher.start()

    def _watch(self, interval: float) -> None:
        pause = interval
        started = time.monotonic()
        while not self._stopping.wait(pause):
            with self._lifecycle:
                if self._stopping.is_set():
                    return
                process = self.process  # None: the last start failed
                if process is not None and process.poll() is None:
                    continue
                if process is not None:
                    self.logger.error(f"{self.name} exited on its own; starting it again",
                                      server_pid=process.pid, log_tail=self._log_tail(5))
                    # One that dies soon after it started waits longer each time.
                    pause = interval if time.monotonic() - started > STABLE_SECONDS \
                        else min(pause * 2, MAX_RESTART_PAUSE)
                try:
                    self._start_again()
                    started = time.monotonic()
                except Exception as err:  # noqa: BLE001 - the watcher must outlive a failed start
                    pause = min(pause * 2, MAX_RESTART_PAUSE)
                    self.logger.error(f"{self.name} could not be started again; trying again "
                                      f"in {pause:g} s", reason=str(err))

    def _start_again(self) -> None:
        self.process = None
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self.requested_port = self.port  # the proxy's workers know this URL
        self.start()

    def stop(self, timeout: float = 20.0) -> None:
        """Stops the server, which shuts its kernels down on SIGTERM. Safe to call twice."""
        self._stopping.set()
        with self._lifecycle:
            self._stop(timeout)

    def _stop(self, timeout: float) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.logger.warning(f"{self.name} did not stop; killing it",
                          server_pid=process.pid)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            self.logger.info(f"{self.name} stopped", server_pid=process.pid)
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return redact("\n".join(text.splitlines()[-lines:])).replace(self.token, "[redacted]")

    def __enter__(self: _Server) -> _Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedJupyterServer(ServerProcess):
    """`jupyter_server` with ipykernel, for `--embedded` and the tests."""

    name = "embedded jupyter server"
    requires = ("jupyter_server", "ipykernel")
    install_hint = "pip install 'jupyter-kernel-proxy[embedded]'"

    def __init__(self, startup_timeout: float = 60.0, root_dir: str | None = None,
                 logger: StructuredLogger | None = None, *, port: int = 0,
                 token: str | None = None, limit_rate: bool = False) -> None:
        """`root_dir`: where kernels start (default: a private temporary directory)."""
        super().__init__(startup_timeout, logger, port=port, token=token,
                         limit_rate=limit_rate)
        self.root_dir = root_dir

    def config(self) -> str:
        return CONFIG_TEMPLATE.format(port=self.port, token=self.token,
                                      limit_rate=self.limit_rate)

    def kernels_dir(self) -> str:
        return self.root_dir or super().kernels_dir()


def prctl(option: int, value: int) -> None:
    """Linux's prctl(2); does nothing elsewhere (the callers' protections then don't apply)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(option, value)
    except (OSError, AttributeError):
        pass


def keep_environment_private() -> None:
    """On Linux, makes this process (and the workers it forks) non-dumpable, so that code of
    the same user, such as a kernel, cannot read the API key or the token from
    /proc/<pid>/environ. Every entry point calls it: the command, `gunicorn.conf.py`, `wsgi.py`.
    """
    prctl(PR_SET_DUMPABLE, 0)


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
