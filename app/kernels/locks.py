"""Per-kernel locks that serialize executions across the threads *and* processes of a host.

A kernel runs one cell at a time, so requests for it queue anyway; queueing them here rather
than in the kernel means that a request whose deadline passes while it waits has not started,
and interrupting the kernel at a deadline can only ever stop the caller's own code.

Lock story: a `threading.Lock` per kernel id hands the kernel from thread to thread within a
process; an `flock` on a file per kernel id (in a private directory) hands it between gunicorn
workers. Both are taken with the caller's deadline (see `_flock_until`). Where no private
directory can be had, the lock is process-wide only, and a warning says so.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from app.kernels.errors import KernelBusy

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often a cancellable wait asks whether it was cancelled


class KernelLocks:
    """The locks of the kernels of one Jupyter server (named by its URL)."""

    def __init__(self, server_url: str, max_waiting: int = 0) -> None:
        """`max_waiting` callers may wait for a kernel in this process (0: no limit)."""
        self.max_waiting = max_waiting
        self._guard = threading.Lock()
        self._threads: dict[str, tuple[threading.Lock, int]] = {}
        self._directory = private_directory(server_url)

    @contextmanager
    def hold(self, kernel_id: str, deadline: float,
             cancelled: Callable[[], bool] | None = None) -> Iterator[bool]:
        """Holds the kernel's lock (yields True), or yields False if `deadline` passes first
        (or `cancelled`, asked every half second while waiting, says True).

        Raises `KernelBusy` at once if `max_waiting` callers already wait for this kernel.
        """
        with self._guard:
            lock, users = self._threads.get(kernel_id, (threading.Lock(), 0))
            if self.max_waiting and users > self.max_waiting:  # one holds it, the rest wait
                raise KernelBusy(f"{users - 1} executions already wait for this kernel "
                                 f"(JUPYTER_MAX_QUEUED_EXECUTIONS is {self.max_waiting}); "
                                 "try again when it is less busy", kernel_id=kernel_id)
            self._threads[kernel_id] = (lock, users + 1)
        try:
            if not _acquire(lock, deadline, cancelled):
                yield False
                return
            try:
                with self._file_lock(kernel_id, deadline, cancelled) as acquired:
                    yield acquired
            finally:
                lock.release()
        finally:
            with self._guard:
                lock, users = self._threads[kernel_id]
                if users > 1:
                    self._threads[kernel_id] = (lock, users - 1)
                else:
                    del self._threads[kernel_id]

    def last_user(self, kernel_id: str) -> int | None:
        """The pid of the process that last held the kernel's lock (None if unknown)."""
        if self._directory is None:
            return None
        try:
            text = (self._directory / f"{kernel_id}.lock").read_text()
        except FileNotFoundError:
            return None
        return int(text) if text.strip().isdigit() else None

    def forget(self, kernel_id: str) -> None:
        """Removes a shut-down kernel's lock file."""
        if self._directory is not None:
            (self._directory / f"{kernel_id}.lock").unlink(missing_ok=True)

    @contextmanager
    def _file_lock(self, kernel_id: str, deadline: float,
                   cancelled: Callable[[], bool] | None) -> Iterator[bool]:
        if self._directory is None:
            yield True
            return
        fd = os.open(self._directory / f"{kernel_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        if not _flock_until(fd, deadline, cancelled):
            yield False  # the waiter thread owns (and closes) the descriptor now
            return
        try:
            os.pwrite(fd, f"{os.getpid():<15}\n".encode(), 0)  # see last_user()
            yield True
        finally:
            os.close(fd)  # closing the descriptor releases the flock


def _flock_until(fd: int, deadline: float, cancelled: Callable[[], bool] | None = None) -> bool:
    """Takes the flock on `fd` before `deadline`; True if taken.

    flock has no timeout, so a blocking flock runs in a waiter thread while the caller waits
    with its deadline: the lock passes from worker to worker the moment it is released, with
    no polling. A caller that gives up leaves the descriptor to the waiter, which releases the
    lock (by closing it) as soon as it gets it.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass
    taken = threading.Event()
    state_lock = threading.Lock()
    abandoned = [False]

    def wait_for_lock() -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        with state_lock:
            taken.set()
            if abandoned[0]:
                os.close(fd)

    threading.Thread(target=wait_for_lock, daemon=True, name="kernel-lock-waiter").start()
    if _wait(taken, deadline, cancelled):
        return True
    with state_lock:
        if taken.is_set():
            return True  # got it just as the deadline passed
        abandoned[0] = True
    return False


def _acquire(lock: threading.Lock, deadline: float,
             cancelled: Callable[[], bool] | None) -> bool:
    """`lock.acquire` until `deadline`, giving up if `cancelled` says so."""
    return _wait_until(lambda seconds: lock.acquire(timeout=seconds), deadline, cancelled)


def _wait(event: threading.Event, deadline: float,
          cancelled: Callable[[], bool] | None) -> bool:
    """`event.wait` until `deadline`, giving up if `cancelled` says so."""
    return _wait_until(event.wait, deadline, cancelled)


def _wait_until(attempt: Callable[[float], bool], deadline: float,
                cancelled: Callable[[], bool] | None) -> bool:
    """Calls `attempt(seconds)` until it succeeds or `deadline` passes; with `cancelled`, in
    slices of `POLL_SECONDS`, giving up as soon as it says True.
    """
    while True:
        seconds = deadline - time.monotonic()
        if cancelled is not None:
            seconds = min(seconds, POLL_SECONDS)
        if attempt(max(seconds, 0)):
            return True
        if time.monotonic() >= deadline or (cancelled is not None and cancelled()):
            return False


def private_directory(server_url: str) -> Path | None:
    """A directory only this user can write, for this server's lock files."""
    digest = hashlib.sha256(server_url.encode()).hexdigest()[:16]
    top = Path(tempfile.gettempdir()) / f"jupyter-kernel-proxy-{os.getuid()}"
    path = top / digest
    try:
        top.mkdir(mode=0o700, exist_ok=True)
        info = top.lstat()  # lstat: a symlink planted by another user is refused below
        if not top.is_dir() or top.is_symlink() or info.st_uid != os.getuid() \
                or info.st_mode & 0o077:
            raise PermissionError(f"{top} is not a private directory")
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as err:
        log.warning("kernel locks are per process only: %s", err)
        return None
    return path
