"""Kernels of timed-out starts (`app/kernels/orphans.py`): a start whose answer never came may
still finish on the server, under the id the proxy chose; that kernel is shut down once it
appears, instead of running unknown to anyone.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import requests
import responses

from app import JupyterClient, KernelManager, Settings, StructuredLogger, create_app
from app.embedded import EmbeddedJupyterServer
from app.kernels import orphans
from app.kernels.errors import KernelError, KernelNotFound, UpstreamTimeout, UpstreamUnavailable
from app.kernels.orphans import OrphanReaper

KERNEL_ID = "5d1f3b2a-8c4e-4f6a-9b7d-0e2c4a6b8d10"


class FakeServer:
    """`shutdown(kernel_id)` of a server where the kernel appears after `absent_for` calls, and
    that fails with `failures` first."""

    def __init__(self, absent_for: int = 0, failures: int = 0) -> None:
        self.absent_for = absent_for
        self.failures = failures
        self.calls: list[str] = []
        self.shut_down = threading.Event()

    def shutdown(self, kernel_id: str) -> None:
        self.calls.append(kernel_id)
        if self.failures:
            self.failures -= 1
            raise UpstreamUnavailable("cannot reach the Jupyter server")
        if self.absent_for:
            self.absent_for -= 1
            raise KernelNotFound(kernel_id)
        self.shut_down.set()


def reaper_for(server: FakeServer) -> OrphanReaper:
    return OrphanReaper(server.shutdown, StructuredLogger("test"), poll_seconds=0.01)


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_the_kernel_is_shut_down_once_it_appears_and_then_no_longer_watched():
    server = FakeServer(absent_for=3, failures=2)  # not there yet, the server unwell meanwhile
    reaper = reaper_for(server)
    reaper.watch(KERNEL_ID)
    assert server.shut_down.wait(5)
    assert wait_until(lambda: reaper.watched == [])
    assert server.calls == [KERNEL_ID] * 6
    time.sleep(0.05)
    assert len(server.calls) == 6  # and the thread is gone: nothing more is asked


def test_a_kernel_that_never_appears_is_given_up_after_the_watch(monkeypatch):
    monkeypatch.setattr(orphans, "WATCH_SECONDS", 0.1)
    server = FakeServer(absent_for=10**6)
    reaper = reaper_for(server)
    reaper.watch(KERNEL_ID)
    assert wait_until(lambda: reaper.watched == [])
    calls = len(server.calls)
    assert calls >= 1
    time.sleep(0.05)
    assert len(server.calls) == calls
    reaper.watch("another")  # a later timeout is watched again, by a new thread
    assert wait_until(lambda: "another" in server.calls)


def test_watched_starts_are_bounded(monkeypatch):
    monkeypatch.setattr(orphans, "MAX_WATCHED", 2)
    reaper = OrphanReaper(FakeServer(absent_for=10**6).shutdown, StructuredLogger("test"),
                          poll_seconds=60)
    for n in range(3):
        reaper.watch(f"kernel-{n}")
    assert reaper.watched == ["kernel-0", "kernel-1"]
    reaper.close()


def test_a_kernel_whose_shutdown_failed_is_watched(scripted):
    manager, upstream = scripted
    upstream.delete(f"{BASE}/api/kernels/{KERNEL_ID}", body=requests.ReadTimeout("slow"))
    manager._shutdown_quietly(KERNEL_ID)  # a start that failed half-way, a pooled kernel
    assert manager._orphans.watched == [KERNEL_ID]


def test_close_tries_each_watched_kernel_once_more_and_then_watches_nothing():
    server = FakeServer()
    reaper = OrphanReaper(server.shutdown, StructuredLogger("test"), poll_seconds=60)
    reaper.watch(KERNEL_ID)
    reaper.close()
    assert server.calls == [KERNEL_ID] and reaper.watched == []
    reaper.watch("later")
    assert reaper.watched == []


# -- which failed starts are watched (the Python API, against a scripted server) ---------------

BASE = "http://jupyter.test:8888"
SPECS = {"default": "python3", "kernelspecs": {"python3": {}}}


@pytest.fixture
def scripted():
    """A KernelManager on a `responses` server, and that server."""
    settings = Settings(server_url=BASE, token="t0ken-0123456789", kernel_start_timeout=1)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as upstream, \
            KernelManager(JupyterClient(settings)) as manager:
        upstream.get(f"{BASE}/api/kernelspecs", json=SPECS)
        yield manager, upstream
        manager._orphans.close = lambda: None  # nothing to shut down on a scripted server


def asked_id(upstream) -> str:
    """The kernel id the last start asked for."""
    posts = [c.request for c in upstream.calls if c.request.method == "POST"]
    chosen = json.loads(posts[-1].body)["kernel_id"]
    assert str(uuid.UUID(chosen)) == chosen
    return chosen


@pytest.mark.parametrize("answer", [
    {"body": requests.ReadTimeout("slow")},  # no answer in time
    {"body": requests.ConnectionError("reset")},  # the connection broke
    {"status": 502, "body": "<html>bad gateway</html>"},  # a proxy in front of the server
], ids=["timeout", "broken", "502"])
def test_a_start_whose_answer_was_lost_watches_the_id_it_asked_for(scripted, answer):
    manager, upstream = scripted
    upstream.post(f"{BASE}/api/kernels", **answer)
    with pytest.raises(KernelError):
        manager.start_kernel()
    assert manager._orphans.watched == [asked_id(upstream)]


@pytest.mark.parametrize("status", [400, 403])
def test_a_refused_start_is_not_watched(scripted, status):
    manager, upstream = scripted
    upstream.post(f"{BASE}/api/kernels", status=status, json={"message": "no"})
    with pytest.raises(KernelError):
        manager.start_kernel()
    assert manager._orphans.watched == []


def test_a_kernel_spec_check_that_timed_out_is_not_watched():
    settings = Settings(server_url=BASE, token="t0ken-0123456789")
    with responses.RequestsMock() as upstream, KernelManager(JupyterClient(settings)) as manager:
        upstream.get(f"{BASE}/api/kernelspecs", body=requests.ReadTimeout("slow"))
        with pytest.raises(UpstreamTimeout):
            manager.start_kernel()
        assert manager._orphans.watched == []


def test_a_server_that_chose_its_own_id_before_is_not_watched(scripted):
    manager, upstream = scripted
    upstream.post(f"{BASE}/api/kernels", json={"id": KERNEL_ID, "name": "python3"})
    upstream.get(f"{BASE}/api/kernels/{KERNEL_ID}", json={"execution_state": "idle"})
    upstream.delete(f"{BASE}/api/kernels/{KERNEL_ID}", status=204)
    with pytest.raises(KernelError):  # the scripted server has no websocket: never ready
        manager.start_kernel()
    assert manager._ids_taken is False
    upstream.post(f"{BASE}/api/kernels", body=requests.ReadTimeout("slow"))
    with pytest.raises(UpstreamTimeout):
        manager.start_kernel()
    assert manager._orphans.watched == []


def test_a_kernel_unknown_to_the_server_is_watched_only_if_it_may_still_be_starting(scripted):
    # A dead worker's pooled kernel that was starting: the server may register it later.
    manager, upstream = scripted
    upstream.delete(f"{BASE}/api/kernels/{KERNEL_ID}", status=404)
    manager._shutdown_quietly(KERNEL_ID)
    assert manager._orphans.watched == []  # shut down by someone else: nothing to do
    manager._shutdown_quietly(KERNEL_ID, starting=True)
    assert manager._orphans.watched == [KERNEL_ID]


# -- real servers ----------------------------------------------------------------------------

def test_servers_start_kernels_under_the_id_the_proxy_chose(jupyter_server, settings):
    # Enterprise Gateway takes it from the start's env only (sent with JUPYTER_KERNEL_ENV).
    env = {"KERNEL_USERNAME": "proxy"} if jupyter_server.kind == "enterprise_gateway" else None
    chosen = str(uuid.uuid4())
    with JupyterClient(settings) as client:
        kernel_id = client.start_kernel("python3", env, kernel_id=chosen)["id"]
        client.shutdown_kernel(kernel_id)
    assert kernel_id == chosen


SLOW_START = """
import asyncio
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager


class SlowStartKernelManager(AsyncMappingKernelManager):
    async def start_kernel(self, *args, **kwargs):
        kernel_id = await super().start_kernel(*args, **kwargs)
        await asyncio.sleep(3)  # answers late, but the kernel runs from now on
        return kernel_id


c.ServerApp.kernel_manager_class = SlowStartKernelManager
"""


class SlowStartServer(EmbeddedJupyterServer):
    """A jupyter_server that answers kernel starts 3 s late: an overloaded server, a slow
    cluster launch behind a gateway."""

    def config(self) -> str:
        return super().config() + SLOW_START


def test_a_kernel_whose_start_timed_out_is_shut_down_when_the_server_starts_it_anyway():
    with SlowStartServer(startup_timeout=120) as server:
        app = create_app(Settings(server_url=server.url, token=server.token,
                                  kernel_start_timeout=1))
        manager = app.extensions["kernel_manager"]
        try:
            answer = app.test_client().post("/start_kernel")
            assert answer.status_code == 504, answer.get_json()
            watched = manager._orphans.watched
            rest = requests.Session()
            rest.headers["Authorization"] = f"token {server.token}"

            def kernels() -> list[str]:
                return [k["id"] for k in rest.get(f"{server.url}/api/kernels").json()]

            assert watched and wait_until(lambda: kernels() == watched, timeout=30)  # it runs
            assert wait_until(lambda: kernels() == [], timeout=30)  # ...and is shut down
        finally:
            manager.close()
