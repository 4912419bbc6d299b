"""Limits a client can run into: code size, kernel count, executions queued for one kernel."""

from __future__ import annotations

import threading
import time

import pytest

from app import JupyterClient, KernelManager, create_app
from app.kernels import KernelBusy


def test_code_over_the_limit_is_413(settings, shared_kernel):
    http = create_app(settings.replace(max_code_bytes=100)).test_client()
    response = http.post("/execute_code", json={"id": shared_kernel, "code": "x" * 101})
    assert response.status_code == 413
    assert response.get_json()["error"] == "code_too_large"
    assert "JUPYTER_MAX_CODE_BYTES" in response.get_json()["message"]
    ok = http.post("/execute_code", json={"id": shared_kernel, "code": "1 + 1"})
    assert ok.status_code == 200


def test_kernels_past_the_limit_are_429_until_one_is_shut_down(settings, manager):
    running = len(manager.client.list_kernels())
    http = create_app(settings.replace(max_kernels=running + 1)).test_client()
    first = http.post("/start_kernel")
    assert first.status_code == 200
    refused = http.post("/start_kernel")
    assert refused.status_code == 429
    assert refused.get_json()["error"] == "too_many_kernels"
    assert "JUPYTER_MAX_KERNELS" in refused.get_json()["message"]
    http.post("/shutdown_kernel", json={"id": first.get_json()["id"]})
    again = http.post("/start_kernel")
    assert again.status_code == 200
    http.post("/shutdown_kernel", json={"id": again.get_json()["id"]})


def test_executions_past_the_queue_limit_are_refused_at_once(settings, kernel):
    with JupyterClient(settings.replace(max_queued_executions=1)) as client, \
            KernelManager(client) as limited:
        results: list[dict] = []
        running = threading.Thread(target=lambda: results.append(
            limited.execute_code(kernel, "import time; time.sleep(2); 'first'")))
        waiting = threading.Thread(target=lambda: results.append(
            limited.execute_code(kernel, "'second'")))
        running.start()
        time.sleep(0.3)
        waiting.start()
        time.sleep(0.3)
        started = time.monotonic()
        with pytest.raises(KernelBusy):
            limited.execute_code(kernel, "'third'")
        assert time.monotonic() - started < 1
        running.join(30)
        waiting.join(30)
        assert sorted(r["outputs"][0]["data"]["text/plain"] for r in results) == [
            "'first'", "'second'"]


def test_kernel_busy_is_a_429_over_http(settings, kernel):
    http = create_app(settings.replace(max_queued_executions=1)).test_client()
    app_manager = http.application.extensions["kernel_manager"]
    blockers = [threading.Thread(target=app_manager.execute_code,
                                 args=(kernel, "import time; time.sleep(1.5)")),
                threading.Thread(target=app_manager.execute_code, args=(kernel, "1"))]
    for blocker in blockers:
        blocker.start()
        time.sleep(0.3)
    response = http.post("/execute_code", json={"id": kernel, "code": "1"})
    for blocker in blockers:
        blocker.join(30)
    assert response.status_code == 429
    assert response.get_json()["error"] == "kernel_busy"
