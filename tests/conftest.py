"""Fixtures: a real Jupyter server, the kernel layer and the app on top of it, the real
`jupyter-kernel-proxy` process, and small fake upstreams for faults a real server won't show.
"""

from __future__ import annotations

import contextlib

import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from app import JupyterClient, KernelManager, Settings, create_app
from app.embedded import EmbeddedJupyterServer, ServerProcess, free_port
from app.logs import configure_logging
from app.kernels import KernelNotFound
from tests.gateway import EnterpriseGatewayServer, KernelGatewayServer

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config) -> None:
    """What the tests and the processes they start write to temporary files (proxy logs, the
    lock directories of servers on random ports, embedded servers' files, pytest's tmp_path)
    goes to one directory of this run, removed at the end of a run that passed (a failed run's
    stays, for its logs). (A hook, not module code: test modules import this one again.)"""
    config.test_tmpdir = tempfile.mkdtemp(prefix="jupyter-kernel-proxy-tests-")
    os.environ["TMPDIR"] = config.test_tmpdir
    tempfile.tempdir = None  # asked anew: TMPDIR
    _keep_ipython_history_apart(Path(config.test_tmpdir) / "ipython")


def _keep_ipython_history_apart(directory: Path) -> None:
    """The test kernels get an IPython directory of this run, in which they keep no history.
    Every server the tests start passes it on (the gateways also to a kernel whose start
    request carries an `env`: see tests/gateway.py).

    By default all of a user's kernels write to one history database. A kernel a test freezes
    (SIGSTOP) while it writes there keeps the database locked; the next kernel then takes the
    file for corrupt and moves it away, and the other live kernels print "The history saving
    thread hit an unexpected error" into the output of a later cell, which tests compare
    exactly (kernels of other runs on the same machine would see it too)."""
    profile = directory / "profile_default"
    profile.mkdir(parents=True)
    (profile / "ipython_kernel_config.py").write_text("c.HistoryManager.enabled = False\n")
    os.environ["IPYTHONDIR"] = str(directory)


def pytest_sessionfinish(session, exitstatus) -> None:
    if exitstatus == 0:
        shutil.rmtree(session.config.test_tmpdir, ignore_errors=True)


UPSTREAMS = {"jupyter_server": EmbeddedJupyterServer, "kernel_gateway": KernelGatewayServer,
             "enterprise_gateway": EnterpriseGatewayServer}


@pytest.fixture(scope="session", params=list(UPSTREAMS))
def jupyter_server(request) -> Iterator[ServerProcess]:
    """A real upstream on a free loopback port with a random token, once per kind: a
    jupyter_server, a Jupyter Kernel Gateway and a Jupyter Enterprise Gateway
    (`tests/gateway.py`), all with ipykernel. Every test that uses it runs against each
    (`-k kernel_gateway` picks one); pytest groups the tests by upstream, so each starts once.
    All offer `url`, `token` and `kind`.
    """
    server = UPSTREAMS[request.param](startup_timeout=120)
    server.kind = request.param
    with server:
        yield server


@pytest.fixture
def upstream_class(jupyter_server) -> type:
    """The class of `jupyter_server`, for a test that starts and stops servers of its own of
    the same kind: `upstream_class(port=..., token=..., limit_rate=...)`.
    """
    return type(jupyter_server)


@pytest.fixture(scope="session")
def settings(jupyter_server: EmbeddedJupyterServer) -> Settings:
    """Settings pointing at the real server, with test-sized deadlines."""
    return Settings(server_url=jupyter_server.url, token=jupyter_server.token,
                    execution_timeout=60, timeout_connect=5, timeout_total=30)


@pytest.fixture(scope="session")
def manager(settings: Settings) -> Iterator[KernelManager]:
    """The Python API's kernel manager, on the real server."""
    with JupyterClient(settings) as client:
        yield KernelManager(client)


@pytest.fixture(scope="session")
def shared_kernel(manager: KernelManager) -> Iterator[str]:
    """One kernel for the tests that only run harmless code."""
    kernel_id = manager.start_kernel()["id"]
    yield kernel_id
    _shutdown(manager, kernel_id)


@pytest.fixture
def kernel(manager: KernelManager) -> Iterator[str]:
    """A fresh kernel of its own, for tests that change or break it."""
    kernel_id = manager.start_kernel()["id"]
    yield kernel_id
    _shutdown(manager, kernel_id)


def _shutdown(manager: KernelManager, kernel_id: str) -> None:
    try:
        manager.shutdown_kernel(kernel_id)
    except KernelNotFound:
        pass


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Captures every log line, as `configure_logging` writes them (DEBUG and up)."""
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    configure_logging("DEBUG", stream=stream)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


@pytest.fixture
def app(settings: Settings):
    """The Flask app on the real server (its warm websockets closed after the test: each one
    is a connection the server keeps to the session's kernels)."""
    app = create_app(settings)
    yield app
    app.extensions["kernel_manager"].close()


@pytest.fixture
def http(app):
    """A test client of the app."""
    return app.test_client()


def post(http, path: str, body) -> tuple[int, dict]:
    """POSTs `body` as JSON with the test client; returns the status and the JSON answer."""
    response = http.post(path, json=body)
    return response.status_code, response.get_json()


# -- the real command ---------------------------------------------------------------------

def wait_for_health(url: str, timeout: float = 60, process: subprocess.Popen | None = None,
                    output=lambda: "") -> None:
    """Returns once `url` answers GET /health; fails if `process` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited:\n{output()}")
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return
        except requests.RequestException:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not serve within {timeout} s:\n{output()}")


class ProxyProcess:
    """A running `jupyter-kernel-proxy` and everything it printed."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.gettempdir()) / f"proxy-{self.port}.log"
        self.log = open(self.log_path, "wb")
        command = shutil.which("jupyter-kernel-proxy") or \
            str(Path(sys.executable).parent / "jupyter-kernel-proxy")
        self.process = subprocess.Popen(
            [command, "--port", str(self.port), *args], env=env, cwd=REPO,
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_until_serving(self, timeout: float = 120) -> None:
        wait_for_health(self.url, timeout, self.process, self.output)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict]:
        """Every line it printed, parsed as JSON (a line that is not JSON fails the test)."""
        return [json.loads(line) for line in self.output().splitlines() if line.strip()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.log.close()


@pytest.fixture
def start_proxy() -> Iterator:
    """Starts `jupyter-kernel-proxy` with the given flags and environment; stops it after."""
    started: list[ProxyProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ProxyProcess:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_")}
        full_env.update(env or {})
        proxy = ProxyProcess(list(args), full_env)
        started.append(proxy)
        proxy.wait_until_serving()
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@contextlib.contextmanager
def proxy_for(upstream, *args: str, env: dict[str, str] | None = None) -> Iterator[ProxyProcess]:
    """The real command in front of `upstream` (a `jupyter_server` fixture value), with more
    flags and environment, serving until the block ends (for module-scoped fixtures).
    """
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_")}
    full_env.update(env or {}, JUPYTER_TOKEN=upstream.token)
    proxy = ProxyProcess(["--server-url", upstream.url, *args], full_env)
    try:
        proxy.wait_until_serving()
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def proxy_kernel(proxy: ProxyProcess) -> Iterator[str]:
    """A kernel started through the module's `proxy` fixture, shut down after the test."""
    started = requests.post(f"{proxy.url}/start_kernel", timeout=120)
    assert started.status_code == 200, started.text
    kernel_id = started.json()["id"]
    yield kernel_id
    requests.post(f"{proxy.url}/shutdown_kernel", json={"id": kernel_id}, timeout=60)


FORKING_MANAGER = """
import os, sys, time
from app import JupyterClient, KernelManager, Settings
settings = Settings(server_url=sys.argv[1], token="t0ken-0123456789")
manager = KernelManager(JupyterClient(settings), pool_size=1)


def fork():  # as gunicorn --preload forks its workers from a master that built the app
    ran, running = os.pipe()
    child = os.fork()
    if child == 0:  # os.fork() returns here once the at-fork handlers ran (forget_inherited)
        os.write(running, b"x")
        time.sleep(60)
        os._exit(0)
    os.read(ran, 1)  # the child may not have been scheduled yet: wait until it ran them
    print(child, flush=True)


exec(sys.argv[2])
time.sleep(60)
"""


@contextlib.contextmanager
def forked_manager(server_url: str, code: str, *args: str) -> Iterator[subprocess.Popen]:
    """A process with a KernelManager (a pool of one, never filled) for `server_url` that runs
    `code` (`manager`, `fork()` and `sys.argv[3:]` = `args` in scope) and then sleeps; `code`
    must call `fork()`, which forks a child that sleeps too. Yields the process once the child
    runs, with `.child` its pid; both are killed after the block."""
    process = subprocess.Popen([sys.executable, "-c", FORKING_MANAGER, server_url, code, *args],
                               stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        process.child = int(process.stdout.readline())
        yield process
    finally:
        process.kill()
        process.wait(10)
        with contextlib.suppress(AttributeError, ProcessLookupError):
            os.kill(process.child, signal.SIGKILL)


# -- fake upstreams -------------------------------------------------------------------------

@pytest.fixture
def silent_upstream() -> Iterator[str]:
    """A TCP server that accepts connections and never answers: an upstream that hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    listener.close()


@pytest.fixture
def html_upstream() -> Iterator[str]:
    """An HTTP server that answers everything with 200 and an HTML page: not a Jupyter API."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            body = b"<html>not jupyter</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL where nothing listens: an upstream that is down."""
    return f"http://127.0.0.1:{free_port()}"
