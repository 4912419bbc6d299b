"""Limits a client can run into: code size, kernel count, executions queued for one kernel."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from app import JupyterClient, KernelManager, create_app
from app.kernels import KernelBusy
from app.embedded import free_port
from tests.conftest import REPO, wait_for_health


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


def test_a_flood_on_one_kernel_leaves_the_worker_free_for_everything_else(jupyter_server):
    """However many calls pile up on one kernel, all of a worker's threads but two at most
    wait: the rest answer 429 `kernel_busy` at once, and /health and the rest are served.

    Served by plain gunicorn with threads of its own (GUNICORN_CMD_ARGS), not the setting's
    (16 by default): the limit follows the threads the worker really has."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_")}
    env.update(JUPYTER_SERVER_URL=jupyter_server.url, JUPYTER_TOKEN=jupyter_server.token,
               JUPYTER_PROXY_BIND=f"127.0.0.1:{port}", JUPYTER_PROXY_WORKERS="1",
               GUNICORN_CMD_ARGS="--threads 5")
    gunicorn = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
                                env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        wait_for_health(url, 60, gunicorn)
        busy, other = (requests.post(f"{url}/start_kernel", timeout=60).json()["id"]
                       for _ in range(2))

        def call(kernel_id: str, code: str) -> requests.Response:
            return requests.post(f"{url}/execute_code", timeout=60,
                                 json={"id": kernel_id, "code": code})

        with ThreadPoolExecutor(12) as pool:
            flood = [pool.submit(call, busy, "import time; time.sleep(1)") for _ in range(10)]
            time.sleep(0.5)
            started = time.monotonic()
            assert requests.get(f"{url}/health", timeout=30).status_code == 200
            answer = call(other, "'other kernel'")
            assert time.monotonic() - started < 3, "served while the flood waits"
            assert answer.json()["outputs"][0]["data"]["text/plain"] == "'other kernel'"
            answers = [future.result() for future in flood]
        for kernel_id in (busy, other):
            requests.post(f"{url}/shutdown_kernel", json={"id": kernel_id}, timeout=60)
    finally:
        gunicorn.terminate()
        gunicorn.wait(60)
    refused = [a for a in answers if a.status_code == 429]
    assert refused and all(a.json()["error"] == "kernel_busy" for a in refused)
    assert "JUPYTER_PROXY_THREADS" in refused[0].json()["message"]
    assert all(a.json()["status"] == "ok" for a in answers if a.status_code == 200)
    assert len(answers) - len(refused) >= 4  # one ran and three (5 threads - 2) waited


def test_waiting_callers_of_a_process_are_bounded_in_all(tmp_path, monkeypatch):
    from app.kernels.locks import KernelLocks

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    locks = KernelLocks("http://127.0.0.1:1", max_waiting=0, max_waiting_total=2)
    deadline = time.monotonic() + 10
    release = threading.Event()

    def wait_for(kernel_id: str, limited: bool = True) -> None:
        with locks.hold(kernel_id, deadline, limited=limited):
            release.wait(10)

    with locks.hold("a", deadline), locks.hold("b", deadline):
        waiters = [threading.Thread(target=wait_for, args=args)
                   for args in (("a",), ("b",), ("a", False))]
        for waiter in waiters:
            waiter.start()
        while locks.waiting("a") + locks.waiting("b") < 3:
            time.sleep(0.01)
        with pytest.raises(KernelBusy, match="JUPYTER_PROXY_THREADS"):
            with locks.hold("b", deadline):
                pass
        with locks.hold("c", deadline) as free:  # a free kernel is no wait
            assert free
    release.set()
    for waiter in waiters:
        waiter.join(10)
    with locks.hold("a", deadline) as held:
        assert held  # the count went back down


def test_counted_kernel_starts_queue_and_are_never_refused_as_busy(settings):
    """With JUPYTER_MAX_KERNELS, starts take turns; they are not executions waiting for a
    kernel, so the limit of those does not refuse them."""
    with JupyterClient(settings.replace(max_kernels=1000)) as client, \
            KernelManager(client, max_waiting_total=1) as manager:
        with ThreadPoolExecutor(3) as pool:
            started = list(pool.map(lambda _: manager.start_kernel(), range(3)))
        for kernel in started:
            manager.shutdown_kernel(kernel["id"])
    assert len({kernel["id"] for kernel in started}) == 3


class ScriptedStarts:
    """A KernelManager with `max_kernels` on a `responses` server whose kernel starts wait for
    `answer` (set by default), and which lists `listed` (a function: the kernel ids)."""

    def __init__(self, upstream, max_kernels: int) -> None:
        import json

        from app import Settings

        self.base = f"http://limits.test:{free_port()}"  # a lock directory of its own
        settings = Settings(server_url=self.base, token="t0ken-0123456789",
                            max_kernels=max_kernels)
        self.manager = KernelManager(JupyterClient(settings))
        self.manager._orphans.close = lambda: None  # nothing to shut down on a scripted server
        self.arrived: list[str] = []
        self.answer = threading.Event()
        self.answer.set()
        self.listed = lambda: []

        def start(request):
            kernel_id = json.loads(request.body)["kernel_id"]
            self.arrived.append(kernel_id)
            self.answer.wait(10)
            return 201, {}, json.dumps({"id": kernel_id, "name": "python3"})

        def listing(request):
            return 200, {}, json.dumps([{"id": kernel_id} for kernel_id in self.listed()])

        upstream.get(f"{self.base}/api/kernelspecs",
                     json={"default": "python3", "kernelspecs": {"python3": {}}})
        upstream.add_callback("GET", f"{self.base}/api/kernels", callback=listing)
        upstream.add_callback("POST", f"{self.base}/api/kernels", callback=start)

    def start(self) -> dict:
        import uuid

        return self.manager._start_counted("python3", time.monotonic() + 10, str(uuid.uuid4()))


@pytest.fixture
def scripted_starts():
    import responses

    with responses.RequestsMock(assert_all_requests_are_fired=False) as upstream:
        starts = ScriptedStarts(upstream, max_kernels=2)
        with starts.manager:
            yield starts


def test_counted_starts_run_side_by_side_and_the_limit_still_holds(scripted_starts):
    """Two starts in flight at once (the server answers neither yet) fill a limit of two: a
    third is refused at once; once they end, the server's listing counts their kernels."""
    from app.kernels import TooManyKernels

    starts = scripted_starts
    starts.answer.clear()
    with ThreadPoolExecutor(2) as pool:
        in_flight = [pool.submit(starts.start) for _ in range(2)]
        deadline = time.monotonic() + 5
        while len(starts.arrived) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(starts.arrived) == 2  # both reached the server: neither waited for the other
        with pytest.raises(TooManyKernels):
            starts.start()  # the server lists none yet: the two in flight count
        starts.answer.set()
        started = {start.result()["id"] for start in in_flight}
    assert started == set(starts.arrived)
    starts.listed = lambda: started
    with pytest.raises(TooManyKernels):
        starts.start()  # now the server lists them (and nothing is counted twice)
    starts.listed = lambda: starts.arrived[:1]
    assert starts.start()["id"] not in started


def test_a_start_that_ends_while_another_counts_is_counted_once(scripted_starts):
    """The reservations are read before the server's listing: a start that ends in between
    is in the listing. (Read the other way round, it would be in neither.)"""
    from app.kernels import TooManyKernels

    starts = scripted_starts
    starts.manager.settings = starts.manager.client.settings = \
        starts.manager.settings.replace(max_kernels=1)
    starts.answer.clear()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(starts.start)
        deadline = time.monotonic() + 5
        while not starts.arrived and time.monotonic() < deadline:
            time.sleep(0.01)

        def listing_as_the_first_ends() -> list[str]:
            listed = []  # what the server runs as the listing is read: not the first yet
            starts.answer.set()
            first.result(10)  # it ends, and lets go of its reservation
            return listed

        starts.listed = listing_as_the_first_ends
        with pytest.raises(TooManyKernels):
            starts.start()


def test_a_start_that_cannot_reserve_its_place_runs_alone(scripted_starts, monkeypatch):
    from app.kernels import locks

    def no_space(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(locks, "create_held", no_space)
    assert scripted_starts.start()["id"] == scripted_starts.arrived[-1]


def test_concurrent_starts_through_the_proxy_stop_exactly_at_the_limit(start_proxy,
                                                                        jupyter_server):
    headers = {"Authorization": f"token {jupyter_server.token}"}

    def running() -> int:
        return len(requests.get(f"{jupyter_server.url}/api/kernels", headers=headers,
                                timeout=10).json())

    before, deadline = running(), time.monotonic() + 30
    while time.monotonic() < deadline:  # earlier tests' kernels may still be going away
        time.sleep(1)
        if running() == before:
            break
        before = running()
    proxy = start_proxy("--server-url", jupyter_server.url, "--workers", "2",
                        env={"JUPYTER_TOKEN": jupyter_server.token,
                             "JUPYTER_MAX_KERNELS": str(before + 2)})
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: requests.post(
            f"{proxy.url}/start_kernel", headers={"Connection": "close"}, timeout=120),
            range(5)))
    statuses = sorted(answer.status_code for answer in answers)
    for answer in answers:
        if answer.status_code == 200:
            requests.post(f"{proxy.url}/shutdown_kernel", json={"id": answer.json()["id"]},
                          timeout=60)
    assert statuses == [200, 200, 429, 429, 429], [answer.text for answer in answers]
