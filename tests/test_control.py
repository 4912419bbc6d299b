"""Kernel control endpoints against a real Jupyter server: interrupt, restart, list, specs."""

from __future__ import annotations

import threading
import time

from app import create_app
from tests.conftest import post

UNKNOWN = "0b0c4f8e-7d41-4d5c-9a53-2f8a1c6b9e10"


def test_interrupt_stops_running_code_and_the_kernel_keeps_its_state(http, kernel):
    assert post(http, "/execute_code", {"id": kernel, "code": "kept = 42"})[0] == 200
    answers: list = []
    runner = threading.Thread(target=lambda: answers.append(post(http, "/execute_code", {
        "id": kernel, "code": "import time\nwhile True: time.sleep(0.05)", "timeout": 60})))
    runner.start()
    time.sleep(1.0)  # let it start
    started = time.monotonic()
    status, body = post(http, "/interrupt_kernel", {"id": kernel})
    assert status == 200 and body["id"] == kernel
    runner.join(30)
    assert not runner.is_alive(), "the interrupted execution must answer"
    assert time.monotonic() - started < 10
    [(status, answer)] = answers
    assert status == 200
    assert answer["status"] == "error"
    assert answer["error"]["ename"] == "KeyboardInterrupt"
    assert post(http, "/execute_code", {"id": kernel, "code": "kept"})[1]["outputs"][0][
        "data"]["text/plain"] == "42"


def test_restart_loses_the_state_and_says_so(http, kernel):
    post(http, "/execute_code", {"id": kernel, "code": "gone = 1"})
    status, body = post(http, "/restart_kernel", {"id": kernel})
    assert status == 200
    assert body["state_lost"] is True and body["id"] == kernel
    assert "gone" in body["message"] or "lost" in body["message"]
    status, answer = post(http, "/execute_code", {"id": kernel, "code": "gone"})
    assert status == 200 and answer["status"] == "error"
    assert answer["error"]["ename"] == "NameError"
    assert post(http, "/execute_code", {"id": kernel, "code": "1 + 1"})[1]["status"] == "ok"


def test_control_of_an_unknown_or_malformed_kernel_is_a_clear_error(http):
    for path in ("/interrupt_kernel", "/restart_kernel"):
        status, body = post(http, path, {"id": UNKNOWN})
        assert (status, body["error"]) == (404, "kernel_not_found")
        status, body = post(http, path, {"id": "../api/kernels"})
        assert (status, body["error"]) == (400, "invalid_request")
        assert "id" in body["details"]["fields"]
        response = http.post(path, data="id=1", content_type="text/plain")
        assert response.status_code == 415


def test_kernels_lists_the_servers_kernels_with_their_state(http, kernel):
    response = http.get("/kernels")
    assert response.status_code == 200
    listed = {k["id"]: k for k in response.get_json()["kernels"]}
    assert kernel in listed
    entry = listed[kernel]
    assert entry["name"] == "python3"
    assert entry["execution_state"] in ("idle", "busy", "starting")
    assert isinstance(entry["last_activity"], str)
    assert set(entry) == {"id", "name", "execution_state", "last_activity", "connections"}


def test_kernel_listing_can_be_turned_off(settings):
    http = create_app(settings.replace(list_kernels=False)).test_client()
    response = http.get("/kernels")
    assert response.status_code == 403
    assert response.get_json()["error"] == "kernel_listing_disabled"
    assert "JUPYTER_LIST_KERNELS" in response.get_json()["message"]


def test_kernelspecs_names_the_default_and_what_each_spec_runs(http):
    response = http.get("/kernelspecs")
    assert response.status_code == 200
    body = response.get_json()
    assert body["default"] in body["kernelspecs"]
    python = body["kernelspecs"]["python3"]
    assert python["name"] == "python3" and python["language"] == "python"
    assert python["display_name"]


def test_control_endpoints_need_the_api_key_when_one_is_set(settings, kernel):
    http = create_app(settings.replace(proxy_api_key="k" * 32)).test_client()
    for method, path, body in (("post", "/interrupt_kernel", {"id": kernel}),
                               ("post", "/restart_kernel", {"id": kernel}),
                               ("get", "/kernels", None), ("get", "/kernelspecs", None)):
        response = getattr(http, method)(path, json=body)
        assert response.status_code == 401, path


def test_restart_while_code_runs_answers_that_code_honestly(http, kernel):
    answers: list = []
    runner = threading.Thread(target=lambda: answers.append(post(http, "/execute_code", {
        "id": kernel, "code": "import time; time.sleep(30)", "timeout": 60})))
    runner.start()
    time.sleep(1.5)
    assert post(http, "/restart_kernel", {"id": kernel})[0] == 200
    runner.join(40)
    [(status, answer)] = answers
    assert status == 200
    assert answer["status"] == "crashed"
    assert answer["error"]["ename"] == "KernelRestarted", answer["error"]
    assert "state is lost" in answer["error"]["evalue"]
