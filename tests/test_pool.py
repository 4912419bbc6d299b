"""The kernel pool, alone (fakes) and with a real Jupyter server."""

from __future__ import annotations

import itertools
import time

import pytest
import requests

from app import JupyterClient, KernelManager
from app.kernels import UpstreamTimeout
from app.kernels.pool import KernelPool


class FakeServer:
    """Starts numbered kernels; some may be dead by the time they are handed out."""

    def __init__(self) -> None:
        self.numbers = itertools.count(1)
        self.dead: set[str] = set()
        self.shut_down: list[str] = []

    def start(self) -> dict:
        return {"id": f"k{next(self.numbers)}", "name": "python3"}

    def alive(self, kernel_id: str) -> bool:
        return kernel_id not in self.dead

    def shutdown(self, kernel_id: str) -> None:
        self.shut_down.append(kernel_id)


def pool_of(size: int, server: FakeServer) -> KernelPool:
    return KernelPool(size, "python3", server.start, server.alive, server.shutdown)


def test_pool_fills_hands_out_and_refills():
    server = FakeServer()
    pool = pool_of(2, server)
    assert pool.wait_until_full(5)
    assert pool.take("python3")["id"] == "k1"
    assert pool.wait_until_full(5)
    assert len(pool) == 2
    pool.close()


def test_a_dead_pooled_kernel_is_never_handed_out():
    server = FakeServer()
    pool = pool_of(2, server)
    assert pool.wait_until_full(5)
    server.dead.add("k1")
    assert pool.take("python3")["id"] == "k2"
    pool.close()


def test_other_kernel_specs_are_not_served_from_the_pool():
    server = FakeServer()
    pool = pool_of(1, server)
    assert pool.wait_until_full(5)
    assert pool.take("julia") is None
    assert len(pool) == 1
    pool.close()


def test_closing_shuts_the_ready_kernels_down():
    server = FakeServer()
    pool = pool_of(2, server)
    assert pool.wait_until_full(5)
    pool.close()
    assert sorted(server.shut_down) == ["k1", "k2"]
    assert pool.take("python3") is None


# -- with a real Jupyter server ---------------------------------------------------------------

def test_pooled_kernel_is_ready_warm_and_untouched(settings):
    with JupyterClient(settings) as client, KernelManager(client, pool_size=1) as manager:
        assert manager._pool.wait_until_full(60)
        started = time.monotonic()
        kernel = manager.start_kernel()
        answer = manager.execute_code(kernel["id"], "1 + 1")
        elapsed = time.monotonic() - started
        assert answer["execution_count"] == 1  # the warm-up left no trace
        assert answer["outputs"][0]["data"]["text/plain"] == "2"
        assert elapsed < 2  # a kernel started now would take longer; timing is in the benchmark
        manager.shutdown_kernel(kernel["id"])
    kernels = {k["id"] for k in client.session.get(f"{settings.server_url}/api/kernels",
                                                       timeout=10).json()}
    assert kernel["id"] not in kernels


def test_a_kernel_whose_warm_up_cell_fails_is_shut_down_not_pooled(settings, monkeypatch):
    from app.kernels import manager as manager_module
    from app.kernels.execution import End, Sent

    stuck = End("timeout", {"ename": "ExecutionTimeout", "evalue": "stuck", "traceback": []})
    monkeypatch.setattr(manager_module, "run_execution", lambda *args, **kw: iter([Sent(), stuck]))
    with KernelManager(JupyterClient(settings)) as manager:
        before = {k["id"] for k in manager.client.list_kernels()}
        with pytest.raises(UpstreamTimeout, match="first cell"):
            manager._start_new(settings.kernel_name, warm=True)
        assert {k["id"] for k in manager.client.list_kernels()} == before  # none left behind


def test_pooled_kernel_shut_down_elsewhere_is_not_handed_out(settings):
    with JupyterClient(settings) as client, KernelManager(client, pool_size=1) as manager:
        assert manager._pool.wait_until_full(60)
        pooled = manager._pool._ready[0]["id"]
        client.shutdown_kernel(pooled)
        time.sleep(0.2)
        kernel = manager.start_kernel()
        assert kernel["id"] != pooled
        assert manager.execute_code(kernel["id"], "3")["status"] == "ok"
        manager.shutdown_kernel(kernel["id"])


def test_pooled_kernels_are_shut_down_when_the_proxy_stops(start_proxy, jupyter_server):
    headers = {"Authorization": f"token {jupyter_server.token}"}

    def server_kernels() -> set[str]:
        # jupyter_server can fail a listing (500) while a kernel is being removed: ask again.
        for _ in range(50):
            answer = requests.get(f"{jupyter_server.url}/api/kernels", headers=headers,
                                  timeout=10)
            if answer.status_code == 200:
                return {k["id"] for k in answer.json()}
            time.sleep(0.1)
        raise AssertionError(f"the Jupyter server keeps failing: {answer.status_code}")

    before = server_kernels()
    proxy = start_proxy("--server-url", jupyter_server.url, "--workers", "2",
                        "--pool-size", "1", env={"JUPYTER_TOKEN": jupyter_server.token})
    deadline = time.monotonic() + 60
    while len(server_kernels() - before) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(server_kernels() - before) == 2  # one ready kernel per worker
    kernel_id = requests.post(f"{proxy.url}/start_kernel", timeout=60).json()["id"]
    assert kernel_id in server_kernels() - before
    time.sleep(0.7)  # the pool is refilling now: stopping must not leak the kernel it starts
    proxy.stop()
    left = server_kernels() - before
    assert left == {kernel_id}  # the handed-out kernel is the client's; the pool's are gone
    requests.delete(f"{jupyter_server.url}/api/kernels/{kernel_id}", headers=headers, timeout=10)


def test_preloaded_workers_never_hand_out_the_same_kernel(jupyter_server):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from app.embedded import free_port
    from tests.conftest import REPO, wait_for_health

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_")}
    env.update(JUPYTER_SERVER_URL=jupyter_server.url, JUPYTER_TOKEN=jupyter_server.token,
               JUPYTER_PROXY_BIND=f"127.0.0.1:{port}", JUPYTER_PROXY_WORKERS="2",
               JUPYTER_POOL_SIZE="1")
    gunicorn = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                                 "--preload"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, process=gunicorn)
        time.sleep(3)  # the master's pool (built at preload) fills meanwhile
        # Workers forked now would inherit the master's ready kernels: make gunicorn re-fork.
        children = Path(f"/proc/{gunicorn.pid}/task/{gunicorn.pid}/children").read_text()
        for worker_pid in children.split():
            os.kill(int(worker_pid), signal.SIGTERM)
        time.sleep(3)
        ids = [requests.post(f"{url}/start_kernel", headers={"Connection": "close"},
                             timeout=60).json()["id"] for _ in range(6)]
        assert len(set(ids)) == len(ids)
        for kernel_id in ids:
            answer = requests.post(f"{url}/execute_code", json={"id": kernel_id, "code": "1"},
                                   timeout=60).json()
            assert answer["status"] == "ok"
            requests.post(f"{url}/shutdown_kernel", json={"id": kernel_id}, timeout=30)
    finally:
        gunicorn.send_signal(signal.SIGTERM)
        gunicorn.wait(60)
