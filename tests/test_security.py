"""Safe defaults: a keyless proxy answers only loopback Hosts and only listens on loopback;
request ids tie a client's request to every log line it caused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests

from app import create_app
from tests.conftest import REPO, ProxyProcess


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "10.0.0.5:8000",
                                  "localhost.evil.example"])
def test_keyless_proxy_refuses_requests_for_other_hosts(settings, host):
    http = create_app(settings).test_client()
    for response in (http.get("/health", headers={"Host": host}),
                     http.post("/start_kernel", headers={"Host": host})):
        assert response.status_code == 403
        assert response.get_json()["error"] == "host_not_allowed"
        assert "JUPYTER_PROXY_API_KEY" in response.get_json()["message"]


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:8000",
                                  "127.1.2.3", "[::1]:8000"])
def test_keyless_proxy_answers_loopback_hosts(settings, host):
    http = create_app(settings).test_client()
    assert http.get("/health", headers={"Host": host}).status_code == 200


def test_configured_hosts_and_keyed_proxies_answer_any_host(settings):
    allowed = create_app(settings.replace(allowed_hosts="proxy.internal")).test_client()
    assert allowed.get("/health", headers={"Host": "proxy.internal"}).status_code == 200
    assert allowed.get("/health", headers={"Host": "other.internal"}).status_code == 403
    keyed = create_app(settings.replace(proxy_api_key="k3y")).test_client()
    assert keyed.get("/health", headers={"Host": "anything.example"}).status_code == 200


def test_no_cors_headers(http):
    response = http.get("/health", headers={"Origin": "https://evil.example"})
    assert not [h for h in response.headers.keys() if h.lower().startswith("access-control")]


def test_request_id_is_returned_and_on_every_log_line_of_the_request(http, shared_kernel,
                                                                      log_stream):
    response = http.post("/execute_code", json={"id": shared_kernel, "code": "1"},
                         headers={"X-Request-ID": "trace-42"})
    assert response.headers["X-Request-ID"] == "trace-42"
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    tagged = [line for line in lines if line.get("request_id") == "trace-42"]
    assert {line["message"] for line in tagged} >= {"code executed", "request"}


@pytest.mark.parametrize("given", [None, "", "has spaces", "x" * 200, "quote\"s"])
def test_missing_or_odd_request_ids_are_replaced(http, given):
    headers = {"X-Request-ID": given} if given is not None else {}
    answered = http.get("/health", headers=headers).headers["X-Request-ID"]
    assert answered != given and len(answered) == 32


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "app.cli", "--env-file", "/dev/null", *args],
                          env=full_env, cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, env", [
    (["--host", "0.0.0.0"], {}),
    ([], {"JUPYTER_PROXY_BIND": "0.0.0.0:8000"}),
])
def test_network_address_without_a_key_is_refused(args, env):
    done = run_cli(*args, env=env)
    assert done.returncode == 2
    assert "JUPYTER_PROXY_API_KEY" in done.stderr and "--allow-unauthenticated" in done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
@pytest.mark.parametrize("entry_point", ["gunicorn.conf.py", "wsgi.py"])
def test_plain_entry_points_close_the_processes_environment_to_kernels(entry_point):
    """Non-dumpable (as the `jupyter-kernel-proxy` command makes itself): code of the same
    user (a kernel) cannot read /proc/<pid>/environ, where the API key and the token are."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_")}
    env["JUPYTER_SERVER_URL"] = "http://127.0.0.1:1"
    check = (f"import ctypes, runpy; runpy.run_path({entry_point!r}); "
             "print('dumpable', ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))")  # PR_GET_DUMPABLE
    done = subprocess.run([sys.executable, "-c", check], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines()[-1:] == ["dumpable 0"], done.stdout + done.stderr


def test_plain_gunicorn_refuses_a_network_address_without_a_key():
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_")}
    env["JUPYTER_PROXY_BIND"] = "0.0.0.0:8000"
    done = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "JUPYTER_PROXY_API_KEY" in done.stderr


@pytest.mark.parametrize("extra, env", [
    (["--allow-unauthenticated"], {}),
    ([], {"JUPYTER_PROXY_API_KEY": "s3cret-key"}),
])
def test_network_address_with_a_key_or_the_override_starts(jupyter_server, extra, env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_")}
    full_env.update(JUPYTER_TOKEN=jupyter_server.token, **env)
    proxy = ProxyProcess(["--server-url", jupyter_server.url, "--host", "0.0.0.0",
                          "--workers", "1", "--env-file", "/dev/null", *extra], full_env)
    try:
        proxy.wait_until_serving()
        assert requests.get(f"{proxy.url}/health", timeout=10).status_code == 200
    finally:
        proxy.stop()
    if extra:
        assert "WITHOUT AN API KEY" in proxy.output()
    assert "s3cret-key" not in proxy.output()


@pytest.mark.parametrize("headers, code", [
    ({"X-Forwarded-For": "203.0.113.9"}, "api_key_required"),
    ({"Forwarded": "for=203.0.113.9"}, "api_key_required"),
    ({"X-Real-IP": "203.0.113.9"}, "api_key_required"),
    ({"Origin": "https://evil.example"}, "cross_site_request"),
    ({"Origin": "null"}, "cross_site_request"),
    ({"Sec-Fetch-Site": "cross-site"}, "cross_site_request"),
])
def test_keyless_proxy_refuses_relayed_and_cross_site_requests(settings, headers, code):
    http = create_app(settings).test_client()
    response = http.post("/start_kernel", headers=headers)
    assert response.status_code == 403
    assert response.get_json()["error"] == code
    keyed = create_app(settings.replace(proxy_api_key="k3y")).test_client()
    assert keyed.post("/start_kernel", headers=headers).status_code == 401  # the key decides


@pytest.mark.parametrize("headers", [{"Origin": "https://evil.example"}, {"Origin": "null"},
                                     {"Sec-Fetch-Site": "cross-site"}])
def test_trusting_a_reverse_proxy_still_refuses_other_sites_pages(settings, headers):
    """With JUPYTER_ALLOW_UNAUTHENTICATED (nginx or a VPN authenticates clients), a page of
    another site would have the browser send those credentials along: still refused."""
    trusting = create_app(settings.replace(allow_unauthenticated=True)).test_client()
    response = trusting.post("/start_kernel", headers={**headers, "X-Forwarded-For": "10.1.2.3"})
    assert response.status_code == 403
    assert response.get_json()["error"] == "cross_site_request"


def test_keyless_proxy_serves_its_own_origin_and_trusted_relays(settings):
    http = create_app(settings).test_client()
    assert http.get("/health", headers={"Origin": "http://localhost:8000"}).status_code == 200
    trusting = create_app(settings.replace(allow_unauthenticated=True)).test_client()
    assert trusting.get("/health", headers={"X-Forwarded-For": "10.1.2.3"}).status_code == 200


@pytest.mark.parametrize("encoding", ["chunked", "gzip, chunked", "identity, chunked"])
def test_any_transfer_encoded_body_must_be_json(settings, encoding):
    http = create_app(settings).test_client()
    response = http.post("/start_kernel", data=b"{}", headers={
        "Transfer-Encoding": encoding, "Content-Type": "text/plain"})
    assert response.status_code == 415


@pytest.mark.parametrize("method, path", [
    ("POST", "/start_kernel"), ("POST", "/execute_code"), ("POST", "/shutdown_kernel"),
    ("GET", "/metrics"), ("GET", "/no/such/route"), ("POST", "/health/")])
def test_every_endpoint_but_health_needs_the_key(settings, method, path):
    keyed = create_app(settings.replace(proxy_api_key="k3y")).test_client()
    response = keyed.open(path, method=method, json={})
    assert response.status_code == 401
    assert response.get_json()["error"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"  # says how to authenticate


def test_plain_gunicorn_refuses_a_network_bind_given_on_its_command_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_")}
    done = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                           "-b", "0.0.0.0:18999"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    assert "JUPYTER_PROXY_API_KEY" in done.stderr
