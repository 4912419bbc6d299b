"""A pool of ready kernels: started ahead of need, so that `start_kernel` answers at once.

Each process (gunicorn worker) keeps up to `size` ready kernels of the default kernel spec; a
request for another spec starts its kernel as usual. A kernel is handed out only after it
answered a request (a killed or hung one does not), and the pool refills in the background.
Closing the pool shuts its kernels down; the kernels of a pool whose process died without
closing it (SIGKILL, the OOM killer, gunicorn killing a stuck worker) are shut down by the next
pool to start on the host (`PoolLedger`).

Lock story: one condition variable guards the list of ready kernels, the kernel being started
and the ledger. Takers pop under it and never wait; the one filler thread starts kernels
(blocking calls) outside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from app.kernels.errors import KernelError
from app.kernels.locks import create_held, take_if_abandoned
from app.kernels.protocol import is_canonical_uuid

log = logging.getLogger(__name__)

RETRY_SECONDS = (1.0, 30.0)  # first and longest pause after a failed start
# Starting a kernel takes a core for a few hundred ms: let the kernel just handed out answer its
# first request before the replacement competes with it for the CPU.
REFILL_DELAY_SECONDS = 0.5


class KernelPool:
    """Ready kernels of one kernel spec."""

    def __init__(self, size: int, kernel_name: str, start: Callable[[str], dict[str, Any]],
                 alive: Callable[[str], bool], shutdown: Callable[..., None],
                 ledger: PoolLedger | None = None) -> None:
        """`start(kernel_id)` starts a kernel under that new id (the server may choose another)
        and returns its model once it is ready; `shutdown(kernel_id, starting=False)` shuts one
        down (`starting`: its start may still be under way)."""
        self.size = size
        self.kernel_name = kernel_name
        self._start = start
        self._alive = alive
        self._shutdown = shutdown
        self._ledger = ledger
        self._ready: list[dict[str, Any]] = []
        self._starting: str | None = None  # the id of the kernel the filler is starting
        self._changed = threading.Condition()
        self._closed = False
        self._filler: threading.Thread | None = None
        # Kernels that did not answer, being shut down in the background; listed meanwhile.
        self._dropping: dict[str, threading.Thread] = {}

    def take(self, kernel_name: str) -> dict[str, Any] | None:
        """A ready, living kernel of `kernel_name`, or None if the pool has none."""
        self.start()
        if kernel_name != self.kernel_name:
            return None
        while True:
            with self._changed:
                if not self._ready:
                    return None
                kernel = self._ready.pop(0)
                self._record()  # before anyone has it: a ledger never lists a client's kernel
                self._changed.notify_all()  # the filler starts a replacement
            if self._alive(kernel["id"]):
                return kernel
            log.warning("dropped a pooled kernel that does not answer", extra={
                "context": {"kernel_id": kernel["id"]}})
            self._drop(kernel["id"])

    def __len__(self) -> int:
        with self._changed:
            return len(self._ready)

    def wait_until_full(self, timeout: float) -> bool:
        """Blocks until the pool holds `size` kernels (for tests and warm-up)."""
        self.start()
        with self._changed:
            return self._changed.wait_for(lambda: len(self._ready) >= self.size or self._closed,
                                          timeout)

    def close(self, timeout: float = 15.0) -> None:
        """Stops refilling and shuts the ready kernels down, and the one being started and
        those being dropped (waiting up to `timeout` in all for them); safe to call twice.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            self._closed = True
            kernels, self._ready = self._ready, []
            self._changed.notify_all()
            filler, dropping = self._filler, list(self._dropping.values())
        for kernel in kernels:
            self._shutdown_quietly(kernel["id"])
        if filler is not None and filler is not threading.current_thread():
            filler.join(max(deadline - time.monotonic(), 0))  # it shuts down what it started
            if filler.is_alive():
                log.warning("a kernel the pool was starting may be left running")
        for thread in dropping:
            thread.join(max(deadline - time.monotonic(), 0))
        if self._ledger is not None:
            with self._changed:  # what is still going stays listed, for the next pool
                self._ledger.close(starting=self._starting, left=list(self._dropping))

    def forget_inherited(self) -> None:
        """In a forked child: the parent's ready kernels and their list stay the parent's."""
        if self._ledger is not None:
            self._ledger.forget_inherited()

    def _drop(self, kernel_id: str) -> None:
        """Shuts down a kernel that did not answer (it may only be unreachable: never leak it),
        in the background: the server gives a hung kernel seconds to go before it kills it,
        which is not the time of whoever asked for a kernel. It stays in the ledger until it
        is gone, and `close()` waits for it."""
        with self._changed:
            closed = self._closed
            if not closed:
                self._dropping[kernel_id] = dropping = threading.Thread(
                    target=self._finish_drop, args=(kernel_id,), daemon=True,
                    name="kernel-pool-drop")
                self._record()
        if closed:
            self._shutdown_quietly(kernel_id)
        else:
            dropping.start()

    def _finish_drop(self, kernel_id: str) -> None:
        try:
            self._shutdown_quietly(kernel_id)
        finally:
            with self._changed:
                del self._dropping[kernel_id]
                if not self._closed:
                    self._record()

    def _shutdown_quietly(self, kernel_id: str, starting: bool = False) -> None:
        try:
            self._shutdown(kernel_id, starting=starting)
        except KernelError:
            log.warning("could not shut down a pooled kernel",
                        extra={"context": {"kernel_id": kernel_id}})

    def start(self) -> None:
        """Starts filling in the background (again, if the filler died); cheap to repeat."""
        with self._changed:
            if self.size > 0 and not self._closed and (
                    self._filler is None or not self._filler.is_alive()):
                self._filler = threading.Thread(target=self._fill_forever, daemon=True,
                                                name="kernel-pool-filler")
                self._filler.start()

    def _fill_forever(self) -> None:
        if self._ledger is not None:
            try:
                self._ledger.reap(self._shutdown_quietly)
            except Exception:  # the pool fills all the same
                log.exception("could not shut down the pooled kernels of dead processes")
        pause = RETRY_SECONDS[0]
        while True:
            with self._changed:
                full = len(self._ready) >= self.size
                self._changed.wait_for(lambda: self._closed or len(self._ready) < self.size)
                if full and not self._closed:
                    self._changed.wait(REFILL_DELAY_SECONDS)  # closing cuts this short
                if self._closed:
                    return
                self._starting = str(uuid.uuid4())
                self._record()  # listed before it starts: a start cut short leaks nothing
            try:
                kernel = self._start(self._starting)
            except KernelError as err:
                with self._changed:
                    self._starting = None  # shut down already, or watched (`orphans`)
                    self._record()
                log.warning("could not start a kernel for the pool; retrying",
                            extra={"context": {"reason": err.message, "retry_in_s": pause}})
                with self._changed:
                    self._changed.wait(pause)
                pause = min(pause * 2, RETRY_SECONDS[1])
                continue
            pause = RETRY_SECONDS[0]
            with self._changed:
                self._starting = None
                if not self._closed:
                    self._ready.append(kernel)
                    self._record()
                    self._changed.notify_all()
                    continue
            self._shutdown_quietly(kernel["id"])  # closed while it started
            return

    def _record(self) -> None:
        """Writes the pool's kernels to its ledger (under `_changed`)."""
        if self._ledger is not None:
            self._ledger.record([*(kernel["id"] for kernel in self._ready), *self._dropping],
                                self._starting)


class PoolLedger:
    """The ids of one pool's kernels, in a file of this server's private lock directory that
    the pool's process holds an `flock` on for as long as it lives (the kernel being started
    is listed before its start is asked for).

    The operating system releases that `flock` when the process dies, however it dies: `reap`
    (the next pool to start on the host for the same server: the dead worker's replacement, or
    the proxy started again) takes the unlocked files and shuts their kernels down. The server
    may not know the kernel that was starting yet (the start may still be on its way), so that
    one is shut down with `starting=True`: looked for a while longer if the server says no such
    kernel.

    An id leaves the file before its kernel is handed out. Each new list is written to a new
    file that replaces the old one in one rename, so a process killed at any moment leaves a
    whole list. A write that fails gives the file up (those kernels would leak, as without a
    ledger): the file never lists a kernel a client was given.
    """

    PATTERN = "pool-*.ids"

    def __init__(self, directory: Path | None) -> None:
        """`directory`: private to this user (`locks.private_directory`); None: no ledger."""
        self.directory = directory
        self._fd: int | None = None
        self._path: Path | None = None

    def record(self, kernel_ids: Iterable[str], starting: str | None = None) -> None:
        """Replaces the list of the pool's kernels: those ready, and the one `starting`."""
        if self.directory is None:
            return
        lines = [f"{kernel_id}\n" for kernel_id in kernel_ids]
        if starting:
            lines.append(f"{starting} starting\n")
        data = "".join(lines).encode()
        try:
            if self._path is None:
                self._path = self.directory / f"pool-{os.getpid()}-{uuid.uuid4().hex[:8]}.ids"
            # (Also lists the kernels anew if a /tmp cleaner removed the file.)
            replaced, self._fd = self._fd, create_held(self.directory, self._path.name, data)
            if replaced is not None:
                # Its file is unlinked now: a `reap` that opened it before the rename and
                # takes its lock finds that out (`take_if_abandoned`) and leaves it alone.
                os.close(replaced)
        except OSError as err:
            log.warning("pooled kernels will not be shut down if this process is killed: "
                        "their list cannot be kept", extra={"context": {"reason": str(err)}})
            self._drop()

    def close(self, starting: str | None = None, left: Iterable[str] = ()) -> None:
        """Lets the file go for good: removed, or, with a kernel still `starting` or others
        `left` (still being shut down), unlocked and listing them for a later `reap`."""
        left = list(left)
        if (starting or left) and self._fd is not None:
            self.record(left, starting)  # (a failure drops the file)
            if self._fd is not None:
                os.close(self._fd)  # unlocked: the next pool's `reap` takes it
                self._fd = self._path = None
        self._drop()

    def reap(self, shutdown: Callable[..., Any]) -> list[str]:
        """Shuts down (with `shutdown(kernel_id, starting=...)`) the kernels listed by pools
        whose process is gone, and removes their files; returns those kernel ids."""
        reaped: list[str] = []
        if self.directory is None:
            return reaped
        for path in sorted(self.directory.glob(self.PATTERN)):
            try:
                with take_if_abandoned(path) as fd:
                    if fd is None:
                        continue  # its process lives (this process's own file included)
                    listed = [line.split() for line in os.pread(fd, 1 << 20, 0).decode(
                        errors="replace").splitlines()]
                    kernel_ids = []
                    for kernel_id, *marks in filter(None, listed):
                        if is_canonical_uuid(kernel_id):
                            shutdown(kernel_id, starting=marks == ["starting"])
                            kernel_ids.append(kernel_id)
                    os.ftruncate(fd, 0)
                    path.unlink()
            except FileNotFoundError:
                continue  # another pool reaped it first
            except OSError as err:
                log.warning("could not read a dead process's list of pooled kernels",
                            extra={"context": {"path": str(path), "reason": str(err)}})
                continue
            if kernel_ids:
                log.warning("shut down the pooled kernels of a process that died without "
                            "closing its pool", extra={"context": {"kernel_ids": kernel_ids}})
            reaped += kernel_ids
        return reaped

    def _drop(self) -> None:
        """Removes the file and stops keeping one. A file that can be neither removed nor
        emptied (a failing disk) may list a kernel a client was given: its lock is then kept
        for as long as this process lives."""
        if self._fd is not None:
            gone = False
            with contextlib.suppress(OSError):
                if self._path is not None:
                    self._path.unlink(missing_ok=True)
                    gone = True
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                gone = True
            if gone:
                os.close(self._fd)
            else:
                log.error("a list of pooled kernels can be neither removed nor emptied: it "
                          "stays locked until this process ends", extra={"context": {
                              "path": str(self._path)}})
        self._fd = self._path = None
        self.directory = None

    def forget_inherited(self) -> None:
        """In a forked child: lets go of the descriptor inherited from the parent, whose file
        and lock stay the parent's (held by the child too, they would outlive the parent)."""
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._path = None
        self.directory = None
