"""Per-kernel locks hold across processes (gunicorn workers), not only across threads."""

from __future__ import annotations

import multiprocessing
import threading
import time

from app.kernels.locks import KernelLocks

SERVER = "http://127.0.0.1:1"


def _hold_for(kernel_id: str, seconds: float, ready) -> None:
    with KernelLocks(SERVER).hold(kernel_id, time.monotonic() + 5) as acquired:
        assert acquired
        ready.set()
        time.sleep(seconds)


def test_a_kernel_held_by_another_process_is_not_acquired_before_the_deadline():
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_for, args=("k1", 1.5, ready))
    holder.start()
    try:
        assert ready.wait(10)
        started = time.monotonic()
        with KernelLocks(SERVER).hold("k1", time.monotonic() + 0.3) as acquired:
            assert acquired is False
        assert 0.25 < time.monotonic() - started < 1.2
        with KernelLocks(SERVER).hold("k1", time.monotonic() + 10) as acquired:
            assert acquired is True  # handed over once the other process let go
    finally:
        holder.join(10)


def test_other_kernels_are_not_blocked():
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_for, args=("k2", 1.0, ready))
    holder.start()
    try:
        assert ready.wait(10)
        with KernelLocks(SERVER).hold("k3", time.monotonic() + 0.2) as acquired:
            assert acquired is True
    finally:
        holder.join(10)


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
