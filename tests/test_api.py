"""The HTTP API through the Flask app, against a real Jupyter server: answers and errors."""

from __future__ import annotations

import time
import uuid

import pytest

from app import create_app
from app.kernels.locks import private_directory
from tests.conftest import post

UNKNOWN_KERNEL = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"  # a well-formed id no server has


def assert_error(response, status: int, code: str) -> dict:
    """The contract's single error shape, with the expected status and code."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    assert set(body) <= {"error", "message", "details"}
    return body


# -- the four endpoints ---------------------------------------------------------------------

def test_health_answers_ok(http):
    response = http.get("/health")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ok"


def test_start_execute_shutdown(http):
    response = http.post("/start_kernel")
    assert response.status_code == 200
    kernel_id = response.get_json()["id"]
    assert str(uuid.UUID(kernel_id)) == kernel_id

    status, answer = post(http, "/execute_code", {"id": kernel_id, "code": "print('hello')"})
    assert status == 200
    assert answer["status"] == "ok"
    assert answer["stdout"] == "hello\n"

    status, answer = post(http, "/shutdown_kernel", {"id": kernel_id})
    assert (status, answer) == (200, {"message": f"Kernel {kernel_id} shutdown"})
    status, _ = post(http, "/execute_code", {"id": kernel_id, "code": "1"})
    assert status == 404


def test_start_kernel_with_named_spec_and_json_body(http, manager):
    status, answer = post(http, "/start_kernel", {"name": "python3"})
    assert status == 200
    assert answer["name"] == "python3"
    manager.shutdown_kernel(answer["id"])


def test_started_kernel_is_ready_at_once(http, manager):
    kernel_id = http.post("/start_kernel").get_json()["id"]
    try:
        started = time.monotonic()
        status, answer = post(http, "/execute_code", {"id": kernel_id, "code": "1 + 1"})
        # A kernel still starting takes hundreds of ms; a ready one answers at once.
        assert time.monotonic() - started < 2
        assert answer["outputs"][0]["data"]["text/plain"] == "2"
    finally:
        manager.shutdown_kernel(kernel_id)


def test_answer_carries_every_summary_field(http, shared_kernel):
    code = ("import sys\nprint('out')\nprint('err', file=sys.stderr)\n"
            "from IPython.display import display, HTML\ndisplay(HTML('<b>hi</b>'))\n21 * 2")
    status, answer = post(http, "/execute_code", {"id": shared_kernel, "code": code})
    assert status == 200
    assert set(answer) >= {"results", "status", "execution_count", "stdout", "stderr",
                           "outputs", "error", "truncated"}
    assert answer["status"] == "ok"
    assert isinstance(answer["execution_count"], int)
    assert answer["stdout"] == "out\n"
    assert answer["stderr"] == "err\n"
    assert answer["error"] is None
    assert answer["truncated"] is False
    assert [o["type"] for o in answer["outputs"]] == ["display_data", "execute_result"]
    assert answer["outputs"][0]["data"]["text/html"] == "<b>hi</b>"
    assert answer["outputs"][1]["data"]["text/plain"] == "42"


def test_results_are_this_requests_raw_messages(http, shared_kernel):
    _, answer = post(http, "/execute_code", {"id": shared_kernel, "code": "print(1)"})
    results = answer["results"]
    parents = {m["parent_header"]["msg_id"] for m in results}
    assert len(parents) == 1
    for message in results:
        assert {"header", "parent_header", "metadata", "content", "msg_type",
                "channel"} <= set(message)
    types = [m["msg_type"] for m in results]
    assert "execute_reply" in types and "stream" in types
    states = [m["content"]["execution_state"] for m in results if m["msg_type"] == "status"]
    assert states == ["busy", "idle"]  # iopub's own order; shell's reply may come anywhere


def test_exception_in_code_is_200_with_error(http, shared_kernel):
    status, answer = post(http, "/execute_code", {"id": shared_kernel, "code": "1/0"})
    assert status == 200
    assert answer["status"] == "error"
    assert answer["error"]["ename"] == "ZeroDivisionError"
    assert answer["error"]["evalue"] == "division by zero"
    assert any("ZeroDivisionError" in line for line in answer["error"]["traceback"])


def test_input_fails_at_once_instead_of_hanging(http, shared_kernel):
    started = time.monotonic()
    status, answer = post(http, "/execute_code",
                          {"id": shared_kernel, "code": "input('name? ')", "timeout": 20})
    assert time.monotonic() - started < 5
    assert status == 200
    assert answer["status"] == "error"
    assert answer["error"]["ename"] == "StdinNotImplementedError"


def test_state_persists_between_requests(http, kernel):
    post(http, "/execute_code", {"id": kernel, "code": "x = 41"})
    _, answer = post(http, "/execute_code", {"id": kernel, "code": "x + 1"})
    assert answer["outputs"][0]["data"]["text/plain"] == "42"


def test_kernel_started_elsewhere_is_usable_by_id(http, manager):
    kernel_id = manager.client.start_kernel("python3")["id"]  # straight on the server
    try:
        _, answer = post(http, "/execute_code", {"id": kernel_id, "code": "6 * 7"})
        assert answer["outputs"][0]["data"]["text/plain"] == "42"
    finally:
        manager.shutdown_kernel(kernel_id)


def test_timeout_interrupts_and_keeps_state(http, kernel):
    post(http, "/execute_code", {"id": kernel, "code": "y = 7"})
    started = time.monotonic()
    status, answer = post(http, "/execute_code", {
        "id": kernel, "code": "print('before', flush=True)\nimport time\ntime.sleep(60)",
        "timeout": 2})
    assert time.monotonic() - started < 10
    assert status == 200
    assert answer["status"] == "timeout"
    assert answer["stdout"] == "before\n"
    assert "interrupted" in answer["error"]["evalue"]
    _, answer = post(http, "/execute_code", {"id": kernel, "code": "y"})
    assert answer["outputs"][0]["data"]["text/plain"] == "7"


def test_kernel_death_is_reported_as_crashed_and_kernel_works_again(http, kernel):
    post(http, "/execute_code", {"id": kernel, "code": "x = 1"})
    started = time.monotonic()
    status, answer = post(http, "/execute_code",
                          {"id": kernel, "code": "import os; os._exit(1)", "timeout": 50})
    assert time.monotonic() - started < 15  # the server's restarter notices within seconds
    assert status == 200
    assert answer["status"] == "crashed"
    assert answer["error"]["ename"] == "KernelDied"
    assert "works again" in answer["error"]["evalue"]
    _, answer = post(http, "/execute_code", {"id": kernel, "code": "x"})
    assert answer["error"]["ename"] == "NameError"  # the state is gone, the kernel is back


# -- client errors -------------------------------------------------------------------------

@pytest.mark.parametrize("body, field", [
    ({"code": "1"}, "id"),
    ({"id": UNKNOWN_KERNEL}, "code"),
    ({"id": 5, "code": "1"}, "id"),
    ({"id": UNKNOWN_KERNEL, "code": 1}, "code"),
    ({"id": UNKNOWN_KERNEL, "code": None}, "code"),
    ({"id": "not-a-uuid", "code": "1"}, "id"),
    ({"id": "../../api/kernels", "code": "1"}, "id"),
    ({"id": UNKNOWN_KERNEL.upper(), "code": "1"}, "id"),
    ({"id": "{" + UNKNOWN_KERNEL + "}", "code": "1"}, "id"),
    ({"id": UNKNOWN_KERNEL, "code": "1", "timeout": 0}, "timeout"),
    ({"id": UNKNOWN_KERNEL, "code": "1", "timeout": -3}, "timeout"),
    ({"id": UNKNOWN_KERNEL, "code": "1", "timeout": "5"}, "timeout"),
    ({"id": UNKNOWN_KERNEL, "code": "1", "timeout": True}, "timeout"),
    ({"id": UNKNOWN_KERNEL, "code": "1", "timeout": None}, "timeout"),
    ({"id": UNKNOWN_KERNEL, "code": "1", "tiemout": 5}, "tiemout"),
    ({"id": UNKNOWN_KERNEL, "code": "1", "stream": 1}, "stream"),
    ({"id": UNKNOWN_KERNEL, "code": "1", "stream": "true"}, "stream"),
])
def test_execute_with_bad_fields_is_400_naming_the_field(http, body, field):
    body = assert_error(http.post("/execute_code", json=body), 400, "invalid_request")
    assert field in body["details"]["fields"]


def test_timeout_above_the_maximum_is_400(settings):
    http = create_app(settings.replace(max_execution_timeout=100,
                                       execution_timeout=50)).test_client()
    body = assert_error(http.post("/execute_code", json={
        "id": UNKNOWN_KERNEL, "code": "1", "timeout": 101}), 400, "invalid_request")
    assert "100" in body["message"]
    assert body["details"] == {"fields": {"timeout": [body["message"]]}}  # as other fields


@pytest.mark.parametrize("path", ["/execute_code", "/shutdown_kernel", "/start_kernel"])
@pytest.mark.parametrize("data", [b"{", b"[1, 2]", b'"text"', b"\xff\xfe", b"NaN"])
def test_body_that_is_not_a_json_object_is_400(http, path, data):
    response = http.post(path, data=data, content_type="application/json")
    assert_error(response, 400, "invalid_request")


def test_a_body_with_a_key_twice_is_400_naming_it(http, shared_kernel):
    """Parsers differ on which one wins (a filter in front may have read the other)."""
    data = f'{{"id": "{shared_kernel}", "code": "print(1)", "code": "print(2)"}}'
    response = http.post("/execute_code", data=data, content_type="application/json")
    body = assert_error(response, 400, "invalid_request")
    assert "'code' more than once" in body["message"]


def test_a_body_that_is_not_utf8_is_400_saying_so(http, shared_kernel):
    data = f'{{"id": "{shared_kernel}", "code": "print(\'caf\xe9\')"}}'.encode("latin-1")
    response = http.post("/execute_code", data=data,
                         content_type="application/json; charset=latin-1")
    body = assert_error(response, 400, "invalid_request")
    assert "not UTF-8" in body["message"]


def test_code_that_is_not_valid_unicode_is_400(http, shared_kernel):
    response = http.post("/execute_code", data=f'{{"id": "{shared_kernel}", "code": "\\ud800"}}',
                         content_type="application/json")
    body = assert_error(response, 400, "invalid_request")
    assert "code" in body["details"]["fields"]


def test_deeply_nested_json_is_400(http):
    data = '{"id": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert_error(http.post("/execute_code", data=data, content_type="application/json"), 400,
                 "invalid_request")


def test_execute_without_body_is_400(http):
    assert_error(http.post("/execute_code", content_type="application/json"), 400,
                 "invalid_request")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_body_that_is_not_declared_json_is_415(http, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = http.post("/execute_code", data=b'{"id": "x", "code": "1"}', headers=headers)
    assert_error(response, 415, "unsupported_media_type")


def test_json_with_charset_is_accepted(http, shared_kernel):
    response = http.post("/execute_code", data=f'{{"id": "{shared_kernel}", "code": "1"}}',
                         content_type="application/json; charset=utf-8")
    assert response.status_code == 200


def test_unknown_kernel_spec_is_400_listing_the_known_ones(http):
    body = assert_error(http.post("/start_kernel", json={"name": "cobol"}), 400,
                        "unknown_kernel_spec")
    assert "python3" in body["details"]["available"]


@pytest.mark.parametrize("path, body", [
    ("/execute_code", {"id": UNKNOWN_KERNEL, "code": "1"}),
    ("/shutdown_kernel", {"id": UNKNOWN_KERNEL}),
])
def test_unknown_kernel_is_404(http, settings, path, body):
    body = assert_error(http.post(path, json=body), 404, "kernel_not_found")
    assert UNKNOWN_KERNEL in body["message"]
    lock_file = private_directory(settings.server_url) / f"{UNKNOWN_KERNEL}.lock"
    assert not lock_file.exists(), "nothing is left behind for an id no server has"


def test_unknown_route_is_404_json(http):
    assert_error(http.get("/no/such/thing"), 404, "not_found")


@pytest.mark.parametrize("method, path", [("GET", "/start_kernel"), ("GET", "/execute_code"),
                                          ("PUT", "/shutdown_kernel"), ("POST", "/health"),
                                          ("OPTIONS", "/execute_code")])
def test_wrong_method_is_405_json(http, method, path):
    response = http.open(path, method=method)
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"]


def test_body_over_the_limit_is_413(settings):
    http = create_app(settings.replace(max_request_bytes=1000)).test_client()
    response = http.post("/execute_code", json={"id": UNKNOWN_KERNEL, "code": "x" * 2000})
    assert_error(response, 413, "request_too_large")


# -- API key ---------------------------------------------------------------------------------

@pytest.fixture
def keyed_http(settings):
    return create_app(settings.replace(proxy_api_key="old-key, new-key")).test_client()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "new-key"},
                                     {"Authorization": "Basic new-key"}])
def test_missing_or_wrong_api_key_is_401(keyed_http, headers):
    response = keyed_http.post("/start_kernel", headers=headers)
    body = assert_error(response, 401, "unauthorized")
    assert "new-key" not in body["message"]


@pytest.mark.parametrize("key", ["old-key", "new-key"])
def test_each_configured_api_key_is_accepted(keyed_http, key):
    response = keyed_http.post("/shutdown_kernel", json={"id": UNKNOWN_KERNEL},
                               headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 404  # past the key check, to the Jupyter server


def test_health_needs_no_key(keyed_http):
    assert keyed_http.get("/health").status_code == 200


# -- upstream faults ------------------------------------------------------------------------

ALL_CALLS = [
    ("/start_kernel", None),
    ("/execute_code", {"id": UNKNOWN_KERNEL, "code": "1"}),
    ("/shutdown_kernel", {"id": UNKNOWN_KERNEL}),
]


@pytest.mark.parametrize("path, body", ALL_CALLS)
def test_unreachable_upstream_is_503_quickly(settings, closed_port_url, path, body):
    http = create_app(settings.replace(server_url=closed_port_url)).test_client()
    started = time.monotonic()
    assert_error(http.post(path, json=body), 503, "upstream_unavailable")
    assert time.monotonic() - started < settings.timeout_connect + 5
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("path, body", ALL_CALLS)
def test_upstream_that_never_answers_is_504(settings, silent_upstream, path, body):
    http = create_app(settings.replace(server_url=silent_upstream, timeout_total=1,
                                       timeout_connect=1)).test_client()
    started = time.monotonic()
    assert_error(http.post(path, json=body), 504, "upstream_timeout")
    assert time.monotonic() - started < 10


def test_a_deadline_that_ends_during_a_stalled_handshake_is_a_timeout_answer(settings,
                                                                           silent_upstream):
    """The code's own timeout ran out while its websocket opened: the code did not run (an
    answer, 200), which is no fault of the server (504)."""
    http = create_app(settings.replace(server_url=silent_upstream,
                                       timeout_connect=5)).test_client()
    started = time.monotonic()
    response = http.post("/execute_code", json={"id": UNKNOWN_KERNEL, "code": "1",
                                                "timeout": 0.3})
    assert response.status_code == 200, response.get_json()
    answer = response.get_json()
    assert answer["status"] == "timeout" and "did not run" in answer["error"]["evalue"]
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("path, body", ALL_CALLS)
def test_upstream_that_is_not_jupyter_is_502(settings, html_upstream, path, body):
    http = create_app(settings.replace(server_url=html_upstream)).test_client()
    assert_error(http.post(path, json=body), 502, "bad_upstream_response")


@pytest.mark.parametrize("path, body", ALL_CALLS)
def test_wrong_upstream_token_is_502_without_the_token(settings, path, body):
    http = create_app(settings.replace(token="wrong-token-123")).test_client()
    response = http.post(path, json=body)
    body = assert_error(response, 502, "upstream_auth_failed")
    assert "JUPYTER_TOKEN" in body["message"]
    assert "wrong-token-123" not in response.get_data(as_text=True)
    assert settings.token not in response.get_data(as_text=True)
