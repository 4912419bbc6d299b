"""Faults a client meets for real: runaway code, huge output, dead kernels, a Jupyter server
that goes away and comes back, connections cut mid-cell, concurrent clients, a stopping proxy.
Each answer must come quickly and truthfully, and the service must keep working after.

Every fault is met in both websocket encodings (`app/kernels/protocol.py`): v1, which
jupyter_server 2 and Kernel Gateway 3 choose, and JSON, which older servers and gateways speak.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from app import JupyterClient, KernelManager, Settings, create_app
from app.embedded import EmbeddedJupyterServer, free_port
from tests.conftest import _shutdown, post, proxy_for
from tests.forwarder import TcpForwarder
from tests.gateway import KernelGatewayServer


@pytest.fixture(scope="module", params=["v1", "json"])
def encoding(request) -> str:
    """The websocket encoding the proxy speaks in this module's run."""
    return request.param


@pytest.fixture(scope="module")
def settings(settings, encoding):
    return settings.replace(websocket_protocol=encoding)


@pytest.fixture(scope="module")
def manager(settings):
    with JupyterClient(settings) as client:
        yield KernelManager(client)


@pytest.fixture(scope="module")
def shared_kernel(manager):
    kernel_id = manager.start_kernel()["id"]
    yield kernel_id
    _shutdown(manager, kernel_id)




def run(http, kernel_id: str, code: str, **extra) -> dict:
    status, answer = post(http, "/execute_code", {"id": kernel_id, "code": code, **extra})
    assert status == 200, answer
    return answer


def value(answer: dict) -> str:
    return answer["outputs"][0]["data"]["text/plain"]


def test_the_proxy_speaks_the_encoding_under_test(manager, kernel, encoding):
    assert manager.execute_code(kernel, "1")["status"] == "ok"
    channel = manager._channels.take(kernel)  # the warm websocket the execution used
    assert channel is not None and channel.v1 is (encoding == "v1")
    channel.close()


# -- runaway code ---------------------------------------------------------------------------

def test_busy_loop_is_interrupted_at_its_deadline_and_state_is_kept(http, kernel):
    run(http, kernel, "y = 7")
    started = time.monotonic()
    answer = run(http, kernel, "while True:\n    pass", timeout=2)
    assert time.monotonic() - started < 8
    assert answer["status"] == "timeout"
    assert "interrupted and keeps its state" in answer["error"]["evalue"]
    assert value(run(http, kernel, "y")) == "7"


def test_kernel_that_ignores_interrupts_is_restarted(http, kernel):
    code = ("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "print('stubborn', flush=True)\ntime.sleep(120)")
    run(http, kernel, "z = 1")
    started = time.monotonic()
    answer = run(http, kernel, code, timeout=2)
    assert time.monotonic() - started < 30
    assert answer["status"] == "timeout"
    assert "restarted" in answer["error"]["evalue"]
    assert answer["stdout"] == "stubborn\n"
    answer = run(http, kernel, "z")  # a fresh kernel under the same id
    assert answer["error"]["ename"] == "NameError"


def test_an_execution_queued_behind_a_restart_at_a_deadline_gets_all_its_output(manager,
                                                                                 kernel):
    """The next execution must not go out before the restarted kernel's output reaches the
    proxy: the server drops what the new process publishes before its subscription is up
    (only the reply came, with `truncated: false`)."""
    code = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)"
    for _ in range(3):
        with ThreadPoolExecutor(1) as pool:
            stubborn = pool.submit(manager.execute_code, kernel, code, timeout=1)
            time.sleep(0.3)
            queued = manager.execute_code(kernel, "print('next')", timeout=60)
        assert stubborn.result()["status"] == "timeout"
        assert "restarted" in stubborn.result()["error"]["evalue"]
        assert (queued["status"], queued["stdout"]) == ("ok", "next\n"), queued


@pytest.mark.parametrize("code", ["input()", "import getpass; getpass.getpass()"])
def test_code_asking_for_input_fails_at_once(http, shared_kernel, code):
    started = time.monotonic()
    answer = run(http, shared_kernel, code, timeout=30)
    assert time.monotonic() - started < 5
    assert answer["status"] == "error"
    assert answer["error"]["ename"] == "StdinNotImplementedError"


# -- output -----------------------------------------------------------------------------

def test_five_thousand_prints_arrive_complete_and_in_order(http, shared_kernel):
    answer = run(http, shared_kernel, "for i in range(5000):\n    print(i)")
    assert answer["stdout"] == "".join(f"{i}\n" for i in range(5000))
    assert answer["truncated"] is False


def test_thirty_megabyte_print_is_capped_and_the_kernel_survives(settings, kernel):
    http = create_app(settings.replace(max_output_bytes=1024 * 1024)).test_client()
    answer = run(http, kernel, "print('x' * 30_000_000)\nprint('after')", timeout=60)
    assert answer["status"] == "ok"
    assert answer["truncated"] is True
    assert answer["stdout"].startswith("x" * 1000)
    assert len(answer["stdout"]) <= 1024 * 1024
    assert value(run(http, kernel, "6 * 7")) == "42"


@pytest.mark.parametrize("server_class", [EmbeddedJupyterServer, KernelGatewayServer],
                         ids=["jupyter_server", "kernel_gateway"])  # EG has no rate limit
def test_output_dropped_by_the_servers_rate_limit_is_reported_as_truncated(server_class,
                                                                          encoding):
    with server_class(limit_rate=True) as server:
        limited = Settings(server_url=server.url, token=server.token,
                           websocket_protocol=encoding)
        http = create_app(limited).test_client()
        kernel_id = http.post("/start_kernel").get_json()["id"]
        answer = run(http, kernel_id, "print('x' * 30_000_000)", timeout=60)
        assert answer["truncated"] is True
        assert "IOPub data rate exceeded" in answer["stderr"]


# -- dead kernels ---------------------------------------------------------------------------

def test_segfault_is_reported_as_crashed_within_seconds(http, kernel):
    started = time.monotonic()
    answer = run(http, kernel, "import ctypes; ctypes.string_at(0)", timeout=60)
    assert time.monotonic() - started < 15
    assert answer["status"] == "crashed"
    assert "did not run" not in answer["error"]["evalue"]  # it did: it crashed the kernel
    assert value(run(http, kernel, "1 + 1")) == "2"


def shut_down_during(http, manager, code: str, after: float) -> tuple[dict, float]:
    """Runs `code` through `http` on a new kernel that is shut down `after` seconds in; returns
    the answer and how long it came after the shutdown."""
    kernel_id = manager.start_kernel()["id"]
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(
        run(http, kernel_id, code, timeout=120)))
    thread.start()
    time.sleep(after)
    started = time.monotonic()
    manager.shutdown_kernel(kernel_id)
    thread.join(60)
    assert not thread.is_alive()
    return result, time.monotonic() - started


def test_kernel_shut_down_mid_cell_is_reported_at_once(http, manager):
    result, seconds = shut_down_during(http, manager, "import time; time.sleep(60)", after=1)
    assert seconds < 10
    assert result["status"] == "crashed"
    assert "shut down" in result["error"]["evalue"]


def test_kernel_that_died_and_was_shut_down_before_the_server_noticed_is_reported(http,
                                                                                  manager):
    # The server notices a death within ~3 s; deleted before that, the kernel says nothing more
    # and its websocket stays open: the proxy must find out by itself, well before the deadline.
    result, seconds = shut_down_during(
        http, manager, "import os, time; time.sleep(0.5); os._exit(1)", after=0.8)
    assert seconds < 20
    assert result["status"] == "crashed"
    # Gone, however the proxy learnt it (a look-up; or the server noticed the death first).
    assert "gone" in result["error"]["evalue"]


# -- the Jupyter server goes away and comes back -----------------------------------------------

def test_server_stopped_then_restarted_is_503_then_served_again(settings, upstream_class):
    port = free_port()
    server = upstream_class(port=port).start()
    app_settings = settings.replace(server_url=server.url, token=server.token, timeout_connect=2)
    http = create_app(app_settings).test_client()
    kernel_id = http.post("/start_kernel").get_json()["id"]
    assert value(run(http, kernel_id, "1 + 1")) == "2"  # warm pooled connections exist now

    server.stop()
    for path, body in [("/start_kernel", None), ("/execute_code", {"id": kernel_id, "code": "1"}),
                       ("/shutdown_kernel", {"id": kernel_id})]:
        started = time.monotonic()
        response = http.post(path, json=body)
        assert response.status_code == 503, response.get_json()
        assert time.monotonic() - started < app_settings.timeout_connect * 3 + 5

    server = upstream_class(port=port, token=server.token).start()
    try:
        kernel_id = http.post("/start_kernel").get_json()["id"]
        assert value(run(http, kernel_id, "2 + 2")) == "4"
    finally:
        server.stop()


# -- connections cut mid-cell ------------------------------------------------------------------

@pytest.fixture
def forwarder(jupyter_server):
    forwarder = TcpForwarder(int(jupyter_server.url.rsplit(":", 1)[1]))
    yield forwarder
    forwarder.close()


PRINT_ACROSS_THE_CUT = ("import time\nfor i in range(40):\n    print(i, flush=True)\n"
                        "    time.sleep(0.05)\n'done'")
ALL_LINES = "".join(f"{i}\n" for i in range(40))


def cut_during(http, forwarder, kernel_id: str, code: str, after: float = 1.0,
               frozen_for: float = 0.0) -> dict:
    """Runs `code` through `http` and cuts every upstream connection `after` seconds in (after
    holding what is on the wire for `frozen_for` seconds: a cut then loses it).
    """
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run(http, kernel_id, code,
                                                               timeout=30)))
    thread.start()
    time.sleep(after)
    if frozen_for:
        forwarder.freeze()
        time.sleep(frozen_for)
    assert forwarder.cut() >= 1
    thread.join(30)
    return result


def printed(result: dict) -> list[int]:
    """The numbers PRINT_ACROSS_THE_CUT printed that arrived: in order, none twice."""
    lines = [int(n) for n in result["stdout"].split()]
    assert lines == sorted(set(lines)) and set(lines) <= set(range(40))
    return lines


def test_connection_cut_mid_cell_loses_nothing_unnoticed(settings, forwarder):
    http = create_app(settings.replace(server_url=forwarder.url)).test_client()
    kernel_id = http.post("/start_kernel").get_json()["id"]  # the proxy's is the only websocket
    try:
        result = cut_during(http, forwarder, kernel_id, PRINT_ACROSS_THE_CUT)
        assert result["status"] == "ok"
        assert value(result) == "'done'"
        # The server replays what it buffered once it saw the break; a line that was on the
        # wire at that moment is gone, and the answer says so.
        lines = printed(result)
        assert len(lines) >= 36, lines
        assert result["truncated"] is (len(lines) < 40)
        assert value(run(http, kernel_id, "3 * 3")) == "9"
    finally:
        http.post("/shutdown_kernel", json={"id": kernel_id})


def test_output_on_the_wire_when_the_connection_broke_is_reported_lost(settings, forwarder):
    http = create_app(settings.replace(server_url=forwarder.url)).test_client()
    kernel_id = http.post("/start_kernel").get_json()["id"]
    try:
        result = cut_during(http, forwarder, kernel_id, PRINT_ACROSS_THE_CUT, frozen_for=0.5)
        assert result["status"] == "ok"
        assert value(result) == "'done'"
        lines = printed(result)
        assert lines[0] == 0 and lines[-1] == 39  # before the cut, and the replay after it
        assert len(lines) < 40
        assert result["truncated"] is True
    finally:
        http.post("/shutdown_kernel", json={"id": kernel_id})


def test_connection_cut_while_others_watch_the_kernel_says_output_may_be_lost(
        settings, forwarder, kernel):
    # `kernel` comes from another manager that keeps its own websocket to it: the server then
    # keeps nothing for the reconnecting session.
    http = create_app(settings.replace(server_url=forwarder.url)).test_client()
    result = cut_during(http, forwarder, kernel, PRINT_ACROSS_THE_CUT)
    assert result["status"] == "ok"
    assert value(result) == "'done'"
    lines = printed(result)
    assert result["truncated"] is (len(lines) < 40)  # printed during the break: sent to the other


def test_connection_that_cannot_be_reopened_is_a_clear_error_and_kernel_stays_usable(
        settings, forwarder, kernel, http):
    proxied = create_app(settings.replace(server_url=forwarder.url)).test_client()
    result: dict = {}

    def execute() -> None:
        response = proxied.post("/execute_code", json={
            "id": kernel, "code": "import time; time.sleep(3)", "timeout": 30})
        result.update(status=response.status_code, body=response.get_json())

    thread = threading.Thread(target=execute)
    thread.start()
    time.sleep(1)
    forwarder.close()  # cut, and refuse new connections from now on
    thread.join(30)
    assert not thread.is_alive()
    assert result["status"] in (502, 503)
    assert result["body"]["error"] in ("upstream_connection_lost", "upstream_unavailable")
    assert value(run(http, kernel, "5 * 5")) == "25"  # directly: the kernel is fine


def test_a_cut_just_before_the_deadline_still_stops_the_code(settings, forwarder, kernel,
                                                             http):
    """The websocket is reopened even with no time left, and the code stopped on it: not a
    502 with the code running on unseen."""
    proxied = create_app(settings.replace(server_url=forwarder.url)).test_client()
    assert value(run(proxied, kernel, "1")) == "1"  # warm: the deadline is not spent connecting
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run(
        proxied, kernel, "import time\nprint('started', flush=True)\ntime.sleep(30)",
        timeout=3)))
    started = time.monotonic()
    thread.start()
    time.sleep(max(started + 3 - 0.03 - time.monotonic(), 0))
    assert forwarder.cut() >= 1
    thread.join(30)
    assert result["status"] == "timeout", result
    assert "interrupted and keeps its state" in result["error"]["evalue"]
    began = time.monotonic()
    assert value(run(http, kernel, "2 * 2")) == "4"  # the kernel is free, not still sleeping
    assert time.monotonic() - began < 10


@pytest.fixture
def warm_behind(settings, forwarder, kernel):
    """The app through `forwarder`, with a warm websocket to `kernel` and no pooled HTTP
    connection (so that what `forwarder.blackhole()` swallows is the websocket)."""
    app = create_app(settings.replace(server_url=forwarder.url))
    proxied = app.test_client()
    assert value(run(proxied, kernel, "1")) == "1"
    app.extensions["kernel_manager"].client.reset_connections()
    return proxied


def test_an_idle_websocket_dropped_without_a_word_is_found_out_and_replaced(warm_behind,
                                                                            forwarder, kernel):
    forwarder.blackhole()  # the warm websocket's flow is gone: the request goes nowhere
    began = time.monotonic()
    response = warm_behind.post("/execute_code", json={"id": kernel, "code": "1 + 1",
                                                       "timeout": 120})
    assert response.status_code == 502
    body = response.get_json()
    assert body["error"] == "upstream_connection_lost"
    assert "the request may have been lost (the code did not run)" in body["message"]
    assert time.monotonic() - began < 30  # found out by a look-up, not at the deadline
    assert value(run(warm_behind, kernel, "2 + 2")) == "4"  # on a new websocket


def test_a_websocket_dropped_without_a_word_mid_cell_is_found_out(warm_behind, forwarder,
                                                                 kernel):
    result: dict = {}

    def execute() -> None:
        response = warm_behind.post("/execute_code", json={
            "id": kernel, "code": "import time\nprint('started', flush=True)\ntime.sleep(1)",
            "timeout": 120})
        result.update(status=response.status_code, body=response.get_json())

    thread = threading.Thread(target=execute)
    began = time.monotonic()
    thread.start()
    time.sleep(0.5)
    forwarder.blackhole()
    thread.join(60)
    assert result["status"] == 502, result
    assert "the code finished, but its answer was lost" in result["body"]["message"]
    assert time.monotonic() - began < 30


# -- concurrent clients, through the real service ------------------------------------------------

@pytest.fixture(scope="module")
def service(jupyter_server, encoding):
    with proxy_for(jupyter_server, "--workers", "2",
                   env={"JUPYTER_WEBSOCKET_PROTOCOL": encoding}) as proxy:
        yield proxy


def remote(url: str, kernel_id: str, code: str, **extra) -> dict:
    response = requests.post(f"{url}/execute_code",
                             json={"id": kernel_id, "code": code, **extra}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_sixteen_clients_on_four_kernels_each_get_their_own_output(service):
    kernels = [requests.post(f"{service.url}/start_kernel", timeout=60).json()["id"]
               for _ in range(4)]

    def client(n: int) -> list[str]:
        return [remote(service.url, kernels[n % 4], f"print('client {n} call {i}')")["stdout"]
                for i in range(5)]

    with ThreadPoolExecutor(16) as pool:
        outputs = list(pool.map(client, range(16)))
    for n, got in enumerate(outputs):
        assert got == [f"client {n} call {i}\n" for i in range(5)]
    for kernel_id in kernels:
        requests.post(f"{service.url}/shutdown_kernel", json={"id": kernel_id}, timeout=30)


def test_eight_threads_on_one_kernel_across_workers_each_get_their_own_output(service):
    kernel_id = requests.post(f"{service.url}/start_kernel", timeout=60).json()["id"]

    def call(n: int) -> str:
        return remote(service.url, kernel_id, f"print({n})")["stdout"]

    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(call, range(40)))
    assert outputs == [f"{n}\n" for n in range(40)]
    requests.post(f"{service.url}/shutdown_kernel", json={"id": kernel_id}, timeout=30)


def test_deadline_while_queued_neither_interrupts_nor_runs_later(service):
    kernel_id = requests.post(f"{service.url}/start_kernel", timeout=60).json()["id"]
    remote(service.url, kernel_id, "events = []")
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(remote, service.url, kernel_id,
                           "import time; time.sleep(3); events.append('long')", timeout=30)
        time.sleep(0.5)
        short = pool.submit(remote, service.url, kernel_id, "events.append('short')",
                            timeout=1)
        assert short.result()["status"] == "timeout"
        assert "did not run" in short.result()["error"]["evalue"]
        assert long.result()["status"] == "ok"  # not interrupted by the other's deadline
    time.sleep(0.5)
    # The timed-out code was never sent, so it cannot run behind the caller's back.
    assert value(remote(service.url, kernel_id, "events")) == "['long']"
    requests.post(f"{service.url}/shutdown_kernel", json={"id": kernel_id}, timeout=30)


def test_a_client_that_hangs_up_before_the_answer_gets_its_code_interrupted(service):
    """An HTTP client's own timeout must not leave its code holding the kernel until the
    proxy's deadline (300 s by default)."""
    kernel_id = requests.post(f"{service.url}/start_kernel", timeout=60).json()["id"]
    try:
        remote(service.url, kernel_id, "x = 'before'")
        with pytest.raises(requests.ReadTimeout):  # the client gives up after 2 s
            requests.post(f"{service.url}/execute_code", timeout=2, json={
                "id": kernel_id, "code": "import time\ntime.sleep(60)\nx = 'after'"})
        started = time.monotonic()
        answer = remote(service.url, kernel_id, "x")
        assert time.monotonic() - started < 10, "the abandoned code did not hold the kernel"
        assert value(answer) == "'before'"  # interrupted (state kept), never finished
    finally:
        requests.post(f"{service.url}/shutdown_kernel", json={"id": kernel_id}, timeout=30)
    deadline = time.monotonic() + 10
    while not any(line.get("message") == "code executed" and line.get("status") == "cancelled"
                  and line.get("kernel_id") == kernel_id for line in service.log_lines()):
        assert time.monotonic() < deadline, "the abandoned execution is logged as cancelled"
        time.sleep(0.2)


def test_a_client_that_hangs_up_while_its_kernel_starts_leaves_no_kernel_behind(service):
    """Nobody would learn the kernel's id: it would run, unused, until someone culls it."""
    try:
        # A new kernel takes 0.3 s at the least here (a kernel process that imports ipykernel)
        answer = requests.post(f"{service.url}/start_kernel", timeout=0.1)
    except requests.ReadTimeout:
        pass  # the client hangs up while its kernel starts
    else:
        pytest.fail(f"the start answered within 0.1 s: {answer.status_code} {answer.text}")
    deadline = time.monotonic() + 120
    while True:
        lines = service.log_lines()
        gone = [line["kernel_id"] for line in lines
                if line.get("message", "").startswith("the client went away before its kernel")]
        answered = [line["status"] for line in lines if gone and line.get("message") == "request"
                    and line.get("kernel_id") == gone[0]]
        if answered:
            break
        assert time.monotonic() < deadline, "the abandoned start is noticed, and logged"
        time.sleep(0.2)
    assert answered == [400]  # client_gone, logged with the kernel's id
    while gone[0] in {k["id"] for k in requests.get(f"{service.url}/kernels",
                                                    timeout=30).json()["kernels"]}:
        assert time.monotonic() < deadline, "the abandoned kernel is shut down"
        time.sleep(0.2)


def test_executions_queued_on_a_kernel_that_is_shut_down_answer_404_at_once(service):
    kernel_id = requests.post(f"{service.url}/start_kernel", timeout=60).json()["id"]

    def call(code: str) -> tuple[int, dict, float]:
        response = requests.post(f"{service.url}/execute_code", timeout=60,
                                 json={"id": kernel_id, "code": code},
                                 headers={"Connection": "close"})  # either worker
        return response.status_code, response.json(), time.monotonic()

    with ThreadPoolExecutor(5) as pool:
        running = pool.submit(call, "import time; time.sleep(5)")
        time.sleep(1)
        queued = [pool.submit(call, f"{n}") for n in range(4)]
        time.sleep(1)
        shutdown = requests.post(f"{service.url}/shutdown_kernel", json={"id": kernel_id},
                                 timeout=60)
        shut_down_at = time.monotonic()
        assert shutdown.status_code == 200, shutdown.text
        status, answer, _ = running.result()
        assert status == 200 and answer["status"] == "crashed"
        for future in queued:
            status, answer, answered_at = future.result()
            assert (status, answer["error"]) == (404, "kernel_not_found"), answer
            assert answered_at - shut_down_at < 5, "told at once, not after the server's wait"


# -- stopping the proxy -------------------------------------------------------------------------

def test_sigterm_lets_a_running_execution_finish(start_proxy, jupyter_server, encoding):
    proxy = start_proxy("--server-url", jupyter_server.url, "--workers", "1",
                        env={"JUPYTER_TOKEN": jupyter_server.token,
                             "JUPYTER_WEBSOCKET_PROTOCOL": encoding})
    kernel_id = requests.post(f"{proxy.url}/start_kernel", timeout=60).json()["id"]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(remote, proxy.url, kernel_id,
                              "import time; time.sleep(3); print('finished')")
        time.sleep(1)
        proxy.process.send_signal(signal.SIGTERM)
        answer = pending.result(timeout=60)
    assert answer["status"] == "ok" and answer["stdout"] == "finished\n"
    assert proxy.process.wait(30) == 0
