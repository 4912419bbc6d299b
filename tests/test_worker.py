"""The gunicorn worker class (`app/worker.py`): recycling after `max_requests` never cuts an
execution short nor stops the proxy serving; job-running tests of it are in test_jobs.py.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import requests

from app.worker import _MethodQueue
from tests.conftest import proxy_for


@pytest.mark.parametrize("jupyter_server", ["jupyter_server"], indirect=True)  # worker only
def test_a_worker_due_for_recycling_lets_a_long_execution_finish_and_keeps_serving(
        jupyter_server, tmp_path):
    config = tmp_path / "gunicorn.conf.py"
    # gunicorn's own recycling stopped taking requests at once, and gave the execution
    # `graceful_timeout` (16 s here) and then `timeout` (5 s) before killing the worker.
    config.write_text("max_requests = 3\nmax_requests_jitter = 0\ntimeout = 5\n")
    with proxy_for(jupyter_server, "--workers", "1", "--gunicorn-config", str(config),
                   env={"JUPYTER_EXECUTION_TIMEOUT": "1"}) as proxy:
        kernel = requests.post(f"{proxy.url}/start_kernel", timeout=120).json()["id"]
        answer: dict = {}

        def execute() -> None:
            answer.update(requests.post(f"{proxy.url}/execute_code", timeout=120, json={
                "id": kernel, "code": "import time\ntime.sleep(25)\nprint('end')",
                "timeout": 60}).json())

        thread = threading.Thread(target=execute)
        thread.start()
        time.sleep(1)
        worker = {line["pid"] for line in proxy.log_lines()
                  if line.get("message") == "request"}
        for _ in range(4):  # past max_requests while the execution runs
            started = time.monotonic()
            health = requests.get(f"{proxy.url}/health", timeout=30,
                                  headers={"Connection": "close"})
            assert health.ok and time.monotonic() - started < 2
        thread.join(60)
        assert answer["status"] == "ok", answer
        assert answer["stdout"] == "end\n"
        deadline = time.monotonic() + 30
        served: set = set()
        while time.monotonic() < deadline and not served - worker:
            requests.get(f"{proxy.url}/health", timeout=30, headers={"Connection": "close"})
            served = {line["pid"] for line in proxy.log_lines()
                      if line.get("message") == "request"}
            time.sleep(0.2)
        assert served - worker, "the worker was recycled once the execution was done"
        requests.post(f"{proxy.url}/shutdown_kernel", json={"id": kernel}, timeout=60)


def test_the_wake_up_pipe_is_not_written_once_closed():
    """A request thread ending after the worker's loop closed its pipe must not write to the
    descriptor number, which may belong to something else by then (a job's SQLite file)."""
    queue = _MethodQueue()
    queue.init()
    old_write_fd = queue._write_fd
    queue.close()
    read_fd, write_fd = os.pipe()  # likely reuses the numbers just freed
    try:
        queue.defer(lambda: None)
        os.set_blocking(read_fd, False)
        if write_fd == old_write_fd:
            try:
                assert os.read(read_fd, 1) == b"", "the closed queue wrote to a reused fd"
            except BlockingIOError:
                pass  # nothing written: right
        assert queue._queue.empty()
    finally:
        os.close(read_fd)
        os.close(write_fd)
