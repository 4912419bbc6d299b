"""Unit tests of `app.kernels.client.JupyterClient`'s REST calls, against `responses` mocks
(and, once, a real closed loopback port).

Every mocked upstream body embeds the token, as a real Jupyter error page may: the proxy's
errors must never carry upstream text or the token.
"""

from __future__ import annotations

import contextlib
import socket
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import responses

from app.embedded import free_port
from app.kernels import client as client_module
from app.kernels.client import JupyterClient
from app.kernels.errors import (
    KernelError,
    KernelNotFound,
    KernelSpecNotFound,
    UpstreamAuthError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.settings import Settings

TOKEN = "s3cret-upstream-token-0123456789"
BASE = "http://jupyter.test:8888"
KERNEL_ID = "0b9c7e8e-2d7f-4a8e-9f1a-3c5b6d7e8f90"
LEAKY_BODY = f"<html>Forbidden: token {TOKEN} at {BASE}/api/kernels?token={TOKEN}</html>"
SPECS = {"default": "python3",
         "kernelspecs": {"python3": {"name": "python3"}, "ir": {"name": "ir"}}}


@pytest.fixture
def client():
    with JupyterClient(Settings(server_url=BASE, token=TOKEN)) as jupyter:
        yield jupyter


@pytest.fixture
def upstream():
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


def assert_no_leak(err: KernelError) -> None:
    """Neither the token nor any upstream text is in the error, however it is shown."""
    shown = [str(err), err.message, repr(err.details),
             "".join(traceback.format_exception(err))]
    for text in shown:
        assert TOKEN not in text
        assert "Forbidden" not in text
        assert "<html>" not in text


def raised_by(call, error_type: type[KernelError]) -> KernelError:
    """The error of `error_type` that `call()` raises, after checking it leaks nothing."""
    with pytest.raises(error_type) as caught:
        call()
    assert_no_leak(caught.value)
    return caught.value


# -- successful calls ------------------------------------------------------------------------

def test_token_is_sent_as_authorization_header(client, upstream):
    upstream.get(f"{BASE}/api/kernels", json=[])
    assert client.list_kernels() == []
    assert upstream.calls[0].request.headers["Authorization"] == f"token {TOKEN}"


def test_no_authorization_header_without_token(upstream):
    upstream.get(f"{BASE}/api/kernels", json=[])
    with JupyterClient(Settings(server_url=BASE)) as anonymous:
        anonymous.list_kernels()
    assert "Authorization" not in upstream.calls[0].request.headers


def test_server_url_path_prefix_is_kept(upstream):
    upstream.get(f"{BASE}/jupyter/api/kernels/{KERNEL_ID}", json={"id": KERNEL_ID})
    with JupyterClient(Settings(server_url=f"{BASE}/jupyter/")) as prefixed:
        assert prefixed.get_kernel(KERNEL_ID) == {"id": KERNEL_ID}


def test_start_kernel_checks_specs_then_posts_the_name(client, upstream):
    upstream.get(f"{BASE}/api/kernelspecs", json=SPECS)
    upstream.post(f"{BASE}/api/kernels", json={"id": KERNEL_ID, "name": "ir"},
                  match=[responses.matchers.json_params_matcher({"name": "ir"})])
    assert client.start_kernel("ir")["id"] == KERNEL_ID
    assert [c.request.method for c in upstream.calls] == ["GET", "POST"]


@pytest.mark.parametrize("env, body_env", [
    (None, None),
    ({"KERNEL_USERNAME": "alice"}, {"KERNEL_USERNAME": "alice", "KERNEL_ID": KERNEL_ID}),
], ids=["without-env", "with-env"])
def test_start_kernel_asks_for_the_id_it_is_given(client, upstream, env, body_env):
    # jupyter_server 2 and Kernel Gateway take `kernel_id`; Enterprise Gateway `env.KERNEL_ID`.
    upstream.get(f"{BASE}/api/kernelspecs", json=SPECS)
    body = {"name": "ir", "kernel_id": KERNEL_ID, **({"env": body_env} if body_env else {})}
    upstream.post(f"{BASE}/api/kernels", json={"id": KERNEL_ID, "name": "ir"},
                  match=[responses.matchers.json_params_matcher(body)])
    assert client.start_kernel("ir", env, kernel_id=KERNEL_ID)["id"] == KERNEL_ID


def test_unknown_kernel_spec_is_refused_without_posting(client, upstream):
    upstream.get(f"{BASE}/api/kernelspecs", json=SPECS)
    err = raised_by(lambda: client.start_kernel("julia"), KernelSpecNotFound)
    assert err.details["available"] == ["ir", "python3"]
    assert "julia" in err.message
    assert len(upstream.calls) == 1


def test_kernel_specs_are_cached(client, upstream):
    upstream.get(f"{BASE}/api/kernelspecs", json=SPECS)
    upstream.post(f"{BASE}/api/kernels", json={"id": KERNEL_ID})
    client.start_kernel("python3")
    client.start_kernel("python3")
    specs_calls = [c for c in upstream.calls if c.request.url.endswith("/api/kernelspecs")]
    assert len(specs_calls) == 1


def test_kernel_spec_cache_expires(client, upstream, monkeypatch):
    monkeypatch.setattr(client_module, "KERNELSPEC_CACHE_SECONDS", 0.0)
    upstream.get(f"{BASE}/api/kernelspecs", json=SPECS)
    client.kernelspecs()
    client.kernelspecs()
    assert len(upstream.calls) == 2


def test_start_answer_without_kernel_id_is_an_upstream_error(client, upstream):
    upstream.get(f"{BASE}/api/kernelspecs", json=SPECS)
    upstream.post(f"{BASE}/api/kernels", json={"message": LEAKY_BODY})
    raised_by(lambda: client.start_kernel("python3"), UpstreamError)


def test_unusable_kernel_spec_list_is_an_upstream_error(client, upstream):
    upstream.get(f"{BASE}/api/kernelspecs", json={"specs": LEAKY_BODY})
    raised_by(client.kernelspecs, UpstreamError)


@pytest.mark.parametrize("body", [[LEAKY_BODY], "", "[" * 100_000 + "]" * 100_000])
def test_a_kernel_model_that_is_not_one_is_an_upstream_error(client, upstream, body):
    """A list, nothing, or JSON nested too deeply to read."""
    upstream.get(f"{BASE}/api/kernels/{KERNEL_ID}",
                 **({"json": body} if isinstance(body, list) else {"body": body}))
    raised_by(lambda: client.get_kernel(KERNEL_ID), UpstreamError)


def test_shutdown_sends_delete_and_accepts_204(client, upstream):
    upstream.delete(f"{BASE}/api/kernels/{KERNEL_ID}", status=204)
    assert client.shutdown_kernel(KERNEL_ID) is None


# -- HTTP errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("call, method, path", [
    (lambda c: c.get_kernel(KERNEL_ID), "GET", f"/api/kernels/{KERNEL_ID}"),
    (lambda c: c.shutdown_kernel(KERNEL_ID), "DELETE", f"/api/kernels/{KERNEL_ID}"),
    (lambda c: c.interrupt_kernel(KERNEL_ID), "POST", f"/api/kernels/{KERNEL_ID}/interrupt"),
], ids=["get", "shutdown", "interrupt"])
def test_404_on_a_kernel_path_is_kernel_not_found(client, upstream, call, method, path):
    upstream.add(method, BASE + path, status=404, body=LEAKY_BODY)
    err = raised_by(lambda: call(client), KernelNotFound)
    assert err.details == {"kernel_id": KERNEL_ID}


def test_404_elsewhere_is_an_upstream_error(client, upstream):
    upstream.get(f"{BASE}/api/kernels", status=404, body=LEAKY_BODY)
    err = raised_by(client.list_kernels, UpstreamError)
    assert not isinstance(err, KernelNotFound)


@pytest.mark.parametrize("status", [401, 403])
def test_refused_token_is_an_auth_error(client, upstream, status):
    upstream.get(f"{BASE}/api/kernels/{KERNEL_ID}", status=status, body=LEAKY_BODY)
    err = raised_by(lambda: client.get_kernel(KERNEL_ID), UpstreamAuthError)
    assert "JUPYTER_TOKEN" in err.message
    assert err.details["upstream_status"] == status


@pytest.mark.parametrize("status", [500, 502, 400])
def test_other_error_status_is_an_upstream_error(client, upstream, status):
    upstream.get(f"{BASE}/api/kernels", status=status, body=LEAKY_BODY)
    err = raised_by(client.list_kernels, UpstreamError)
    assert f"HTTP {status}" in err.message
    assert err.details["upstream_status"] == status


def test_redirect_is_not_followed(client, upstream):
    upstream.get(f"{BASE}/api/kernels", status=302, body=LEAKY_BODY,
                 headers={"Location": f"http://elsewhere.test/?token={TOKEN}"})
    raised_by(client.list_kernels, UpstreamError)
    assert len(upstream.calls) == 1


def test_ok_answer_that_is_not_json_is_an_upstream_error(client, upstream):
    upstream.get(f"{BASE}/api/kernels", status=200, body=LEAKY_BODY, content_type="text/html")
    err = raised_by(client.list_kernels, UpstreamError)
    assert "not JSON" in err.message


# -- transport errors ------------------------------------------------------------------------

@pytest.mark.parametrize("raised, expected", [
    (requests.ConnectionError(f"refused {BASE}/?token={TOKEN}"), UpstreamUnavailable),
    (requests.ConnectTimeout(f"connect timeout {BASE}/?token={TOKEN}"), UpstreamUnavailable),
    (requests.ReadTimeout(f"read timeout {BASE}/?token={TOKEN}"), UpstreamTimeout),
], ids=["connection-error", "connect-timeout", "read-timeout"])
def test_transport_errors_become_kernel_errors(client, upstream, raised, expected):
    upstream.get(f"{BASE}/api/kernels/{KERNEL_ID}", body=raised)
    err = raised_by(lambda: client.get_kernel(KERNEL_ID), expected)
    assert err.details["request"] == f"GET /api/kernels/{KERNEL_ID}"


def test_read_timeout_names_the_configured_limit(upstream):
    upstream.get(f"{BASE}/api/kernels", body=requests.ReadTimeout("slow"))
    with JupyterClient(Settings(server_url=BASE, token=TOKEN, timeout_total=7)) as slow:
        err = raised_by(slow.list_kernels, UpstreamTimeout)
    assert "7 s" in err.message


def test_closed_port_is_unavailable_within_seconds():
    started = time.monotonic()
    with JupyterClient(Settings(server_url=f"http://127.0.0.1:{free_port()}",
                                token=TOKEN)) as down:
        raised_by(down.list_kernels, UpstreamUnavailable)
    assert time.monotonic() - started < 5


@pytest.fixture
def unreachable_url() -> Iterator[str]:
    """A server whose connections never complete: its backlog is full, so the SYNs of new
    ones go unanswered (as with a host that is down or cut off)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = []
    for _ in range(2):
        attempt = socket.socket()
        attempt.settimeout(0.5)
        with contextlib.suppress(OSError):
            attempt.connect(("127.0.0.1", port))
        queued.append(attempt)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for sock in (*queued, listener):
            sock.close()


def test_an_executions_questions_give_up_on_an_unreachable_server_within_seconds(
        unreachable_url):
    """The look-up, interrupt and restart of a running execution (at a deadline, in silence)
    must not wait JUPYTER_TIMEOUT_CONNECT per attempt: the answer would come long after its
    deadline."""
    from app.kernels.connections import ChannelCache
    from app.kernels.manager import CONTROL_CONNECT_SECONDS, _Kernel

    settings = Settings(server_url=unreachable_url, token=TOKEN, timeout_connect=10)
    with JupyterClient(settings) as client:
        kernel = _Kernel(client, ChannelCache(0), KERNEL_ID)
        started = time.monotonic()
        with ThreadPoolExecutor(3) as pool:
            calls = [pool.submit(raised_by, question, UpstreamUnavailable)
                     for question in (kernel.describe, kernel.interrupt, kernel.restart)]
            for call in calls:
                call.result()
    # three connection attempts each, with backoff; JUPYTER_TIMEOUT_CONNECT would be 30 s
    assert time.monotonic() - started < 3 * CONTROL_CONNECT_SECONDS + 3


def test_silent_server_is_a_timeout_not_unavailable(silent_upstream):
    started = time.monotonic()
    with JupyterClient(Settings(server_url=silent_upstream, token=TOKEN,
                                timeout_total=0.5)) as hanging:
        raised_by(hanging.list_kernels, UpstreamTimeout)
    assert time.monotonic() - started < 5


def test_a_failed_kernel_listing_is_asked_again(client, upstream):
    """jupyter_server can answer 500 while a kernel is being removed: a read is repeated."""
    upstream.get(f"{BASE}/api/kernels", status=500, body="busy")
    upstream.get(f"{BASE}/api/kernels", json=[{"id": KERNEL_ID}])
    assert client.list_kernels() == [{"id": KERNEL_ID}]
