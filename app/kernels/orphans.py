"""Kernels nobody knows about, shut down when they appear.

A kernel start whose answer was lost (the `POST /api/kernels` read timed out on a slow
Enterprise Gateway launch or an overloaded server, the connection broke, a proxy in front of
the server answered 502) may still finish on the server, which then runs a kernel no client has
the id of, until someone shuts the server down. So the proxy chooses each new kernel's id
itself (`JupyterClient.start_kernel`), and `OrphanReaper` looks for such a start's kernel under
that id for `WATCH_SECONDS`, shutting it down once it appears. It also retries shutdowns of
kernels nobody else knows of (a start that failed half-way, a pooled kernel) that the server
did not confirm. A server that ignores the chosen id (see the README) starts its kernel under
another one, which stays unknown.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from app.kernels.errors import KernelError
from app.logs import StructuredLogger

WATCH_SECONDS = 600.0  # how long the kernel of a timed-out start is looked for
POLL_SECONDS = 5.0  # how often
MAX_WATCHED = 64  # timed-out starts watched at once, at most (the rest are only logged)


class OrphanReaper:
    """Watches the ids of kernels nobody knows of from one background thread (started when
    needed, gone when nothing is watched)."""

    def __init__(self, shutdown: Callable[[str], Any], logger: StructuredLogger,
                 poll_seconds: float = POLL_SECONDS) -> None:
        """`shutdown(kernel_id)` shuts a kernel down (raising `KernelNotFound` if there is
        none)."""
        self.shutdown = shutdown
        self.logger = logger
        self.poll_seconds = poll_seconds
        self._lock = threading.Lock()
        self._watched: dict[str, float] = {}  # kernel id -> until when (monotonic)
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def watch(self, kernel_id: str) -> None:
        """Shuts the kernel `kernel_id` down if it appears within `WATCH_SECONDS`."""
        with self._lock:
            if self._closed.is_set() or len(self._watched) >= MAX_WATCHED:
                self.logger.warning("a kernel nobody knows of may be left running: it is not "
                                    "watched (too many are, or the proxy is stopping)",
                                    kernel_id=kernel_id)
                return
            self._watched[kernel_id] = time.monotonic() + WATCH_SECONDS
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kernel-orphan-reaper",
                                                daemon=True)
                self._thread.start()
        self.logger.warning("a kernel nobody knows of may run on the server: it will be shut "
                            "down when it appears", kernel_id=kernel_id)

    @property
    def watched(self) -> list[str]:
        """The kernel ids being watched."""
        with self._lock:
            return list(self._watched)

    def _run(self) -> None:
        while not self._closed.wait(self.poll_seconds):
            with self._lock:
                now = time.monotonic()
                for kernel_id, until in list(self._watched.items()):
                    if until <= now:
                        del self._watched[kernel_id]
                if not self._watched:
                    self._thread = None
                    return
                pending = list(self._watched)
            for kernel_id in pending:
                if self._try_shutdown(kernel_id):
                    with self._lock:
                        self._watched.pop(kernel_id, None)

    def close(self) -> None:
        """Stops watching, after one last try at each kernel watched (the thread ends within
        a poll)."""
        with self._lock:
            self._closed.set()
            last = list(self._watched)
            self._watched.clear()
        for kernel_id in last:
            self._try_shutdown(kernel_id)

    def _try_shutdown(self, kernel_id: str) -> bool:
        """True if the kernel was shut down. Not found: not started (yet), or under an id of
        the server's choosing; another error: the server is unwell (the next round retries)."""
        try:
            self.shutdown(kernel_id)
        except KernelError:
            return False
        self.logger.info("shut down a kernel nobody knew of", kernel_id=kernel_id)
        return True
