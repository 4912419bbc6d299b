"""Per-kernel locks hold across processes (gunicorn workers), not only across threads."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import threading
import time
from collections.abc import Iterator

import pytest

from app.kernels.errors import KernelNotFound
from app.kernels.locks import START_LOCK, KernelLocks

SERVER = "http://127.0.0.1:1"


def _hold_for(kernel_id: str, seconds: float, ready) -> None:
    with KernelLocks(SERVER).hold(kernel_id, time.monotonic() + 5) as acquired:
        assert acquired
        ready.set()
        time.sleep(seconds)


@contextlib.contextmanager
def held_elsewhere(kernel_id: str, seconds: float) -> Iterator[None]:
    """Another process holds the kernel for `seconds` from when this yields."""
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_for, args=(kernel_id, seconds, ready))
    holder.start()
    try:
        assert ready.wait(10)
        yield
    finally:
        holder.join(10)


def test_a_kernel_held_by_another_process_is_not_acquired_before_the_deadline():
    with held_elsewhere("k1", 1.5):
        started = time.monotonic()
        with KernelLocks(SERVER).hold("k1", time.monotonic() + 0.3) as acquired:
            assert acquired is False
        assert 0.25 < time.monotonic() - started < 1.2
        with KernelLocks(SERVER).hold("k1", time.monotonic() + 10) as acquired:
            assert acquired is True  # handed over once the other process let go


def test_other_kernels_are_not_blocked():
    with held_elsewhere("k2", 1.0):
        with KernelLocks(SERVER).hold("k3", time.monotonic() + 0.2) as acquired:
            assert acquired is True


def test_threads_of_one_process_take_turns():
    locks = KernelLocks(SERVER)
    seen: list[bool] = []

    def try_hold() -> None:
        with locks.hold("k4", time.monotonic() + 0.2) as acquired:
            seen.append(acquired)

    with locks.hold("k4", time.monotonic() + 1) as first:
        assert first
        thread = threading.Thread(target=try_hold)
        thread.start()
        thread.join()
    try_hold()
    assert seen == [False, True]


def test_a_cancelled_wait_gives_up_before_its_deadline(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    locks = KernelLocks("http://127.0.0.1:1")
    asked_at = time.monotonic() + 0.3
    with locks.hold("k", time.monotonic() + 10) as held:
        assert held
        started = time.monotonic()
        with locks.hold("k", time.monotonic() + 30,
                        cancelled=lambda: time.monotonic() > asked_at) as waited:
            assert waited is False
        assert time.monotonic() - started < 2, "gave up within a poll of being cancelled"


def test_waiting_threads_get_the_kernel_in_the_order_they_asked():
    locks = KernelLocks(SERVER)
    order: list[int] = []

    def wait_then_hold(index: int) -> None:
        # `cancelled` makes the wait a series of short ones, as an execution's does
        with locks.hold("k5", time.monotonic() + 10, cancelled=lambda: False) as acquired:
            assert acquired
            order.append(index)

    threads = [threading.Thread(target=wait_then_hold, args=(i,)) for i in range(3)]
    with locks.hold("k5", time.monotonic() + 10) as first:
        assert first
        asked = time.monotonic()
        for index, thread in enumerate(threads):
            thread.start()
            while locks.waiting("k5") < index + 1:  # it asked
                time.sleep(0.005)
            time.sleep(0.2)  # asking 0.2 s apart, so that their short waits end at odd times
        time.sleep(max(0, asked + 0.65 - time.monotonic()))  # the first has waited twice
    for thread in threads:
        thread.join(10)
    assert order == [0, 1, 2]
    assert locks.waiting("k5") == 0


def _lock_waiters() -> int:
    return sum(t.name == "kernel-lock-waiter" for t in threading.enumerate())


def test_callers_giving_up_on_a_kernel_another_process_holds_leave_one_waiting_thread():
    with held_elsewhere("k6", 3.0):
        locks = KernelLocks(SERVER)
        before = _lock_waiters()
        for _ in range(20):
            with locks.hold("k6", time.monotonic() + 0.02) as acquired:
                assert acquired is False
        assert _lock_waiters() - before == 1, "one thread waits on, taken over by each caller"
        with locks.hold("k6", time.monotonic() + 10) as acquired:
            assert acquired is True  # the waiting thread got it once the other process let go
    deadline = time.monotonic() + 5
    while _lock_waiters() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _lock_waiters() == before


def test_a_given_up_wait_lets_go_of_the_lock_once_it_gets_it():
    with held_elsewhere("k7", 0.5):
        locks = KernelLocks(SERVER)
        with locks.hold("k7", time.monotonic() + 0.05) as acquired:
            assert acquired is False
    time.sleep(0.3)
    other = multiprocessing.Event()
    second = multiprocessing.Process(target=_hold_for, args=("k7", 0.1, other))
    second.start()
    try:
        assert other.wait(5), "another process can take the kernel: the waiter let go of it"
    finally:
        second.join(10)


def test_a_removed_lock_directory_is_made_again(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    locks = KernelLocks(SERVER)
    with locks.hold("k8", time.monotonic() + 5) as acquired:
        assert acquired
    shutil.rmtree(tmp_path / f"jupyter-kernel-proxy-{os.getuid()}")  # a /tmp cleaner
    with locks.hold("k8", time.monotonic() + 5) as acquired:
        assert acquired
    assert locks.last_user("k8") == os.getpid()


def test_a_waiter_for_the_starts_lock_takes_its_new_file_after_the_directory_went(
        tmp_path, monkeypatch):
    """The directory is removed (and made again by another worker) while a counted start
    waits: the start then takes the lock of the new file; it is no forgotten kernel."""
    from app.kernels.locks import private_directory

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    holder, waiter = KernelLocks(SERVER), KernelLocks(SERVER)  # two workers
    outcome: list = []

    def wait_for_the_lock() -> None:
        try:
            with waiter.hold(START_LOCK, time.monotonic() + 10) as acquired:
                outcome.append(acquired)
        except Exception as err:  # noqa: BLE001 - the test reports it
            outcome.append(err)

    with holder.hold(START_LOCK, time.monotonic() + 5) as acquired:
        assert acquired
        thread = threading.Thread(target=wait_for_the_lock)
        thread.start()
        time.sleep(0.3)
        shutil.rmtree(tmp_path / f"jupyter-kernel-proxy-{os.getuid()}")  # a /tmp cleaner
        private_directory(SERVER)  # made again (by another worker's lock)
    thread.join(10)
    assert outcome == [True]


def _hold_then_forget(kernel_id: str, ready, go) -> None:
    locks = KernelLocks(SERVER)
    with locks.hold(kernel_id, time.monotonic() + 5) as acquired:
        assert acquired
        ready.set()
        go.wait(10)
        locks.forget(kernel_id)  # shut down: in the manager, before the lock is let go


def test_callers_waiting_for_a_kernel_forgotten_in_another_process_are_told_it_is_gone(
        monkeypatch):
    ready, go = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_then_forget, args=("k9", ready, go))
    holder.start()
    try:
        assert ready.wait(10)
        locks = KernelLocks(SERVER)
        outcome: list[BaseException] = []

        def wait_for_it() -> None:
            try:
                with locks.hold("k9", time.monotonic() + 10):
                    pass
            except KernelNotFound as err:
                outcome.append(err)

        before = _lock_waiters()
        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        deadline = time.monotonic() + 10
        while _lock_waiters() == before and time.monotonic() < deadline:
            time.sleep(0.01)  # until it waits on the lock file
        go.set()
        waiter.join(10)
        assert len(outcome) == 1
        with pytest.raises(KernelNotFound), locks.hold("k9", time.monotonic() + 10):
            pass  # and remembered: a later caller is not sent to the server either
        monkeypatch.setattr("app.kernels.locks.FORGOTTEN_SECONDS", 0.0)
        locks.forget("k9")
        with locks.hold("k9", time.monotonic() + 10) as acquired:
            assert acquired  # for a while only: by then the server knows better
    finally:
        holder.join(10)


def test_a_failing_cancel_check_leaves_the_kernel_to_the_others():
    locks = KernelLocks(SERVER)

    def broken() -> bool:
        raise RuntimeError("the check failed")

    with locks.hold("k10", time.monotonic() + 10):
        with pytest.raises(RuntimeError), locks.hold("k10", time.monotonic() + 10, broken):
            pass
        assert locks.waiting("k10") == 0
    with locks.hold("k10", time.monotonic() + 1) as acquired:
        assert acquired


def _reserve_until_killed(name: str, ready) -> None:
    with KernelLocks(SERVER).reserve(name):
        ready.set()
        time.sleep(60)


def test_a_reservation_counts_in_every_process_until_it_ends_or_its_process_dies():
    import signal
    import uuid

    locks = KernelLocks(SERVER)
    mine, theirs = str(uuid.uuid4()), str(uuid.uuid4())
    with locks.reserve(mine):
        assert mine in KernelLocks(SERVER).reserved()  # as another worker sees it
    assert mine not in locks.reserved()
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_reserve_until_killed, args=(theirs, ready))
    holder.start()
    try:
        assert ready.wait(10)
        assert theirs in locks.reserved()
        os.kill(holder.pid, signal.SIGKILL)  # no clean-up runs: its file stays behind
        holder.join(10)
        assert theirs not in locks.reserved()
        assert not [path for path in locks._directory.iterdir() if theirs in path.name]
    finally:
        holder.kill()


def test_the_lock_directory_is_kept_from_tmp_cleaners(tmp_path, monkeypatch):
    """systemd-tmpfiles' age-based clean-up of /tmp (10 days on most systems) skips a
    directory with an `flock` on it: the job store, a pool's list or a lock file not used for
    days stay while the proxy runs."""
    import subprocess
    import tempfile

    from app.kernels import locks

    if shutil.which("systemd-tmpfiles") is None:
        pytest.skip("systemd-tmpfiles is not installed")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # a /tmp of the test's own
    KernelLocks("http://kept.test:8888")
    directory = locks.lock_directory("http://kept.test:8888")
    monkeypatch.delitem(locks._kept, directory)  # (the test's process lets go after it)
    idle = directory / "jobs.sqlite3"
    idle.write_text("as old as can be")
    os.utime(idle, (978307200, 978307200))  # 2001
    config = tmp_path / "clean-tmp.conf"
    config.write_text(f"e {tmp_path} - - - m:1d\n")  # "m": by modification time
    subprocess.run(["systemd-tmpfiles", "--clean", str(config)], check=True)
    assert idle.exists()


def test_a_forked_child_does_not_keep_a_lock_its_parent_lets_go_of():
    from tests.conftest import forked_manager

    server = "http://forked.test:8888"
    holding = ("with manager._locks.hold('kernel-starts', time.monotonic() + 5) as held:\n"
               "    fork()  # a worker forked while the master's pool counts a start")
    with forked_manager(server, holding):
        with KernelLocks(server).hold(START_LOCK, time.monotonic() + 2) as acquired:
            assert acquired  # the parent let go; the child's copy of the file holds nothing


def _lock_file(kernel_id: str):
    from app.kernels.locks import lock_directory

    return lock_directory(SERVER) / f"{kernel_id}.lock"


def _age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_lock_files_no_one_took_for_an_hour_are_removed_and_made_again_when_needed():
    """Kernels shut down by other clients of the server, or culled by it, leave their lock
    files: a worker removes those not taken for STALE_SECONDS (and keeps held and recent ones).
    """
    from app.kernels.locks import STALE_SECONDS

    locks = KernelLocks(SERVER)
    locks._next_sweep = float("inf")  # no sweep of its own in the background: this test's
    for kernel_id in ("culled", "recent"):
        with locks.hold(kernel_id, time.monotonic() + 5):
            pass
    _age(_lock_file("culled"), STALE_SECONDS + 60)
    with locks.hold("running-for-hours", time.monotonic() + 5) as acquired:
        assert acquired
        _age(_lock_file("running-for-hours"), STALE_SECONDS + 60)
        assert locks.sweep() == 1
        assert not _lock_file("culled").exists()
        assert _lock_file("recent").exists() and _lock_file("running-for-hours").exists()
    with locks.hold("culled", time.monotonic() + 5) as acquired:  # used again after all
        assert acquired
        assert locks.last_user("culled") == os.getpid()


def test_each_worker_sweeps_stale_lock_files_when_it_first_takes_a_lock():
    from app.kernels.locks import STALE_SECONDS, private_directory

    private_directory(SERVER)
    _lock_file("culled-2").write_text(f"{os.getpid():<15}\n")  # left by an older worker
    _age(_lock_file("culled-2"), STALE_SECONDS + 60)
    with KernelLocks(SERVER).hold("k12", time.monotonic() + 5):  # a new worker's first call
        pass
    deadline = time.monotonic() + 10
    while _lock_file("culled-2").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _lock_file("culled-2").exists()


def test_half_made_files_of_a_process_killed_while_writing_them_are_swept():
    """`create_held` makes a pool list or a start's reservation under a hidden name, then
    renames it: a process killed in between leaves the hidden file, which the sweep removes
    once it is as old as a stale lock file (held or recent ones, and named files, stay)."""
    import fcntl

    from app.kernels.locks import MAKING, STALE_SECONDS, create_held, private_directory

    server = "http://half-made.test:8888"  # a directory of its own: no other test's files
    locks = KernelLocks(server)
    locks._next_sweep = float("inf")  # no sweep of its own in the background: this test's
    directory = private_directory(server)
    left = [directory / f"{MAKING}{name}" for name in ("pool-1-0badf00d.ids", "start-k15")]
    being_made = directory / f"{MAKING}pool-2-0badf00d.ids"  # its maker holds it (and is slow)
    recent = directory / f"{MAKING}start-k16"
    named = directory / "pool-3-0badf00d.ids"  # whole: `reap`'s to judge, not the sweep's
    try:
        for path in (*left, being_made, recent):
            path.write_text("a1b2c3d4-0000-4000-8000-000000000000\n")
        os.close(create_held(directory, named.name, b"listed\n"))
        for path in (*left, being_made, named):
            _age(path, STALE_SECONDS + 60)
        holder = os.open(being_made, os.O_RDONLY)
        try:
            fcntl.flock(holder, fcntl.LOCK_EX)
            locks.sweep()
        finally:
            os.close(holder)
        assert not any(path.exists() for path in left)
        assert being_made.exists() and recent.exists()
        assert named.read_text() == "listed\n"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_caller_waiting_on_a_lock_file_that_is_removed_takes_the_new_one():
    """A lock file removed while callers wait on it (a /tmp cleaner): the kernel is not gone
    (forget() would have said so in the file), and the lock is the new file's."""
    import fcntl

    locks = KernelLocks(SERVER)
    outcome: list = []

    def wait_for_it() -> None:
        try:
            with locks.hold("k13", time.monotonic() + 10) as acquired:
                outcome.append(acquired)
                probe = os.open(_lock_file("k13"), os.O_RDONLY)
                try:  # another worker opening the file now finds it held
                    with pytest.raises(BlockingIOError):
                        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    outcome.append("held")
                finally:
                    os.close(probe)
        except Exception as err:  # noqa: BLE001 - the test reports it
            outcome.append(err)

    with held_elsewhere("k13", 2.0):
        before = _lock_waiters()
        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        deadline = time.monotonic() + 10
        while _lock_waiters() == before and time.monotonic() < deadline:
            time.sleep(0.01)  # until it waits on the lock file
        _lock_file("k13").unlink()  # a /tmp cleaner
        waiter.join(10)
    assert outcome == [True, "held"]


def test_callers_of_a_kernel_being_forgotten_are_told_it_is_gone_before_its_file_goes():
    """forget() writes "gone" into the file, then removes it: a caller that takes the file in
    between learns it too (and does not overwrite it for those behind it)."""
    locks = KernelLocks(SERVER)
    with locks.hold("k14", time.monotonic() + 5):
        pass
    fd = os.open(_lock_file("k14"), os.O_WRONLY)
    os.pwrite(fd, b"gone           \n", 0)  # forget() in another worker, half done
    os.close(fd)
    for _ in range(2):
        with pytest.raises(KernelNotFound), KernelLocks(SERVER).hold("k14", time.monotonic() + 5):
            pass


def test_a_sweep_goes_on_past_an_entry_it_cannot_remove():
    from app.kernels.locks import STALE_SECONDS

    locks = KernelLocks(SERVER)
    locks._next_sweep = float("inf")  # no sweep of its own in the background: this test's
    with locks.hold("culled-3", time.monotonic() + 5):
        pass
    odd = _lock_file("a-directory")
    odd.mkdir()  # not a lock file
    for path in (odd, _lock_file("culled-3")):
        _age(path, STALE_SECONDS + 60)
    try:
        assert locks.sweep() == 1
        assert not _lock_file("culled-3").exists()
    finally:
        odd.rmdir()
