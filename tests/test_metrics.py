"""GET /metrics: Prometheus text, summed over every gunicorn worker, behind the API key."""

from __future__ import annotations

import re

import requests

KEY = "metrics-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value, from Prometheus' text format."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)", line)
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


def test_metrics_count_a_known_mix_across_workers(start_proxy, jupyter_server):
    proxy = start_proxy("--server-url", jupyter_server.url, "--workers", "2",
                        env={"JUPYTER_TOKEN": jupyter_server.token, "JUPYTER_PROXY_API_KEY": KEY})
    fresh = {**AUTH, "Connection": "close"}  # new connections: both workers take requests
    kernel_id = requests.post(f"{proxy.url}/start_kernel", headers=fresh, timeout=60).json()["id"]

    def execute(code: str, **extra) -> None:
        answer = requests.post(f"{proxy.url}/execute_code", headers=fresh, timeout=60,
                               json={"id": kernel_id, "code": code, **extra})
        assert answer.status_code == 200

    execute("1/0")
    execute("import time; time.sleep(5)", timeout=1)
    oks = 0
    while oks < 40:  # until both workers have counted some, so the sum spans processes
        execute("1")
        oks += 1
        workers = {line["pid"] for line in proxy.log_lines()
                   if line.get("message") == "code executed"}
        if oks >= 2 and len(workers) == 2:
            break
    assert len(workers) == 2
    requests.post(f"{proxy.url}/shutdown_kernel", json={"id": kernel_id}, headers=fresh,
                  timeout=60)

    assert requests.get(f"{proxy.url}/metrics", timeout=30).status_code == 401
    response = requests.get(f"{proxy.url}/metrics", headers=AUTH, timeout=30)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    found = samples(response.text)
    assert found['jupyter_proxy_executions_total{status="ok"}'] == oks
    assert found['jupyter_proxy_executions_total{status="error"}'] == 1
    assert found['jupyter_proxy_executions_total{status="timeout"}'] == 1
    assert found["jupyter_proxy_execution_seconds_count"] == oks + 2
    assert found['jupyter_proxy_kernels_started_total{source="new"}'] == 1
    assert found["jupyter_proxy_kernels_shut_down_total"] == 1
    executes = [v for k, v in found.items() if k.startswith("jupyter_proxy_request_seconds_count")
                and 'endpoint="/execute_code"' in k]
    assert sum(executes) == oks + 2
    assert found["jupyter_proxy_open_websockets"] >= 0


def test_upstream_errors_are_counted_by_kind(start_proxy, closed_port_url):
    proxy = start_proxy("--server-url", closed_port_url, "--workers", "1")
    assert requests.post(f"{proxy.url}/start_kernel", timeout=60).status_code == 503
    found = samples(requests.get(f"{proxy.url}/metrics", timeout=30).text)
    assert found['jupyter_proxy_upstream_errors_total{kind="upstream_unavailable"}'] == 1
