"""The documented deployment, for real: nginx (Debian's package) with deploy/nginx-site.conf in
front of the gunicorn-served proxy, all on loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from app.embedded import free_port
from tests.conftest import REPO, wait_for_health

# nginx and its site are under test here, not the upstream: one kind of upstream is enough.
pytestmark = [pytest.mark.integration,
              pytest.mark.parametrize("jupyter_server", ["jupyter_server"], indirect=True)]

SITE = REPO / "deploy" / "nginx-site.conf"
KEY = "nginx-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAIN_CONFIG = """\
{user}
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/site.conf;
}}
"""


def nginx_binary() -> str:
    """nginx from Debian's packages, installed on first need where we may (root, apt)."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                      else None)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run("apt-get update -qq && apt-get install -y -qq nginx-light", shell=True,
                       env=env, capture_output=True, timeout=600)
        found = shutil.which("nginx") or "/usr/sbin/nginx"
    if found is None or not Path(found).exists():
        pytest.fail("these tests need nginx: apt-get install nginx-light (.ci/run does)")
    return found


@contextlib.contextmanager
def nginx_in_front_of(upstream_port: int, tmp: Path) -> Iterator[str]:
    """nginx with the deployed site, its upstream at `upstream_port`; yields nginx's URL."""
    port = free_port()
    site = SITE.read_text().replace("127.0.0.1:8000", f"127.0.0.1:{upstream_port}") \
        .replace("listen 80;", f"listen 127.0.0.1:{port};")
    (tmp / "site.conf").write_text(site)
    user = "user root root;" if os.geteuid() == 0 else ""
    (tmp / "nginx.conf").write_text(MAIN_CONFIG.format(tmp=tmp, user=user))
    nginx = subprocess.Popen([nginx_binary(), "-p", str(tmp), "-c", str(tmp / "nginx.conf")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:  # until nginx listens
            assert nginx.poll() is None, (tmp / "error.log").read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, "nginx did not listen within 30 s"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(30)


@pytest.fixture(scope="module")
def proxy_behind_nginx(jupyter_server, tmp_path_factory):
    """The real proxy (gunicorn) and nginx in front of it; yields nginx's URL."""
    from tests.conftest import ProxyProcess

    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_")}
    env["JUPYTER_TOKEN"] = jupyter_server.token
    env["JUPYTER_PROXY_API_KEY"] = KEY  # reached from the network: a key, as deployed
    proxy = ProxyProcess(["--server-url", jupyter_server.url, "--workers", "2",
                          "--env-file", "/dev/null"], env)
    try:
        proxy.wait_until_serving()
        tmp = tmp_path_factory.mktemp("nginx")
        with nginx_in_front_of(proxy.port, tmp) as url:
            wait_for_health(url, 30)
            yield url
    finally:
        proxy.stop()


def test_start_execute_shutdown_through_nginx(proxy_behind_nginx):
    url = proxy_behind_nginx
    with requests.Session() as client:  # keep-alive through nginx, as clients do
        client.headers.update(AUTH)
        assert requests.post(f"{url}/start_kernel", timeout=30).status_code == 401
        kernel_id = client.post(f"{url}/start_kernel", timeout=60).json()["id"]
        answer = client.post(f"{url}/execute_code", json={"id": kernel_id, "code": "6 * 7"},
                             headers={"X-Request-ID": "via-nginx"}, timeout=60)
        assert answer.status_code == 200
        assert answer.json()["outputs"][0]["data"]["text/plain"] == "42"
        assert answer.headers["X-Request-ID"] == "via-nginx"
        bad = client.post(f"{url}/execute_code", json={"id": "nope", "code": "1"}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"] == "invalid_request"
        done = client.post(f"{url}/shutdown_kernel", json={"id": kernel_id}, timeout=60)
        assert done.json() == {"message": f"Kernel {kernel_id} shutdown"}


def test_nginx_makes_up_a_request_id_when_the_client_sends_none(proxy_behind_nginx):
    answer = requests.get(f"{proxy_behind_nginx}/health", timeout=30)
    assert answer.status_code == 200
    assert len(answer.headers["X-Request-ID"]) == 32  # nginx's $request_id, kept by the proxy


def test_execution_longer_than_nginx_default_read_timeout(proxy_behind_nginx):
    # nginx gives up on a silent upstream after 60 s unless told otherwise; the site says more.
    url = proxy_behind_nginx
    kernel_id = requests.post(f"{url}/start_kernel", headers=AUTH, timeout=60).json()["id"]
    try:
        started = time.monotonic()
        answer = requests.post(f"{url}/execute_code", headers=AUTH, timeout=120, json={
            "id": kernel_id, "code": "import time; time.sleep(65); 'still here'"})
        assert time.monotonic() - started >= 65
        assert answer.status_code == 200
        assert answer.json()["outputs"][0]["data"]["text/plain"] == "'still here'"
    finally:
        requests.post(f"{url}/shutdown_kernel", json={"id": kernel_id}, headers=AUTH,
                      timeout=60)


def test_stream_lines_come_through_nginx_as_they_are_printed(proxy_behind_nginx):
    url = proxy_behind_nginx
    kernel_id = requests.post(f"{url}/start_kernel", headers=AUTH, timeout=60).json()["id"]
    code = "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.6)"
    try:
        arrivals = []
        with requests.post(f"{url}/execute_code", headers=AUTH, stream=True, timeout=60,
                           json={"id": kernel_id, "code": code, "stream": True}) as response:
            assert response.status_code == 200
            for line in response.iter_lines(chunk_size=1):
                if line:
                    arrivals.append((time.monotonic(), json.loads(line)))
        stdout = [t for t, line in arrivals if line["type"] == "stdout"]
        assert len(stdout) == 3
        assert all(b - a > 0.3 for a, b in zip(stdout, stdout[1:], strict=False)), \
            "nginx must pass each line on at once, not buffer the stream"
        assert arrivals[-1][1]["type"] == "result" and arrivals[-1][1]["status"] == "ok"
    finally:
        requests.post(f"{url}/shutdown_kernel", json={"id": kernel_id}, headers=AUTH,
                      timeout=60)


def test_client_dropping_a_stream_through_nginx_gets_its_code_interrupted(proxy_behind_nginx):
    url = proxy_behind_nginx
    kernel_id = requests.post(f"{url}/start_kernel", headers=AUTH, timeout=60).json()["id"]
    try:
        requests.post(f"{url}/execute_code", headers=AUTH, timeout=60,
                      json={"id": kernel_id, "code": "kept = 7"})
        with requests.post(f"{url}/execute_code", headers=AUTH, stream=True, timeout=60, json={
                "id": kernel_id, "stream": True,
                "code": "import time\nprint('go', flush=True)\nwhile True: time.sleep(0.05)"},
                ) as response:
            first = next(line for line in response.iter_lines(chunk_size=1) if line)
            assert json.loads(first) == {"type": "stdout", "text": "go\n"}
        # nginx closes its upstream connection when the client goes; the proxy interrupts.
        answer = requests.post(f"{url}/execute_code", headers=AUTH, timeout=60,
                               json={"id": kernel_id, "code": "kept", "timeout": 20}).json()
        assert answer["status"] == "ok"
        assert answer["outputs"][0]["data"]["text/plain"] == "7"
    finally:
        requests.post(f"{url}/shutdown_kernel", json={"id": kernel_id}, headers=AUTH,
                      timeout=60)


def test_a_body_over_nginx_limit_is_refused_in_json(proxy_behind_nginx):
    host, port = proxy_behind_nginx.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        # only the headers: nginx refuses on the announced length, before any body
        sock.sendall(b"POST /execute_code HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 11000000\r\n\r\n")
        answer = b""
        while b"}" not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"Content-Type: application/json" in head
    assert json.loads(body)["error"] == "request_too_large"


def test_nginx_answers_json_while_the_proxy_is_down(jupyter_server, tmp_path):  # (module mark)
    with nginx_in_front_of(free_port(), tmp_path) as url:  # nothing listens upstream
        answer = requests.get(f"{url}/health", timeout=30)
    assert answer.status_code == 502
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json()["error"] == "proxy_unavailable"
    assert "not answering" in answer.json()["message"]
