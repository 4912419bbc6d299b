"""The kernel pool, alone (fakes) and with a real Jupyter server."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from threading import Event

import pytest
import requests

from app import JupyterClient, KernelManager
from app.kernels import UpstreamTimeout
from app.kernels.pool import KernelPool, PoolLedger


class FakeServer:
    """Starts numbered kernels (or under the id asked for, with `own_ids`); some may be dead
    by the time they are handed out."""

    def __init__(self, own_ids: bool = False) -> None:
        self.numbers = itertools.count(1)
        self.own_ids = own_ids
        self.dead: set[str] = set()
        self.shut_down: list[str] = []
        self.maybe_starting: list[str] = []  # shut down with `starting=True`

    def start(self, kernel_id: str) -> dict:
        return {"id": kernel_id if self.own_ids else f"k{next(self.numbers)}",
                "name": "python3"}

    def alive(self, kernel_id: str) -> bool:
        return kernel_id not in self.dead

    def shutdown(self, kernel_id: str, starting: bool = False) -> None:
        (self.maybe_starting if starting else self.shut_down).append(kernel_id)


def pool_of(size: int, server: FakeServer, ledger: PoolLedger | None = None) -> KernelPool:
    return KernelPool(size, "python3", server.start, server.alive, server.shutdown, ledger)


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
    pool.close()  # waits for the dropped kernel's shutdown, which runs in the background
    assert "k1" in server.shut_down


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


# -- the ledger: pooled kernels of a process that died -------------------------------------

def listed(directory: Path) -> set[str]:
    """Every kernel id the ledgers in `directory` list (a ledger is replaced whole, so this
    may read it while its pool writes it)."""
    return {line.split()[0] for path in directory.glob(PoolLedger.PATTERN)
            for line in path.read_text().splitlines()}


def test_the_ledger_lists_ready_kernels_and_never_one_handed_out(tmp_path):
    server = FakeServer(own_ids=True)
    pool = pool_of(2, server, PoolLedger(tmp_path))
    assert pool.wait_until_full(5)
    ready = {kernel["id"] for kernel in pool._ready}
    assert listed(tmp_path) == ready
    taken = pool.take("python3")["id"]
    assert taken not in listed(tmp_path)
    assert pool.wait_until_full(5)
    assert listed(tmp_path) == {kernel["id"] for kernel in pool._ready}
    pool.close()
    assert list(tmp_path.iterdir()) == []  # closed cleanly: nothing left for anyone to reap


def test_a_dropped_kernel_goes_in_the_background_and_stays_listed_until_gone(tmp_path):
    server = FakeServer()
    shutting_down, release = Event(), Event()

    def slow_shutdown(kernel_id: str, starting: bool = False) -> None:
        shutting_down.set()
        release.wait(10)  # a hung kernel: the server waits before it kills it
        server.shutdown(kernel_id, starting)

    pool = KernelPool(2, "python3", server.start, server.alive, slow_shutdown,
                      PoolLedger(tmp_path))
    assert pool.wait_until_full(5)
    server.dead.add("k1")
    assert pool.take("python3")["id"] == "k2"  # not held up by k1's shutdown
    assert shutting_down.wait(5)
    assert "k1" in listed(tmp_path)  # were this process killed now, the next pool reaps it
    release.set()
    deadline = time.monotonic() + 5
    while "k1" in listed(tmp_path):
        assert time.monotonic() < deadline, "a kernel shut down stays listed"
        time.sleep(0.01)
    assert server.shut_down == ["k1"]
    pool.close()


def test_a_drop_still_going_at_close_is_left_listed_for_the_next_pool(tmp_path):
    server = FakeServer()
    release = Event()
    hung = {"k1"}  # the kernels that refill the pool meanwhile go at once

    def shutdown(kernel_id: str, starting: bool = False) -> None:
        if kernel_id in hung:
            release.wait(10)

    pool = KernelPool(2, "python3", server.start, server.alive, shutdown, PoolLedger(tmp_path))
    assert pool.wait_until_full(5)
    server.dead.add("k1")
    assert pool.take("python3")["id"] == "k2"
    pool.close(timeout=0.2)
    assert "k1" in listed(tmp_path)
    release.set()


def test_a_living_pools_kernels_are_never_reaped(tmp_path):
    server = FakeServer(own_ids=True)
    pool = pool_of(1, server, PoolLedger(tmp_path))
    assert pool.wait_until_full(5)
    other = FakeServer()
    assert PoolLedger(tmp_path).reap(other.shutdown) == []  # locked: its process lives
    assert other.shut_down == other.maybe_starting == [] and len(listed(tmp_path)) == 1
    pool.close()


LEDGER_OWNER = """
import sys, time
from pathlib import Path
from app.kernels.pool import PoolLedger
ledger = PoolLedger(Path(sys.argv[1]))
ledger.record(sys.argv[3:], starting=sys.argv[2])
print("recorded", flush=True)
time.sleep(60)
"""


def test_the_kernels_of_a_killed_process_are_shut_down_by_the_next_pool(tmp_path):
    ready, starting = [str(uuid.uuid4()), str(uuid.uuid4())], str(uuid.uuid4())
    owner = subprocess.Popen([sys.executable, "-c", LEDGER_OWNER, str(tmp_path), starting,
                              *ready, "../../etc", "not-an-id"],
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert owner.stdout.readline().strip() == "recorded"
        assert PoolLedger(tmp_path).reap(FakeServer().shutdown) == []  # alive: left alone
        owner.send_signal(signal.SIGKILL)  # no atexit, no finally: only the kernel's unlock
        owner.wait(10)
    finally:
        owner.kill()
    server = FakeServer(own_ids=True)
    pool = pool_of(1, server, PoolLedger(tmp_path))
    assert pool.wait_until_full(5)  # reaping comes first
    assert server.shut_down == ready  # only what looks like a kernel id reaches the server
    assert server.maybe_starting == [starting]  # its start may finish yet: watched for
    assert listed(tmp_path) == {pool._ready[0]["id"]}
    pool.close()


def test_a_kernel_still_starting_at_close_is_left_for_the_next_pool(tmp_path):
    release = Event()

    class SlowServer(FakeServer):
        def start(self, kernel_id: str) -> dict:
            release.wait(10)
            return super().start(kernel_id)

    slow = SlowServer(own_ids=True)
    pool = pool_of(1, slow, PoolLedger(tmp_path))
    pool.start()
    deadline = time.monotonic() + 5
    while not listed(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    starting = listed(tmp_path)
    assert len(starting) == 1  # listed before its start is asked for
    pool.close(timeout=0.1)  # the start outlives the close
    server = FakeServer(own_ids=True)
    assert PoolLedger(tmp_path).reap(server.shutdown) == sorted(starting)
    assert server.maybe_starting == sorted(starting)
    release.set()


@pytest.mark.parametrize("failing_call", ["pwrite", "rename"])
def test_a_ledger_that_cannot_be_written_is_given_up_not_half_kept(tmp_path, monkeypatch,
                                                                   failing_call):
    ledger = PoolLedger(tmp_path / "gone")  # no such directory
    ledger.record([str(uuid.uuid4())])
    assert ledger.directory is None  # warned once, then no more tries
    ledger.record([str(uuid.uuid4())])
    ledger.close()
    # A write that fails once the file lists a kernel: the kernel about to be handed out must
    # not stay listed in an unlocked file.
    ledger = PoolLedger(tmp_path)
    handed_out, ready = str(uuid.uuid4()), str(uuid.uuid4())
    ledger.record([handed_out, ready])

    def failing(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, failing_call, failing)
    ledger.record([ready])
    monkeypatch.undo()
    assert ledger.directory is None  # given up
    assert PoolLedger(tmp_path).reap(FakeServer().shutdown) == []
    assert list(tmp_path.iterdir()) == []  # nothing half written left behind either


def test_a_list_replaced_as_a_reaper_opens_it_is_not_reaped(tmp_path, monkeypatch):
    """A reaper that opened a living pool's list just before the pool replaced it (handing a
    kernel out) gets the old file's lock once the pool lets go of it: that file is no longer
    linked, so it is left alone, and the new one is held."""
    ledger = PoolLedger(tmp_path)
    handed_out, ready = str(uuid.uuid4()), str(uuid.uuid4())
    ledger.record([handed_out, ready])
    path = next(tmp_path.glob(PoolLedger.PATTERN))
    real_open, replaced = os.open, []

    def open_then_replace(file, *args, **kwargs):
        fd = real_open(file, *args, **kwargs)
        if Path(file) == path and not replaced:
            replaced.append(file)
            ledger.record([ready])  # between the reaper's open and its flock
        return fd

    monkeypatch.setattr(os, "open", open_then_replace)
    server = FakeServer()
    assert PoolLedger(tmp_path).reap(server.shutdown) == []
    monkeypatch.undo()
    assert replaced and server.shut_down == server.maybe_starting == []
    assert listed(tmp_path) == {ready}  # and still there, held
    assert PoolLedger(tmp_path).reap(server.shutdown) == []
    ledger.close()


def test_a_ledger_is_never_seen_empty_or_half_written(tmp_path):
    """What a process killed at any moment leaves for `reap` is a whole list: the old one or
    the new one (a reader at any moment sees the same)."""
    lists = [[str(uuid.uuid4()) for _ in range(2)], [str(uuid.uuid4())]]
    ledger = PoolLedger(tmp_path)
    ledger.record(lists[0])
    wanted = [{*kernel_ids} for kernel_ids in lists]
    stop, seen = Event(), []

    def read_all_the_time() -> None:
        while not stop.is_set():
            seen.append(listed(tmp_path))  # (the name is never missing either)

    reader = threading.Thread(target=read_all_the_time)
    reader.start()
    turn, deadline = 0, time.monotonic() + 30
    try:
        while (len(seen) < 1000 or turn < 200) and time.monotonic() < deadline:
            turn += 1
            ledger.record(lists[turn % 2])
    finally:
        stop.set()
        reader.join(10)
    ledger.close()
    assert len(seen) >= 1000 and turn >= 200
    assert [ids for ids in seen if ids not in wanted] == []


def test_a_ledger_stays_listed_after_a_tmp_cleaner_removed_it(tmp_path):
    server = FakeServer(own_ids=True)
    pool = pool_of(2, server, PoolLedger(tmp_path))
    assert pool.wait_until_full(5)
    for path in tmp_path.glob(PoolLedger.PATTERN):
        path.unlink()
    pool.take("python3")
    assert pool.wait_until_full(5)
    assert listed(tmp_path) == {kernel["id"] for kernel in pool._ready}
    pool.close()


def test_a_forked_child_does_not_keep_its_parents_pool_list_locked():
    from app.embedded import free_port
    from app.kernels.locks import lock_directory
    from tests.conftest import forked_manager

    url, kernel_id = f"http://fork.test:{free_port()}", str(uuid.uuid4())
    with forked_manager(url, "manager._pool._ledger.record(sys.argv[3:]); fork()",
                        kernel_id) as parent:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        server = FakeServer()  # the child lives on
        assert PoolLedger(lock_directory(url)).reap(server.shutdown) == [kernel_id]
        assert server.shut_down == [kernel_id]


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


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_pooled_kernel_that_no_longer_answers_is_not_handed_out(settings, signum):
    """Killed (before the server noticed) or hung, a pooled kernel still looks alive to the
    server and its websocket; handed out, the client's first execution would fail or hang."""
    with JupyterClient(settings) as client, KernelManager(client, pool_size=1) as manager:
        assert manager._pool.wait_until_full(60)
        pooled = manager._pool._ready[0]["id"]
        pid = int(manager.execute_code(pooled, "import os; os.getpid()")["outputs"][0]
                  ["data"]["text/plain"])
        os.kill(pid, signum)
        try:
            started = time.monotonic()
            kernel = manager.start_kernel()
            assert kernel["id"] != pooled
            assert time.monotonic() - started < 30  # not held up by the hung kernel's shutdown
            assert manager.execute_code(kernel["id"], "3")["outputs"][0]["data"] == \
                {"text/plain": "3"}
            manager.shutdown_kernel(kernel["id"])
        finally:
            if signum == signal.SIGSTOP:
                with contextlib.suppress(ProcessLookupError):  # the drop may have ended it
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while pooled in {k["id"] for k in client.list_kernels()}:
            assert time.monotonic() < deadline, "the dropped kernel was not shut down"
            time.sleep(0.2)


def kernels_of(server) -> set[str]:
    """The ids of the kernels `server` (a `jupyter_server` fixture value) runs."""
    headers = {"Authorization": f"token {server.token}"}
    # jupyter_server can fail a listing (500) while a kernel is being removed: ask again.
    for _ in range(50):
        answer = requests.get(f"{server.url}/api/kernels", headers=headers, timeout=10)
        if answer.status_code == 200:
            return {k["id"] for k in answer.json()}
        time.sleep(0.1)
    raise AssertionError(f"the Jupyter server keeps failing: {answer.status_code}")


def test_pooled_kernels_are_shut_down_when_the_proxy_stops(start_proxy, jupyter_server):
    headers = {"Authorization": f"token {jupyter_server.token}"}

    def server_kernels() -> set[str]:
        return kernels_of(jupyter_server)

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


def pooled_proxy(start_proxy, server):
    """The real command with one worker and a pool of two; Enterprise Gateway gets an env with
    each start, so that it takes the kernel ids the proxy chooses (see test_orphans)."""
    env = {"JUPYTER_TOKEN": server.token}
    if server.kind == "enterprise_gateway":
        env["JUPYTER_KERNEL_ENV"] = "KERNEL_USERNAME=proxy"
    return start_proxy("--server-url", server.url, "--workers", "1", "--pool-size", "2",
                       env=env)


def wait_for(condition, what: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def kill_the_worker(proxy) -> None:
    """SIGKILL, as the OOM killer would: no clean-up runs in the worker."""
    children = Path(f"/proc/{proxy.process.pid}/task/{proxy.process.pid}/children")
    (worker,) = children.read_text().split()
    os.kill(int(worker), signal.SIGKILL)


def kernels_started(proxy) -> int:
    return sum(line.get("message") == "kernel started" for line in proxy.log_lines())


def test_a_killed_workers_pooled_kernels_are_shut_down_by_its_replacement(start_proxy,
                                                                          jupyter_server):
    before = kernels_of(jupyter_server)
    proxy = pooled_proxy(start_proxy, jupyter_server)
    wait_for(lambda: kernels_started(proxy) == 2, "the pool did not fill")
    given = requests.post(f"{proxy.url}/start_kernel", timeout=60).json()["id"]
    wait_for(lambda: kernels_started(proxy) == 3, "the pool did not refill")
    time.sleep(0.5)
    pooled = kernels_of(jupyter_server) - before - {given}
    assert len(pooled) == 2
    kill_the_worker(proxy)
    # Its replacement shuts the dead worker's pooled kernels down, fills its own pool, and
    # leaves the kernel a client was given alone.
    wait_for(lambda: not pooled & kernels_of(jupyter_server), "the dead pool's kernels run on")
    wait_for(lambda: kernels_started(proxy) == 5, "the new pool did not fill")
    time.sleep(0.5)
    now = kernels_of(jupyter_server) - before
    assert given in now and len(now) == 3  # the client's, and the new pool's two
    answer = requests.post(f"{proxy.url}/execute_code", json={"id": given, "code": "6 * 7"},
                           timeout=60).json()
    assert answer["status"] == "ok", answer
    assert any(line.get("message", "").startswith("shut down the pooled kernels of a process")
               for line in proxy.log_lines())
    requests.post(f"{proxy.url}/shutdown_kernel", json={"id": given}, timeout=60)


def test_a_kernel_a_killed_worker_was_starting_for_its_pool_is_shut_down(start_proxy,
                                                                         jupyter_server):
    from app.kernels.locks import lock_directory

    before = kernels_of(jupyter_server)
    proxy = pooled_proxy(start_proxy, jupyter_server)
    seen: set[str] = set()

    def starting_on_the_server() -> bool:
        ledgers = lock_directory(jupyter_server.url).glob(PoolLedger.PATTERN)
        starting = {line.split()[0] for path in ledgers for line in path.read_text().split("\n")
                    if line.endswith(" starting")}
        seen.update(starting & kernels_of(jupyter_server))
        return bool(seen)

    wait_for(starting_on_the_server, "no pooled kernel was seen starting")
    kill_the_worker(proxy)  # the server has the kernel; the worker waited for it to be ready
    (kernel_id,) = seen
    wait_for(lambda: kernel_id not in kernels_of(jupyter_server),
             "the kernel the dead worker was starting runs on", seconds=60)
    wait_for(lambda: len(kernels_of(jupyter_server) - before) == 2, "the new pool did not fill")


def test_preloaded_workers_never_hand_out_the_same_kernel(jupyter_server):
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
