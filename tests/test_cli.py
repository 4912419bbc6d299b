"""The real `jupyter-kernel-proxy` command, served by gunicorn, driven over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from app.embedded import free_port
from app.kernels.locks import lock_directory
from tests.conftest import REPO, ProxyProcess, wait_for_health

pytestmark = pytest.mark.integration


def execute(url: str, kernel_id: str, code: str, key: str | None = None, **extra) -> dict:
    """POSTs an execution on a fresh connection (so that any worker may take it)."""
    headers = {"Connection": "close", **({"Authorization": f"Bearer {key}"} if key else {})}
    response = requests.post(f"{url}/execute_code", json={"id": kernel_id, "code": code, **extra},
                             headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pids: list[int], timeout: float = 30) -> list[int]:
    """The pids of `pids` still alive after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(process_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if process_alive(p)]


def embedded_server_pid(proxy: ProxyProcess) -> int:
    """The embedded Jupyter server's pid, as the proxy logged it (last)."""
    return [line["server_pid"] for line in proxy.log_lines()
            if line.get("message") == "embedded jupyter server ready"][-1]


def test_state_is_shared_by_every_worker(start_proxy, jupyter_server):
    proxy = start_proxy("--server-url", jupyter_server.url, "--workers", "2",
                        env={"JUPYTER_TOKEN": jupyter_server.token})
    kernel_id = requests.post(f"{proxy.url}/start_kernel", timeout=60).json()["id"]
    assert execute(proxy.url, kernel_id, "x = 41")["status"] == "ok"
    for _ in range(40):
        answer = execute(proxy.url, kernel_id, "x + 1")
        assert answer["outputs"][0]["data"]["text/plain"] == "42"
        workers = {line["pid"] for line in proxy.log_lines()
                   if line.get("message") == "code executed"}
        if len(workers) == 2:
            break
    assert len(workers) == 2, "every execution was served by one worker"
    response = requests.post(f"{proxy.url}/shutdown_kernel", json={"id": kernel_id}, timeout=30)
    assert response.json() == {"message": f"Kernel {kernel_id} shutdown"}


def test_logs_are_json_lines_without_the_token(start_proxy, jupyter_server):
    proxy = start_proxy("--server-url", jupyter_server.url, "--workers", "1",
                        env={"JUPYTER_TOKEN": jupyter_server.token})
    kernel_id = requests.post(f"{proxy.url}/start_kernel", timeout=60).json()["id"]
    execute(proxy.url, kernel_id, "print(1)")
    # A websocket to an unknown kernel makes the server answer with a page holding its token.
    requests.post(f"{proxy.url}/execute_code",
                  json={"id": "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b", "code": "1"}, timeout=30)
    requests.post(f"{proxy.url}/shutdown_kernel", json={"id": kernel_id}, timeout=30)
    proxy.stop()
    lines = proxy.log_lines()  # fails if any line is not JSON
    assert jupyter_server.token not in proxy.output()
    assert any(line["logger"].startswith("gunicorn") for line in lines)
    requests_logged = [line for line in lines if line["message"] == "request"]
    assert {"method", "path", "status", "duration_ms", "kernel_id"} <= set(requests_logged[-1])
    assert {line["status"] for line in requests_logged} >= {200, 404}
    for line in lines:
        assert line["timestamp"].endswith("+00:00")  # timezone-aware


def test_embedded_server_serves_and_leaves_nothing_behind(start_proxy):
    key = "api-key-the-kernel-must-not-see"
    proxy = start_proxy("--embedded", "--workers", "2", env={"JUPYTER_PROXY_API_KEY": key})
    kernel_id = requests.post(f"{proxy.url}/start_kernel", timeout=60,
                              headers={"Authorization": f"Bearer {key}"}).json()["id"]
    answer = execute(proxy.url, kernel_id, "import os; os.getpid()", key)
    kernel_pid = int(answer["outputs"][0]["data"]["text/plain"])
    # The embedded server's token is in no log line; the kernel must not find it (or the key)
    # anywhere in its environment.
    answer = execute(proxy.url, kernel_id, "import os; '\\n'.join(os.environ.values())", key)
    environment = answer["outputs"][0]["data"]["text/plain"]
    assert key not in environment and "JUPYTER_TOKEN" not in environment
    token_check = execute(proxy.url, kernel_id, "import os; sorted(k for k in os.environ "
                                                "if 'TOKEN' in k or 'API_KEY' in k)", key)
    assert token_check["outputs"][0]["data"]["text/plain"] == "[]"
    # Nor does it start next to the proxy's own files (its .env may hold the key).
    cwd = execute(proxy.url, kernel_id, "import os; os.getcwd()", key)
    assert str(REPO) not in cwd["outputs"][0]["data"]["text/plain"]
    server_pid = embedded_server_pid(proxy)
    assert process_alive(server_pid) and process_alive(kernel_pid)
    server_url = next(line["url"] for line in proxy.log_lines()
                      if line.get("message") == "embedded jupyter server ready")
    assert lock_directory(server_url).is_dir()  # executions took their kernel's lock

    assert proxy.stop(signal.SIGTERM) == 0
    assert wait_gone([server_pid, kernel_pid]) == []
    assert "embedded jupyter server stopped" in proxy.output()
    assert not lock_directory(server_url).exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_embedded_server_and_its_kernels_go_with_the_proxy(start_proxy, sig):
    # SIGINT: an orderly stop. SIGKILL: the proxy gets no say; the server dies with it anyway.
    proxy = start_proxy("--embedded", "--workers", "1")
    kernel_id = requests.post(f"{proxy.url}/start_kernel", timeout=60).json()["id"]
    kernel_pid = int(execute(proxy.url, kernel_id, "import os; os.getpid()")
                     ["outputs"][0]["data"]["text/plain"])
    server_pid = embedded_server_pid(proxy)
    proxy.stop(sig)
    assert wait_gone([server_pid, kernel_pid]) == []


def test_an_embedded_server_that_dies_is_started_again(start_proxy):
    proxy = start_proxy("--embedded", "--workers", "1", env={"JUPYTER_POOL_SIZE": "0"})
    kernel_id = requests.post(f"{proxy.url}/start_kernel", timeout=60).json()["id"]
    server_pid = embedded_server_pid(proxy)
    os.kill(server_pid, signal.SIGKILL)  # the OOM killer, say
    deadline = time.monotonic() + 90
    while True:
        answer = requests.post(f"{proxy.url}/start_kernel", timeout=60)
        if answer.status_code == 200:
            break
        assert answer.json()["error"] == "upstream_unavailable", answer.text  # meanwhile
        assert time.monotonic() < deadline, "the embedded server was not started again"
        time.sleep(0.5)
    assert embedded_server_pid(proxy) != server_pid
    assert execute(proxy.url, answer.json()["id"], "6 * 7")["outputs"][0]["data"] \
        ["text/plain"] == "42"
    gone = requests.post(f"{proxy.url}/execute_code", json={"id": kernel_id, "code": "1"},
                         timeout=60)
    assert gone.status_code == 404  # its kernels went with it
    assert "embedded jupyter server exited on its own; starting it again" in proxy.output()
    assert proxy.stop(signal.SIGTERM) == 0


def test_settings_come_from_a_dotenv_file(tmp_path, jupyter_server):
    (tmp_path / ".env").write_text(
        f"JUPYTER_SERVER_URL={jupyter_server.url}\nJUPYTER_TOKEN={jupyter_server.token}\n"
        "JUPYTER_PROXY_WORKERS=1\nJUPYTER_PROXY_THREADS=3\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_")}
    proxy = ProxyProcess(["--env-file", str(tmp_path / ".env")], env)
    try:
        proxy.wait_until_serving()
        response = requests.post(f"{proxy.url}/start_kernel", timeout=60)
        assert response.status_code == 200
        requests.post(f"{proxy.url}/shutdown_kernel", json=response.json(), timeout=30)
        booted = [line for line in proxy.log_lines()
                  if line["message"].startswith("Booting worker")]
        assert len(booted) == 1
    finally:
        proxy.stop()


def test_plain_gunicorn_with_the_config_file_logs_each_line_once(jupyter_server):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_")}
    env.update(JUPYTER_SERVER_URL=jupyter_server.url, JUPYTER_TOKEN=jupyter_server.token,
               JUPYTER_PROXY_BIND=f"127.0.0.1:{port}", JUPYTER_PROXY_WORKERS="1")
    gunicorn = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                                 "--access-logfile", "-"],
                                env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url)
        answer = requests.post(f"{url}/shutdown_kernel", headers={"X-Request-ID": "req-7"},
                               json={"id": "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"}, timeout=30)
        assert answer.headers["X-Request-ID"] == "req-7"
    finally:
        gunicorn.terminate()
        output = gunicorn.communicate(timeout=60)[0]
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]  # all JSON
    requests_logged = [entry for entry in lines if entry["message"] == "request"]
    assert [entry["path"] for entry in requests_logged].count("/shutdown_kernel") == 1
    access = [entry for entry in lines if entry["message"] == "access"
              and entry["path"] == "/shutdown_kernel"]
    assert access and access[0]["request_id"] == "req-7" and access[0]["status"] == 404
    assert access[0]["duration_ms"] >= 0
    assert jupyter_server.token not in output


@pytest.mark.parametrize("jupyter_server", ["jupyter_server"], indirect=True)  # proxy only
@pytest.mark.parametrize("size, status, code", [
    (1000, 404, "kernel_not_found"),  # exactly the limit: read (the kernel id is unknown)
    (1001, 413, "request_too_large"),
    (6000, 413, "request_too_large"),
])
def test_a_chunked_body_over_the_limit_is_413_and_one_at_it_is_read(start_proxy,
                                                                    jupyter_server, size,
                                                                    status, code):
    proxy = start_proxy("--server-url", jupyter_server.url, "--workers", "1",
                        env={"JUPYTER_TOKEN": jupyter_server.token,
                             "JUPYTER_MAX_REQUEST_BYTES": "1000"})
    body = b'{"id": "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b", "code": "1"}'
    body += b" " * (size - len(body))

    def chunks():
        for start in range(0, len(body), 500):
            yield body[start:start + 500]

    response = requests.post(f"{proxy.url}/execute_code", data=chunks(), timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == status
    assert response.json()["error"] == code


@pytest.mark.parametrize("jupyter_server", ["jupyter_server"], indirect=True)  # proxy only
@pytest.mark.parametrize("raw, status, code", [
    (b"NOT A REQUEST\r\n\r\n", 400, "bad_request"),
    (b"GET /health HTTP/1.1\r\nHost: localhost\r\nBad Header\r\n\r\n", 400, "bad_request"),
    (b"GET /" + b"x" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", 414, "uri_too_long"),
], ids=["request-line", "header", "long-uri"])
def test_requests_gunicorn_refuses_get_the_json_error_shape(start_proxy, jupyter_server, raw,
                                                            status, code):
    proxy = start_proxy("--server-url", jupyter_server.url, "--workers", "1",
                        env={"JUPYTER_TOKEN": jupyter_server.token})
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as client:
        client.sendall(raw)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:300]
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)
    assert error["error"] == code and error["message"]
    assert requests.get(f"{proxy.url}/health", timeout=30).status_code == 200


@pytest.mark.parametrize("jupyter_server", ["jupyter_server"], indirect=True)  # proxy only
@pytest.mark.parametrize("chunks", [b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabcXX0\r\n\r\n"],
                         ids=["bad-size", "no-terminator"])
def test_a_body_with_malformed_chunks_is_one_json_400(start_proxy, jupyter_server, chunks):
    proxy = start_proxy("--server-url", jupyter_server.url, "--workers", "1",
                        env={"JUPYTER_TOKEN": jupyter_server.token})
    raw = (b"POST /start_kernel HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
           b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as client:
        client.sendall(raw)
        answer = b""
        while chunk := client.recv(65536):  # until the proxy closes the connection
            answer += chunk
    assert answer.count(b"HTTP/1.1 ") == 1, answer  # one answer, then the connection closes
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert json.loads(body)["error"] == "bad_request"
    assert requests.get(f"{proxy.url}/health", timeout=30).status_code == 200
    assert not [line for line in proxy.log_lines() if line["level"] == "ERROR"]


@pytest.mark.parametrize("args, env, complaint", [
    ([], {"JUPYTER_TIMEOUT_TOTAL": "soon"}, "JUPYTER_TIMEOUT_TOTAL"),
    ([], {"JUPYTER_EXECUTION_TIMEOUT": "-1"}, "JUPYTER_EXECUTION_TIMEOUT"),
    ([], {"JUPYTER_PROXY_WORKERS": "abc"}, "JUPYTER_PROXY_WORKERS"),
    ([], {"JUPYTER_PROXY_BIND": "nowhere"}, "JUPYTER_PROXY_BIND"),
    (["--server-url", "ftp://example"], {}, "JUPYTER_SERVER_URL"),
    (["--log-level", "LOUD"], {}, "JUPYTER_LOG_LEVEL"),
    (["--embedded", "--server-url", "http://127.0.0.1:1"], {}, "--embedded"),
    (["--port", "70000"], {}, "--port"),
])
def test_bad_settings_stop_the_command_with_a_clear_message(args, env, complaint):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_")}
    full_env.update(env)
    done = subprocess.run([sys.executable, "-m", "app.cli", *args], env=full_env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert complaint in done.stderr
    assert "Traceback" not in done.stderr


def test_flask_run_serves_the_app_for_development(jupyter_server):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_")}
    env.update(JUPYTER_SERVER_URL=jupyter_server.url, JUPYTER_TOKEN=jupyter_server.token)
    flask = subprocess.Popen([sys.executable, "-m", "flask", "--app", "wsgi", "run",
                              "--port", str(port)], env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url)
        kernel_id = requests.post(f"{url}/start_kernel", timeout=60).json()["id"]
        assert execute(url, kernel_id, "2 ** 10")["outputs"][0]["data"]["text/plain"] == "1024"
        requests.post(f"{url}/shutdown_kernel", json={"id": kernel_id}, timeout=30)
    finally:
        flask.terminate()
        output = flask.communicate(timeout=30)[1].decode()
    assert jupyter_server.token not in output


def test_the_embedded_server_watcher_keeps_trying_until_a_start_works():
    from app.embedded import ServerProcess

    class Process:
        pid = 4242

        def __init__(self, alive: bool) -> None:
            self.alive = alive

        def poll(self):
            return None if self.alive else 1

        def send_signal(self, sig) -> None:
            self.alive = False

        def wait(self, timeout=None) -> int:
            return 1

    class Flaky(ServerProcess):
        starts = 0

        def start(self):
            self.starts += 1
            if self.starts < 4:  # the first start of the watcher, and two more, fail
                raise OSError("cannot start now")
            self.process = Process(alive=True)
            return self

    server = Flaky()
    server.process = Process(alive=False)  # it died
    server.supervise(interval=0.01)
    deadline = time.monotonic() + 10
    # (starts counts a start before it has its process: wait for the process itself)
    while server.process is None or not server.process.alive:
        assert time.monotonic() < deadline, f"gave up after {server.starts} starts"
        time.sleep(0.01)
    time.sleep(0.2)
    assert server.starts == 4 and server.process.alive  # and left alone once it runs
    server.stop()
    assert server.process is None
