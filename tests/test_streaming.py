"""Streamed execution (NDJSON) through the real proxy (gunicorn gthread) on a real server."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from app.kernels.errors import ConnectionLost
from app.streaming import ndjson_response
from tests.conftest import ProxyProcess, proxy_for

pytestmark = pytest.mark.integration

CONTRACT_FIELDS = {"results", "status", "execution_count", "stdout", "stderr", "outputs",
                   "error", "truncated"}


@pytest.fixture(scope="module")
def proxy(jupyter_server) -> Iterator[ProxyProcess]:
    """The real command, two workers, against the session's Jupyter server."""
    with proxy_for(jupyter_server, "--workers", "2") as process:
        yield process


@pytest.fixture
def kernel_id(proxy_kernel: str) -> str:
    return proxy_kernel


def stream(proxy: ProxyProcess, body: dict, **kwargs) -> Iterator[tuple[float, dict]]:
    """(arrival time, parsed line) for each line of a streamed execution, as they arrive."""
    with requests.post(f"{proxy.url}/execute_code", json={**body, "stream": True},
                       stream=True, timeout=120, **kwargs) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        assert response.headers["X-Accel-Buffering"] == "no"
        for line in response.iter_lines(chunk_size=1):
            if line:
                yield time.monotonic(), json.loads(line)


def execute(proxy: ProxyProcess, kernel: str, code: str) -> dict:
    answer = requests.post(f"{proxy.url}/execute_code", json={"id": kernel, "code": code},
                           timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_lines_arrive_as_the_kernel_prints_them(proxy, kernel_id):
    code = ("import time\n"
            "for i in range(3):\n"
            "    print(f'line {i}', flush=True)\n"
            "    time.sleep(0.6)\n"
            "'done'")
    lines = list(stream(proxy, {"id": kernel_id, "code": code}))
    stdout = [(t, line) for t, line in lines if line["type"] == "stdout"]
    assert [line["text"] for _, line in stdout] == ["line 0\n", "line 1\n", "line 2\n"]
    gaps = [b[0] - a[0] for a, b in zip(stdout, stdout[1:], strict=False)]
    # Each line came about when it was printed, not all at the end of the cell.
    assert all(gap > 0.3 for gap in gaps), gaps
    kinds = [line["type"] for _, line in lines]
    assert kinds[-1] == "result" and kinds.count("result") == 1
    assert "output" in kinds
    result = lines[-1][1]
    assert CONTRACT_FIELDS <= set(result)
    assert result["status"] == "ok" and result["stdout"] == "line 0\nline 1\nline 2\n"
    assert result["outputs"][0]["data"]["text/plain"] == "'done'"


def test_streamed_result_is_the_same_answer_as_without_a_stream(proxy, kernel_id):
    code = "print('a'); import sys; print('b', file=sys.stderr); 1/0"
    [*_, (_, streamed)] = stream(proxy, {"id": kernel_id, "code": code})
    plain = execute(proxy, kernel_id, code)
    for field in ("status", "stdout", "stderr", "outputs", "truncated"):
        assert streamed[field] == plain[field], field
    assert streamed["error"]["ename"] == plain["error"]["ename"] == "ZeroDivisionError"
    assert "ZeroDivisionError" in streamed["error"]["traceback_text"]
    assert "\x1b[" not in streamed["error"]["traceback_text"]


def test_a_streamed_executions_log_lines_carry_its_request_id(proxy, kernel_id):
    lines = list(stream(proxy, {"id": kernel_id, "code": "print(1)"},
                        headers={"X-Request-ID": "stream-request-7"}))
    assert lines[-1][1]["status"] == "ok"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        tagged = [line for line in proxy.log_lines() if line.get("message") == "code executed"
                  and line.get("request_id") == "stream-request-7"]
        if tagged:
            break
        time.sleep(0.1)
    assert tagged, "the execution's log line names the request it answers"


def test_accept_ndjson_asks_for_a_stream(proxy, kernel_id):
    response = requests.post(f"{proxy.url}/execute_code",
                             json={"id": kernel_id, "code": "print('hi')"},
                             headers={"Accept": "application/x-ndjson"}, timeout=60)
    assert response.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[0] == {"type": "stdout", "text": "hi\n"}
    assert lines[-1]["type"] == "result"
    explicit = requests.post(f"{proxy.url}/execute_code",
                             json={"id": kernel_id, "code": "1", "stream": False},
                             headers={"Accept": "application/x-ndjson"}, timeout=60)
    assert explicit.headers["Content-Type"] == "application/json"


def test_deadline_ends_a_stream_like_a_plain_execution(proxy, kernel_id):
    code = "import time\nprint('started', flush=True)\nwhile True: time.sleep(0.05)"
    lines = [line for _, line in stream(proxy, {"id": kernel_id, "code": code, "timeout": 2})]
    assert lines[0] == {"type": "stdout", "text": "started\n"}
    result = lines[-1]
    assert result["type"] == "result" and result["status"] == "timeout"
    assert result["error"]["ename"] == "ExecutionTimeout"
    assert result["stdout"] == "started\n"
    assert execute(proxy, kernel_id, "1 + 1")["status"] == "ok"


def test_crash_ends_a_stream_with_a_crashed_result(proxy, kernel_id):
    code = "print('bye', flush=True); import os; os._exit(1)"
    lines = [line for _, line in stream(proxy, {"id": kernel_id, "code": code})]
    assert lines[-1]["type"] == "result"
    assert lines[-1]["status"] == "crashed"
    assert lines[-1]["error"]["ename"] == "KernelDied"
    assert execute(proxy, kernel_id, "1 + 1")["status"] == "ok"


def test_past_the_output_cap_only_the_result_line_comes(jupyter_server):
    with proxy_for(jupyter_server, "--workers", "1",
                   env={"JUPYTER_MAX_OUTPUT_BYTES": "20000"}) as capped:
        kernel = requests.post(f"{capped.url}/start_kernel", timeout=120).json()["id"]
        try:
            lines = [line for _, line in stream(capped, {
                "id": kernel,
                "code": "for i in range(300): print('x' * 100, flush=True)\n1 / 0"})]
        finally:
            requests.post(f"{capped.url}/shutdown_kernel", json={"id": kernel}, timeout=60)
    kinds = [line["type"] for line in lines]
    assert kinds[0] == "stdout" and kinds[-1] == "result", kinds
    assert "error" not in kinds  # past the cap, as every other line
    result = lines[-1]
    assert result["truncated"] is True
    assert result["status"] == "error" and result["error"]["ename"] == "ZeroDivisionError"
    assert 0 < len(result["stdout"]) < 20000


def test_errors_before_the_stream_starts_are_ordinary_json_errors(proxy, kernel_id):
    unknown = requests.post(f"{proxy.url}/execute_code", timeout=60, json={
        "id": "0b0c4f8e-7d41-4d5c-9a53-2f8a1c6b9e10", "code": "1", "stream": True})
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "kernel_not_found"
    bad = requests.post(f"{proxy.url}/execute_code", timeout=60,
                        json={"id": kernel_id, "code": "1", "stream": "yes"})
    assert bad.status_code == 400 and "stream" in bad.json()["details"]["fields"]
    both = requests.post(f"{proxy.url}/execute_code", timeout=60,
                         json={"id": kernel_id, "code": "1", "stream": True, "mode": "async"})
    assert both.status_code == 400 and "mode" in both.json()["details"]["fields"]


def test_client_that_drops_the_stream_gets_its_code_interrupted(proxy, kernel_id):
    execute(proxy, kernel_id, "kept = 'state'")
    body = json.dumps({"id": kernel_id, "code": "import time\nprint('running', flush=True)\n"
                       "while True: time.sleep(0.05)", "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as client:
        client.sendall(b"POST /execute_code HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       b"Content-Type: application/json\r\n"
                       b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while b"running" not in received:
            chunk = client.recv(4096)
            assert chunk, "the proxy closed the stream early"
            received += chunk
    # The client is gone while the kernel is silent: the proxy must notice and interrupt.
    started = time.monotonic()
    answer = execute(proxy, kernel_id, "kept")
    assert time.monotonic() - started < 15
    assert answer["status"] == "ok"
    assert answer["outputs"][0]["data"]["text/plain"] == "'state'"  # interrupted, not restarted
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        cancelled = [line for line in proxy.log_lines()
                     if line.get("message") == "code executed"
                     and line.get("status") == "cancelled"]
        if cancelled:
            break
        time.sleep(0.2)
    assert cancelled, "the dropped execution is logged as cancelled"


def raw_stream_request(proxy: ProxyProcess, body: dict, **socket_options) -> socket.socket:
    """Sends a streamed execute_code on a bare socket and returns it, unread."""
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    for option, value in socket_options.items():
        client.setsockopt(socket.SOL_SOCKET, getattr(socket, option), value)
    client.settimeout(30)
    client.connect(("127.0.0.1", proxy.port))
    payload = json.dumps({**body, "stream": True}).encode()
    client.sendall(b"POST /execute_code HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   b"Content-Type: application/json\r\n"
                   b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    return client


def test_headers_come_at_once_even_while_the_kernel_is_silent(proxy, kernel_id):
    started = time.monotonic()
    with requests.post(f"{proxy.url}/execute_code", stream=True, timeout=60, json={
            "id": kernel_id, "code": "import time; time.sleep(3); print('late')",
            "stream": True}) as response:
        assert response.status_code == 200
        assert time.monotonic() - started < 2, "the 200 must not wait for the first output"
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[0] == {"type": "stdout", "text": "late\n"}


def flood(lines: int) -> str:
    """Code that prints `lines` lines of 64 KiB at once, then loops silently for ever."""
    return (f"import sys, time\nfor _ in range({lines}): sys.stdout.write('x' * 65536 + '\\n')"
            "\nsys.stdout.flush()\nwhile True: time.sleep(0.05)")


def time_to_reach(proxy: ProxyProcess, kernel_id: str) -> float:
    """Seconds until another client's code runs on the kernel, which kept its state (`kept`)."""
    started = time.monotonic()
    answer = requests.post(f"{proxy.url}/execute_code", timeout=120, json={
        "id": kernel_id, "code": "kept", "timeout": 100}).json()
    assert answer["status"] == "ok", answer
    return time.monotonic() - started


def test_a_client_that_stops_reading_cannot_hold_the_kernel_past_the_deadline(proxy, kernel_id):
    execute(proxy, kernel_id, "kept = 1")
    # More output than the socket buffers hold, then a silent loop: the stream stalls on a
    # client that reads nothing, not on a backlog the kernel keeps growing.
    client = raw_stream_request(proxy, {"id": kernel_id, "code": flood(160), "timeout": 3},
                                SO_RCVBUF=4096)
    try:
        waited = time_to_reach(proxy, kernel_id)
        assert waited < 30, f"the stalled stream held the kernel {waited:.0f} s"
    finally:
        client.close()


def test_a_client_that_reads_slowly_cannot_hold_the_kernel_past_the_deadline(proxy, kernel_id):
    """Reading a little all the time never trips the per-write stall timeout; past the code's
    deadline (and its interrupt grace) a write gets a second at most. (More output than the
    cap and the socket buffers hold: the stream is still writing when the deadline passes.)"""
    execute(proxy, kernel_id, "kept = 1")
    client = raw_stream_request(proxy, {"id": kernel_id, "code": flood(200), "timeout": 3},
                                SO_RCVBUF=4096)
    stop = threading.Event()

    def read_slowly() -> None:  # about 16 KB/s: a 64 KiB write takes 4 s, well within 10 s
        with contextlib.suppress(OSError):
            while not stop.is_set() and client.recv(4096):
                time.sleep(0.25)

    reader = threading.Thread(target=read_slowly, daemon=True)
    reader.start()
    try:
        time.sleep(1)
        waited = time_to_reach(proxy, kernel_id)
        assert waited < 30, f"the slow reader held the kernel {waited:.0f} s"
    finally:
        stop.set()
        client.close()


def test_a_stream_abandoned_while_queued_never_runs_its_code(proxy, kernel_id):
    execute(proxy, kernel_id, "ran = False")
    first = threading.Thread(target=execute, args=(proxy, kernel_id,
                                                   "import time; time.sleep(4)"))
    first.start()
    time.sleep(1)
    client = raw_stream_request(proxy, {"id": kernel_id, "code": "ran = True"})
    time.sleep(1)
    client.close()  # gone while the kernel still runs the first code
    first.join(30)
    time.sleep(1)
    assert execute(proxy, kernel_id, "ran")["outputs"][0]["data"]["text/plain"] == "False"


class _FailingExecution:
    """An execution whose upstream breaks after one line."""

    closed = False

    def updates(self) -> Iterator[dict]:
        yield {"type": "stdout", "text": "partial\n"}
        raise ConnectionLost("the websocket to the kernel broke")

    def close(self) -> None:
        self.closed = True


class _BigExecution:
    closed = False

    def updates(self) -> Iterator[dict]:
        yield {"type": "result", "stdout": "x" * 300_000}

    def close(self) -> None:
        self.closed = True


def test_large_lines_are_written_in_pieces_so_a_slow_reader_is_not_a_stalled_one(app):
    """The stall timeout applies to each write: a big line goes out in 64 KiB writes."""
    with app.test_request_context():
        chunks = list(ndjson_response(_BigExecution()).response)
    assert max(len(chunk) for chunk in chunks) <= 64 * 1024
    assert json.loads(b"".join(chunks))["stdout"] == "x" * 300_000


def test_a_failure_after_the_200_ends_the_stream_with_a_failure_line(app):
    execution = _FailingExecution()
    with app.test_request_context():
        response = ndjson_response(execution)
        lines = [json.loads(line) for line in b"".join(response.response).splitlines()]
    assert lines[0] == {"type": "stdout", "text": "partial\n"}
    assert lines[1]["type"] == "failure"
    assert lines[1]["error"] == "upstream_connection_lost"
    assert "broke" in lines[1]["message"]
    assert execution.closed
