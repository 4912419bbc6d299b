"""Benchmark: the proxy against direct Jupyter clients, side by side, in one run.

Run it from the repository root, in a virtualenv where `pip install -e '.[test]'` was done:

    python bench/benchmark.py                 # about 4 minutes on 2 cores
    python bench/benchmark.py --json out.json # also write the raw numbers

It starts everything it measures and stops everything it started, on Ctrl-C and errors too:

- a real Jupyter server (`app.embedded.EmbeddedJupyterServer`, iopub rate limit off);
- the proxy as deployed: the `jupyter-kernel-proxy` command of this Python environment
  (gunicorn, gthread) with `--server-url`, the token in `JUPYTER_TOKEN` and `--workers 2`, and a
  second one with `--pool-size 2` for the pool measurement; their JSON logs go to temporary
  files whose paths are printed at the end;
- a kernel of its own for `jupyter_client` over ZMQ;
- `bench/floor_app.py`, a minimal Flask app that answers `POST /execute_code` with a fixed
  result and no kernel, served with the proxy's gunicorn settings (one worker, gunicorn's own
  gthread worker class), for the cost of the HTTP hop alone.

What it measures, on warm kernels, executing `1+1`:

1. Latency p50/p99 of one execution, interleaved in blocks so that all see the same machine:
   through the proxy (a minimal keep-alive HTTP/1.1 client POSTing /execute_code); direct,
   tuned websocket clients on `/api/kernels/{id}/channels` (the reply and the `status: idle`
   both awaited), one in the server's default JSON encoding (issue 4's baseline: a plain
   websocket-client connection) and one in the binary v1 encoding the proxy itself speaks
   upstream; `jupyter_client` over ZMQ; the minimal Flask app, with the proxy's HTTP client.
   The socket clients set TCP_NODELAY and, on Linux, TCP_QUICKACK before each receive, so
   that their own delayed ACKs don't hide (or add to) the cost being measured. With it, the
   CPU time used per execution: by the gunicorn workers (the proxy, the minimal app), or by
   the client itself (the direct clients).
2. Throughput: 16 client threads on 4 kernels for a fixed time, through the proxy (each thread
   its own keep-alive connection), then as 16 direct websocket clients (4 per kernel) in
   JSON, then in v1.
3. Time from start_kernel to the first result (POST /start_kernel, then POST /execute_code),
   median: through the proxy without a pool, and through the pooled one once its pool is full.
4. Resident memory of each gunicorn worker of the non-pooled proxy, at rest after the runs
   above and again after `--churn-kernels` kernels were started, used once and shut down
   through it.

It prints markdown tables (ready for the README) with the ratios issue 4 targets and a line
about the machine. Every count and duration is a flag: see `--help`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import datetime
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import requests
import websocket

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/benchmark.py` puts bench/, not the repo, first

from app.embedded import EmbeddedJupyterServer, free_port  # noqa: E402
from app.kernels import protocol  # noqa: E402
from app.logs import StructuredLogger  # noqa: E402

CODE = "1+1"
EXPECTED = "2"
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
REQUEST_TIMEOUT = 60.0
TARGET_LATENCY_RATIO = 1.25
TARGET_THROUGHPUT_RATIO = 1.0
TARGET_POOLED_START_MS = 50.0
QUIET = StructuredLogger("bench.jupyter_server", level="WARNING")  # its warnings only

Execute = Callable[[], str]  # runs CODE once, returns the text/plain of its result


# -- command line -----------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=50,
                        help="unmeasured executions per latency client (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=300,
                        help="measured executions per latency client (default: %(default)s)")
    parser.add_argument("--block", type=int, default=50,
                        help="latency executions per client before switching to the next "
                             "(default: %(default)s)")
    parser.add_argument("--clients", type=int, default=16,
                        help="concurrent clients in the throughput run (default: %(default)s)")
    parser.add_argument("--kernels", type=int, default=4,
                        help="kernels the throughput clients share (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of each throughput run (default: %(default)s)")
    parser.add_argument("--start-samples", type=int, default=10,
                        help="start_kernel + first result samples, with and without the pool "
                             "(default: %(default)s)")
    parser.add_argument("--churn-kernels", type=int, default=100,
                        help="kernels started and shut down through the proxy before memory "
                             "is measured again (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2,
                        help="gunicorn workers of each proxy (default: %(default)s)")
    parser.add_argument("--pool-size", type=int, default=2,
                        help="ready kernels per worker of the pooled proxy (default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    args = parser.parse_args(argv)
    for name in ("warmup", "churn_kernels"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 or more")
    for name in ("iterations", "block", "clients", "kernels", "start_samples", "workers",
                 "pool_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.duration <= 0:
        parser.error("--duration must be more than 0")
    return args


# -- sockets ----------------------------------------------------------------------------------

def set_nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def ack_quickly(sock: socket.socket | None) -> None:
    """Turns delayed ACKs off for the next receive (Linux resets it, so call it every time)."""
    if TCP_QUICKACK is not None and sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)


# -- processes --------------------------------------------------------------------------------

def die_with_parent() -> None:
    """In a child before exec (Linux): get SIGTERM if the benchmark dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def proxy_command() -> str:
    """The `jupyter-kernel-proxy` script of the Python environment running the benchmark."""
    script = Path(sys.executable).parent / "jupyter-kernel-proxy"
    if not script.exists():
        sys.exit(f"{script} not found: run `pip install -e '.[test]'` in this environment")
    return str(script)


class JupyterRest:
    """The few Jupyter server REST calls the benchmark makes itself."""

    def __init__(self, server: EmbeddedJupyterServer) -> None:
        self.server = server
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"token {server.token}"

    def start_kernel(self) -> str:
        response = self.session.post(f"{self.server.url}/api/kernels", json={"name": "python3"},
                                     timeout=REQUEST_TIMEOUT)
        response.raise_for_status()
        return response.json()["id"]

    def shutdown_kernel(self, kernel_id: str) -> None:
        """Shuts a kernel down; one that is already gone is fine."""
        response = self.session.delete(f"{self.server.url}/api/kernels/{kernel_id}",
                                       timeout=REQUEST_TIMEOUT)
        if response.status_code != 404:
            response.raise_for_status()

    def kernel_count(self) -> int:
        response = self.session.get(f"{self.server.url}/api/kernels", timeout=REQUEST_TIMEOUT)
        response.raise_for_status()
        return len(response.json())

    def wait_for_kernel_count(self, at_least: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.kernel_count() < at_least:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Jupyter server did not reach {at_least} kernels "
                                   f"within {timeout:g} s")
            time.sleep(0.1)


class ServedProcess:
    """A gunicorn server the benchmark started (in a session of its own), logging to a file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], cwd: Path,
                 port: int, workers: int, log_path: Path) -> None:
        self.name = name
        self.port = port
        self.workers = workers
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,  # our Ctrl-C is ours: stop() stops it in order
                preexec_fn=die_with_parent)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Returns once /health answers and every worker is up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start-up; see {self.log_path}")
            with contextlib.suppress(requests.RequestException):
                healthy = requests.get(f"http://127.0.0.1:{self.port}/health", timeout=1).ok
                if healthy and len(self.worker_pids()) >= self.workers:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not serve within {timeout:g} s; "
                           f"see {self.log_path}")

    def worker_pids(self) -> list[int]:
        return child_pids(self.pid)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (gunicorn stops gracefully, pooled kernels are shut down), then SIGKILL."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"{self.name} ({self.pid}) did not stop in {timeout:g} s: killing it",
                      file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)  # its session: master and workers
        self.process.wait()


class ProxyProcess(ServedProcess):
    """A running `jupyter-kernel-proxy` in front of the benchmark's Jupyter server."""

    def __init__(self, server: EmbeddedJupyterServer, workers: int, pool_size: int,
                 log_path: Path) -> None:
        self.pool_size = pool_size
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_")}
        env["JUPYTER_TOKEN"] = server.token
        # Its temporary files (the lock directory for this server) stay with its log.
        env["TMPDIR"] = str(log_path.parent / "tmp")
        os.makedirs(env["TMPDIR"], exist_ok=True)
        command = [proxy_command(), "--server-url", server.url, "--host", "127.0.0.1",
                   "--port", str(port), "--workers", str(workers),
                   "--pool-size", str(pool_size),
                   "--env-file", os.devnull]  # a developer's .env must not change the run
        super().__init__("the proxy", command, env, REPO, port, workers, log_path)

    def log_problems(self) -> dict[str, int]:
        """How many WARNING and ERROR lines the proxy logged."""
        counts = {"WARNING": 0, "ERROR": 0}
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                level = json.loads(line).get("level")
            except (ValueError, AttributeError):
                level = "ERROR"  # a line that is not JSON is a problem in itself
            if level in ("WARN", "WARNING"):
                counts["WARNING"] += 1
            elif level in ("ERROR", "CRITICAL"):
                counts["ERROR"] += 1
        return counts


class FloorServer(ServedProcess):
    """`bench/floor_app.py` served as the proxy is (its `gunicorn.conf.py` with the default
    settings: threads, keep-alive, JSON logs) but by gunicorn's own gthread worker and one
    worker process, for the cost of the hop alone."""

    def __init__(self, log_path: Path) -> None:
        port = free_port()
        command = [sys.executable, "-m", "gunicorn", "--config", str(REPO / "gunicorn.conf.py"),
                   "--worker-class", "gthread", "--workers", "1",
                   "--bind", f"127.0.0.1:{port}", "floor_app:app"]
        # Run from bench/ (floor_app, and no developer's .env) with no settings of ours.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("JUPYTER_") and k != "GUNICORN_CMD_ARGS"}
        super().__init__("the minimal Flask app", command, env, REPO / "bench", port, 1,
                         log_path)


def child_pids(parent: int) -> list[int]:
    """The pids of the processes whose parent is `parent` (Linux /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            children.append(int(entry.name))
    return sorted(children)


def cpu_seconds(pids: list[int]) -> float:
    """CPU time the processes' living threads used so far, in seconds (Linux: read in
    nanoseconds from /proc/<pid>/task/<tid>/schedstat; /proc/<pid>/stat counts 10 ms ticks)."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that just ended
                total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


# -- clients ----------------------------------------------------------------------------------

class ProxyHttpClient:
    """A light keep-alive HTTP/1.1 client of the proxy: one socket, one `sendall` per request,
    the answer read by its Content-Length (http.client's header parsing alone costs more than
    the hop being measured).
    """

    def __init__(self, port: int) -> None:
        self.host = f"127.0.0.1:{port}"
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT)
        set_nodelay(self.sock)
        self.buffer = b""

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        payload = json.dumps(body).encode()
        self.sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(line.split(":", 1)[1]) for line in lines[1:]
                      if line.lower().startswith("content-length:"))
        while len(self.buffer) < length:
            self._read()
        answer, self.buffer = self.buffer[:length], self.buffer[length:]
        if status != 200:
            raise RuntimeError(f"POST {path} answered {status}: {answer[:300]!r}")
        return json.loads(answer)

    def _read(self) -> None:
        ack_quickly(self.sock)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise RuntimeError("the proxy closed the connection")
        self.buffer += chunk

    def execute(self, kernel_id: str, code: str = CODE) -> str:
        result = self.post("/execute_code", {"id": kernel_id, "code": code})
        if result["status"] != "ok" or not result["outputs"]:
            raise RuntimeError(f"execution through the proxy failed: {result}")
        return result["outputs"][0]["data"]["text/plain"]

    def close(self) -> None:
        self.sock.close()


class DirectWebsocketClient:
    """A tuned client of the server's kernel websocket: TCP_NODELAY, TCP_QUICKACK per recv;
    in the default JSON encoding, or in the binary v1 one (`v1=True`).
    """

    def __init__(self, server: EmbeddedJupyterServer, kernel_id: str, v1: bool = False) -> None:
        self.session_id = uuid.uuid4().hex
        self.v1 = v1
        url = (server.url.replace("http://", "ws://", 1)
               + f"/api/kernels/{kernel_id}/channels?session_id={self.session_id}")
        self.ws = websocket.create_connection(
            url, header=[f"Authorization: token {server.token}"], timeout=REQUEST_TIMEOUT,
            subprotocols=[protocol.V1_SUBPROTOCOL] if v1 else None,
            enable_multithread=False, skip_utf8_validation=True)
        set_nodelay(self.ws.sock)

    def execute(self, code: str = CODE) -> str:
        """Sends an execute_request; returns once its execute_reply and idle status arrived."""
        request = protocol.execute_request(code, self.session_id)
        request_id = request["header"]["msg_id"]
        if self.v1:
            self.ws.send_binary(protocol.encode_v1(request))
        else:
            self.ws.send(protocol.encode(request))
        decode = protocol.decode_v1 if self.v1 else protocol.decode
        replied = idle = False
        result = None
        while not (replied and idle):
            ack_quickly(self.ws.sock)
            message = decode(self.ws.recv())
            if protocol.parent_id(message) != request_id:
                continue  # another client's output on the same kernel
            msg_type = message["msg_type"]
            if msg_type == "execute_reply":
                replied = True
                if message["content"].get("status") != "ok":
                    raise RuntimeError(f"direct execution failed: {message['content']}")
            elif msg_type == "execute_result":
                result = message["content"]["data"]["text/plain"]
            idle = idle or protocol.is_idle(message)
        return result

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close(timeout=1)


class ZmqClient:
    """`jupyter_client` over ZMQ, on a kernel of its own (not behind the Jupyter server)."""

    def __init__(self) -> None:
        from jupyter_client.manager import start_new_kernel

        self.manager, self.client = start_new_kernel(  # its banner and warnings: not ours
            kernel_name="python3", startup_timeout=60,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.closed = False

    def execute(self, code: str = CODE) -> str:
        request_id = self.client.execute(code)
        while True:
            reply = self.client.get_shell_msg(timeout=REQUEST_TIMEOUT)
            if reply["parent_header"].get("msg_id") == request_id:
                break
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"ZMQ execution failed: {reply['content']}")
        result = None
        while True:
            message = self.client.get_iopub_msg(timeout=REQUEST_TIMEOUT)
            if message["parent_header"].get("msg_id") != request_id:
                continue
            if message["msg_type"] == "execute_result":
                result = message["content"]["data"]["text/plain"]
            elif message["msg_type"] == "status" and \
                    message["content"]["execution_state"] == "idle":
                return result

    def close(self) -> None:
        """Stops the kernel; safe to call twice."""
        if not self.closed:
            self.closed = True
            self.client.stop_channels()
            self.manager.shutdown_kernel(now=True)


def checked(execute: Execute) -> Execute:
    """`execute`, failing loudly if the answer is not the result of CODE."""
    def run() -> str:
        result = execute()
        if result != EXPECTED:
            raise RuntimeError(f"{CODE} gave {result!r}, not {EXPECTED!r}")
        return result
    return run


# -- measurements -----------------------------------------------------------------------------

def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary_ms(samples_s: list[float]) -> dict[str, Any]:
    samples = [s * 1000 for s in samples_s]
    return {"p50": percentile(samples, 50), "p99": percentile(samples, 99),
            "mean": statistics.fmean(samples), "min": min(samples), "max": max(samples),
            "n": len(samples), "samples_ms": [round(s, 3) for s in samples]}


def time_one(execute: Execute) -> float:
    started = time.perf_counter()
    execute()
    return time.perf_counter() - started


def measure_latency(clients: dict[str, Execute], warmup: int, iterations: int, block: int,
                    cpu_clocks: dict[str, Callable[[], float]] | None = None
                    ) -> dict[str, dict[str, Any]]:
    """Latency of each client, measured in interleaved blocks after `warmup` runs each, and,
    for the clients in `cpu_clocks`, the CPU time per measured execution that their clock
    counts (read around blocks, not executions).
    """
    for execute in clients.values():
        for _ in range(warmup):
            execute()
    clocks = cpu_clocks or {}
    samples: dict[str, list[float]] = {name: [] for name in clients}
    cpu = dict.fromkeys(clocks, 0.0)
    while any(len(s) < iterations for s in samples.values()):
        for name, execute in clients.items():
            before = clocks[name]() if name in clocks else 0.0
            for _ in range(min(block, iterations - len(samples[name]))):
                samples[name].append(time_one(execute))
            if name in clocks:
                cpu[name] += clocks[name]() - before
    results = {name: summary_ms(s) for name, s in samples.items()}
    for name, used in cpu.items():
        results[name]["cpu_ms"] = used * 1000 / len(samples[name])
    return results


@dataclass
class LoadRun:
    """One throughput run: client threads executing in a loop until a shared deadline."""

    connect: Callable[[int], tuple[Execute, Callable[[], None]]]  # client index -> run, close
    clients: int
    duration: float
    warmup: int = 3
    counts: list[int] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def run(self, stop: threading.Event) -> float:
        """Executions per second over `duration`, all clients together."""
        self.counts = [0] * self.clients
        ready = threading.Barrier(self.clients + 1)
        window: dict[str, float] = {}
        threads = [threading.Thread(target=self._client, args=(i, ready, window, stop),
                                    daemon=True, name=f"load-{i}")
                   for i in range(self.clients)]
        for thread in threads:
            thread.start()
        try:
            ready.wait(timeout=REQUEST_TIMEOUT * 2)  # every client connected and warm
            window["end"] = time.monotonic() + self.duration
            ready.wait(timeout=REQUEST_TIMEOUT)  # go
        except threading.BrokenBarrierError:
            if not self.errors:
                raise RuntimeError("the load clients did not get ready in time") from None
        for thread in threads:
            thread.join(self.duration + REQUEST_TIMEOUT)
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} load client(s) failed") from self.errors[0]
        return sum(self.counts) / self.duration

    def _client(self, index: int, ready: threading.Barrier, window: dict[str, float],
                stop: threading.Event) -> None:
        close: Callable[[], None] = lambda: None  # noqa: E731
        try:
            execute, close = self.connect(index)
            for _ in range(self.warmup):
                execute()
            ready.wait()
            ready.wait()
            while not stop.is_set():
                execute()
                if time.monotonic() > window["end"]:
                    break
                self.counts[index] += 1
        except BaseException as err:  # noqa: BLE001 - reported by run()
            if not stop.is_set():
                self.errors.append(err)
                ready.abort()
        finally:
            close()


def proxy_load_client(proxy: ProxyProcess, kernel_ids: list[str]):
    def connect(index: int) -> tuple[Execute, Callable[[], None]]:
        http_client = ProxyHttpClient(proxy.port)
        kernel_id = kernel_ids[index % len(kernel_ids)]
        return checked(lambda: http_client.execute(kernel_id)), http_client.close
    return connect


def direct_load_client(server: EmbeddedJupyterServer, kernel_ids: list[str], v1: bool):
    def connect(index: int) -> tuple[Execute, Callable[[], None]]:
        ws_client = DirectWebsocketClient(server, kernel_ids[index % len(kernel_ids)], v1)
        return checked(ws_client.execute), ws_client.close
    return connect


def start_to_first_result(http_client: ProxyHttpClient) -> tuple[float, str]:
    """Seconds from POST /start_kernel to the answer of the first /execute_code; the kernel."""
    started = time.perf_counter()
    kernel_id = http_client.post("/start_kernel", {})["id"]
    result = http_client.execute(kernel_id)
    elapsed = time.perf_counter() - started
    if result != EXPECTED:
        raise RuntimeError(f"{CODE} gave {result!r} on a new kernel")
    return elapsed, kernel_id


def measure_start(http_client: ProxyHttpClient, samples: int,
                  before_each: Callable[[], None]) -> dict[str, Any]:
    times = []
    for _ in range(samples):
        before_each()
        elapsed, kernel_id = start_to_first_result(http_client)
        times.append(elapsed)
        http_client.post("/shutdown_kernel", {"id": kernel_id})
    result = summary_ms(times)
    result["median"] = statistics.median(result["samples_ms"])
    return result


def churn_kernels(proxy: ProxyProcess, count: int, parallel: int = 2) -> None:
    """Starts, uses once and shuts down `count` kernels through the proxy, `parallel` at a time,
    each on a new connection so that every worker gets its share."""
    remaining = iter(range(count))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            with lock:
                if next(remaining, None) is None or errors:
                    return
            http_client = ProxyHttpClient(proxy.port)
            try:
                _, kernel_id = start_to_first_result(http_client)
                http_client.post("/shutdown_kernel", {"id": kernel_id})
            except BaseException as err:  # noqa: BLE001 - re-raised below
                errors.append(err)
            finally:
                http_client.close()

    threads = [threading.Thread(target=work, daemon=True) for _ in range(parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError("starting kernels through the proxy failed") from errors[0]


def worker_memory(proxy: ProxyProcess) -> dict[int, float]:
    return {pid: rss_mib(pid) for pid in proxy.worker_pids()}


# -- the run ----------------------------------------------------------------------------------

def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_benchmark(args: argparse.Namespace, cleanup: contextlib.ExitStack,
                  stop: threading.Event, log_dir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "settings": vars(args).copy()}
    results["settings"]["log_dir"] = str(log_dir)

    log("starting the Jupyter server")
    server = EmbeddedJupyterServer(startup_timeout=120, logger=QUIET).start()
    cleanup.callback(server.stop)
    rest = JupyterRest(server)

    log("starting the proxy and the benchmark's kernels")
    proxy = start_proxy(server, args.workers, 0, log_dir / "proxy.log", cleanup)
    results["proxy_logs"] = {"proxy": str(proxy.log_path)}
    kernels = start_kernels(server, rest, 3 + 3 * args.kernels, cleanup)
    zmq = ZmqClient()
    cleanup.callback(zmq.close)

    floor = FloorServer(log_dir / "floor.log")
    cleanup.callback(floor.stop)
    floor.wait_until_serving()
    results["latency"] = latency_phase(args, server, proxy, floor, kernels[:3], zmq, cleanup)
    zmq.close()
    floor.stop()
    results["throughput"] = throughput_phase(args, server, proxy, kernels[3:], stop)
    for kernel_id in kernels:
        rest.shutdown_kernel(kernel_id)
    time.sleep(2)  # the proxies' janitors close their idle websockets to those kernels
    results["memory"] = {"at_rest": worker_memory(proxy)}

    log(f"start_kernel + first result, no pool ({args.start_samples} samples)")
    results["start"] = {"no_pool": start_phase(proxy, args.start_samples,
                                               before_each=lambda: time.sleep(1))}
    results["start"]["pool"] = pooled_start_phase(args, server, rest, log_dir, cleanup, results)

    log(f"starting, using and shutting down {args.churn_kernels} kernels through the proxy")
    if args.churn_kernels:
        churn_kernels(proxy, args.churn_kernels)
    time.sleep(3)  # the janitor closes websockets to the kernels that went away
    results["memory"]["after_churn"] = worker_memory(proxy)
    results.setdefault("proxy_log_problems", {})["proxy"] = proxy.log_problems()
    return results


def start_proxy(server: EmbeddedJupyterServer, workers: int, pool_size: int, log_path: Path,
                cleanup: contextlib.ExitStack) -> ProxyProcess:
    proxy = ProxyProcess(server, workers, pool_size, log_path)
    cleanup.callback(proxy.stop)
    proxy.wait_until_serving()
    return proxy


def start_kernels(server: EmbeddedJupyterServer, rest: JupyterRest, count: int,
                  cleanup: contextlib.ExitStack) -> list[str]:
    """Starts `count` kernels on the Jupyter server; returns once each has run a cell."""
    kernel_ids = []
    for _ in range(count):
        kernel_id = rest.start_kernel()
        cleanup.callback(rest.shutdown_kernel, kernel_id)
        kernel_ids.append(kernel_id)
    for kernel_id in kernel_ids:
        first_client = DirectWebsocketClient(server, kernel_id)
        try:
            checked(first_client.execute)()
        finally:
            first_client.close()
    return kernel_ids


def latency_phase(args: argparse.Namespace, server: EmbeddedJupyterServer, proxy: ProxyProcess,
                  floor: FloorServer, kernel_ids: list[str], zmq: ZmqClient,
                  cleanup: contextlib.ExitStack) -> dict[str, Any]:
    """The CPU time of the proxy and of the floor is that of their gunicorn workers; of the
    direct clients, their own."""
    log(f"latency: {args.warmup} warm-up + {args.iterations} measured executions per client")
    proxy_kernel, json_kernel, v1_kernel = kernel_ids
    http_client = ProxyHttpClient(proxy.port)
    cleanup.callback(http_client.close)
    floor_client = ProxyHttpClient(floor.port)
    cleanup.callback(floor_client.close)
    proxy_workers, floor_workers = proxy.worker_pids(), floor.worker_pids()
    json_client = DirectWebsocketClient(server, json_kernel)
    cleanup.callback(json_client.close)
    v1_client = DirectWebsocketClient(server, v1_kernel, v1=True)
    cleanup.callback(v1_client.close)
    latency = measure_latency({
        "proxy": checked(lambda: http_client.execute(proxy_kernel)),
        "direct_websocket": checked(json_client.execute),
        "direct_websocket_v1": checked(v1_client.execute),
        "zmq": checked(zmq.execute),
        "floor": checked(lambda: floor_client.execute(proxy_kernel)),
    }, args.warmup, args.iterations, args.block, cpu_clocks={
        "proxy": lambda: cpu_seconds(proxy_workers),
        "floor": lambda: cpu_seconds(floor_workers),
        # The direct clients run in this thread (the ZMQ one also in libzmq's: not counted).
        "direct_websocket": time.thread_time, "direct_websocket_v1": time.thread_time})
    http_client.close()
    floor_client.close()
    json_client.close()
    v1_client.close()
    latency["proxy"]["inside"] = proxy_time_inside(proxy.log_path, proxy_kernel, args.warmup)
    return latency


def proxy_time_inside(log_path: Path, kernel_id: str, skip: int) -> dict[str, float]:
    """Medians of what the proxy logged for the measured executions on `kernel_id`: the kernel
    layer's `code executed` (lock, websocket exchange, folding) and the whole Flask request."""
    executed, requested = [], []
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("kernel_id") != kernel_id:
                continue
            if entry.get("message") == "code executed":
                executed.append(entry["duration_ms"])
            elif entry.get("message") == "request" and entry.get("path") == "/execute_code":
                requested.append(entry["duration_ms"])
    return {"code_executed_p50": statistics.median(executed[skip:] or [math.nan]),
            "request_p50": statistics.median(requested[skip:] or [math.nan])}


def throughput_phase(args: argparse.Namespace, server: EmbeddedJupyterServer,
                     proxy: ProxyProcess, kernel_ids: list[str],
                     stop: threading.Event) -> dict[str, Any]:
    """The proxy and each kind of direct client get kernels of their own, so that no run's
    idle connections receive another's output."""
    n = args.kernels
    proxy_kernels, json_kernels, v1_kernels = \
        kernel_ids[:n], kernel_ids[n:2 * n], kernel_ids[2 * n:3 * n]
    log(f"throughput: {args.clients} clients on {args.kernels} kernels through the proxy "
        f"for {args.duration:g} s")
    through_proxy = LoadRun(proxy_load_client(proxy, proxy_kernels), args.clients,
                            args.duration).run(stop)
    results = {"proxy": through_proxy}
    for name, kernels, v1 in (("direct_websocket", json_kernels, False),
                              ("direct_websocket_v1", v1_kernels, True)):
        log(f"throughput: {args.clients} direct websocket clients ({'v1' if v1 else 'JSON'}) "
            f"on {args.kernels} kernels for {args.duration:g} s")
        results[name] = LoadRun(direct_load_client(server, kernels, v1), args.clients,
                                args.duration).run(stop)
    return results


def start_phase(proxy: ProxyProcess, samples: int,
                before_each: Callable[[], None]) -> dict[str, Any]:
    http_client = ProxyHttpClient(proxy.port)
    try:
        return measure_start(http_client, samples, before_each)
    finally:
        http_client.close()


def pooled_start_phase(args: argparse.Namespace, server: EmbeddedJupyterServer,
                       rest: JupyterRest, log_dir: Path, cleanup: contextlib.ExitStack,
                       results: dict[str, Any]) -> dict[str, Any]:
    log(f"start_kernel + first result, pool of {args.pool_size} per worker "
        f"({args.start_samples} samples)")
    before = rest.kernel_count()
    full = before + args.workers * args.pool_size
    pooled = start_proxy(server, args.workers, args.pool_size, log_dir / "pooled-proxy.log",
                         cleanup)
    results["proxy_logs"]["pooled_proxy"] = str(pooled.log_path)

    def wait_for_full_pool() -> None:
        rest.wait_for_kernel_count(full)
        time.sleep(1)  # the newest kernel gets ready and runs its warm-up cell

    try:
        return start_phase(pooled, args.start_samples, before_each=wait_for_full_pool)
    finally:
        results.setdefault("proxy_log_problems", {})["pooled_proxy"] = pooled.log_problems()
        pooled.stop()


# -- report -----------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "jupyter_server": version("jupyter_server"), "ipykernel": version("ipykernel"),
            "jupyter_client": version("jupyter_client"), "gunicorn": version("gunicorn"),
            "kernel": platform.release(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def ms(value: float) -> str:
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def report(results: dict[str, Any]) -> str:
    settings, lat = results["settings"], results["latency"]
    thr, start, mem = results["throughput"], results["start"], results["memory"]
    latency_ratio = lat["proxy"]["p50"] / lat["direct_websocket"]["p50"]
    latency_ratio_v1 = lat["proxy"]["p50"] / lat["direct_websocket_v1"]["p50"]
    throughput_ratio = thr["proxy"] / thr["direct_websocket"]
    throughput_ratio_v1 = thr["proxy"] / thr["direct_websocket_v1"]
    pooled_median = start["pool"]["median"]
    results["ratios"] = {"latency_p50_proxy_over_direct": latency_ratio,
                         "latency_p50_proxy_over_direct_v1": latency_ratio_v1,
                         "throughput_proxy_over_direct": throughput_ratio,
                         "throughput_proxy_over_direct_v1": throughput_ratio_v1,
                         "pooled_start_median_ms": pooled_median}
    rest = mem["at_rest"]
    inside = lat["proxy"]["inside"]
    churned = mem["after_churn"]
    m = results["machine"]
    none = "| - | - | - |"
    lines = [
        f"Executing `{CODE}` on warm kernels; proxy: `jupyter-kernel-proxy --workers "
        f"{settings['workers']}` (gunicorn gthread) in front of the same Jupyter server.",
        "",
        "| measurement | proxy (HTTP keep-alive) | direct websocket, JSON (tuned) "
        "| direct websocket, v1 (tuned) | jupyter_client (ZMQ) |",
        "|---|---|---|---|---|",
        f"| execute latency p50 ({settings['iterations']} runs) | {ms(lat['proxy']['p50'])} "
        f"| {ms(lat['direct_websocket']['p50'])} | {ms(lat['direct_websocket_v1']['p50'])} "
        f"| {ms(lat['zmq']['p50'])} |",
        f"| execute latency p99 | {ms(lat['proxy']['p99'])} "
        f"| {ms(lat['direct_websocket']['p99'])} | {ms(lat['direct_websocket_v1']['p99'])} "
        f"| {ms(lat['zmq']['p99'])} |",
        f"| throughput, {settings['clients']} clients on {settings['kernels']} kernels, "
        f"{settings['duration']:g} s | {thr['proxy']:.0f} exec/s "
        f"| {thr['direct_websocket']:.0f} exec/s | {thr['direct_websocket_v1']:.0f} exec/s "
        "| - |",
        f"| start_kernel + first result, median of {settings['start_samples']}, no pool "
        f"| {ms(start['no_pool']['median'])} {none}",
        f"| start_kernel + first result, median of {settings['start_samples']}, pool of "
        f"{settings['pool_size']} per worker | {ms(pooled_median)} {none}",
        f"| RSS per worker at rest | {mib_list(rest)} {none}",
        f"| RSS per worker after {settings['churn_kernels']} kernels "
        f"| {mib_list(churned)} {none}",
        "",
        "Where the proxy's p50 goes (medians; the first two from its own log lines):",
        "",
        "| part | time |",
        "|---|---|",
        f"| kernel layer (`code executed`: lock, websocket exchange, answer) "
        f"| {ms(inside['code_executed_p50'])} |",
        f"| Flask around it (validation, JSON answer, request log) "
        f"| {ms(inside['request_p50'] - inside['code_executed_p50'])} |",
        f"| gunicorn, HTTP and the client | {ms(lat['proxy']['p50'] - inside['request_p50'])} |",
        "",
        "CPU time per execution, and the HTTP hop alone (same run, same HTTP client: "
        "`bench/floor_app.py`, a minimal Flask app that answers a fixed result, no kernel, "
        "served with the proxy's gunicorn settings by gunicorn's gthread worker):",
        "",
        "| | p50 | CPU per execution |",
        "|---|---|---|",
        f"| proxy (its gunicorn workers) | {ms(lat['proxy']['p50'])} "
        f"| {ms(lat['proxy']['cpu_ms'])} |",
        f"| direct websocket, JSON (the client itself) | {ms(lat['direct_websocket']['p50'])} "
        f"| {ms(lat['direct_websocket']['cpu_ms'])} |",
        f"| direct websocket, v1 (the client itself) | {ms(lat['direct_websocket_v1']['p50'])} "
        f"| {ms(lat['direct_websocket_v1']['cpu_ms'])} |",
        f"| the HTTP hop alone (its gunicorn worker) | {ms(lat['floor']['p50'])} "
        f"| {ms(lat['floor']['cpu_ms'])} |",
        "",
        "| target (issue 4), against the JSON client | measured | goal | met "
        "| against the v1 client |",
        "|---|---|---|---|---|",
        f"| proxy p50 / direct websocket p50 | {latency_ratio:.3f} | <= {TARGET_LATENCY_RATIO} "
        f"| {verdict(latency_ratio <= TARGET_LATENCY_RATIO)} | {latency_ratio_v1:.3f} |",
        f"| proxy throughput / direct websocket throughput | {throughput_ratio:.3f} "
        f"| >= {TARGET_THROUGHPUT_RATIO} "
        f"| {verdict(throughput_ratio >= TARGET_THROUGHPUT_RATIO)} | {throughput_ratio_v1:.3f} |",
        f"| pooled start_kernel + first result, median | {ms(pooled_median)} "
        f"| < {TARGET_POOLED_START_MS:g} ms | {verdict(pooled_median < TARGET_POOLED_START_MS)} "
        "| - |",
        "",
        f"Machine: {m['nproc']} cores, {m['cpu']}, Linux {m['kernel']}, Python {m['python']}, "
        f"jupyter_server {m['jupyter_server']}, ipykernel {m['ipykernel']}, "
        f"jupyter_client {m['jupyter_client']}, gunicorn {m['gunicorn']}; {m['date']}.",
    ]
    return "\n".join(lines)


def mib_list(by_pid: dict[int, float]) -> str:
    return ", ".join(f"{value:.1f} MiB" for _, value in sorted(by_pid.items()))


# -- main -------------------------------------------------------------------------------------

@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that everything started is stopped."""
    def raise_exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ignore_interrupts() -> None:
    """While cleaning up, a second Ctrl-C must not leave processes behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="jupyter-kernel-proxy-bench-"))
    stop = threading.Event()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with terminate_on_sigterm(), contextlib.ExitStack() as cleanup:
            try:
                results = run_benchmark(args, cleanup, stop, log_dir)
            except KeyboardInterrupt:
                log("interrupted: stopping everything")
                return 130
            finally:
                ignore_interrupts()
                stop.set()  # load threads stop before what they use goes away
                log("stopping the proxies, the kernels and the Jupyter servers")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    table = report(results)
    print(table)
    problems = results["proxy_log_problems"]
    log(f"proxy logs in {log_dir}; warnings/errors logged: {problems}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        log(f"raw numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
