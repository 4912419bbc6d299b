"""A pool of ready kernels: started ahead of need, so that `start_kernel` answers at once.

Each process (gunicorn worker) keeps up to `size` ready kernels of the default kernel spec; a
request for another spec starts its kernel as usual. A kernel is handed out only after a check
that it is still alive, and the pool refills in the background. Closing the pool shuts its
kernels down.

Lock story: one condition variable guards the list of ready kernels and the counters. Takers pop
under it and never wait; the one filler thread starts kernels (blocking calls) outside it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from app.kernels.errors import KernelError

log = logging.getLogger(__name__)

RETRY_SECONDS = (1.0, 30.0)  # first and longest pause after a failed start
# Starting a kernel takes a core for a few hundred ms: let the kernel just handed out answer its
# first request before the replacement competes with it for the CPU.
REFILL_DELAY_SECONDS = 0.5


class KernelPool:
    """Ready kernels of one kernel spec."""

    def __init__(self, size: int, kernel_name: str, start: Callable[[], dict[str, Any]],
                 alive: Callable[[str], bool], shutdown: Callable[[str], None]) -> None:
        self.size = size
        self.kernel_name = kernel_name
        self._start = start
        self._alive = alive
        self._shutdown = shutdown
        self._ready: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._closed = False
        self._filler: threading.Thread | None = None

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
                self._changed.notify_all()  # the filler starts a replacement
            if self._alive(kernel["id"]):
                return kernel
            log.warning("dropped a pooled kernel that does not answer", extra={
                "context": {"kernel_id": kernel["id"]}})
            self._shutdown_quietly(kernel["id"])  # it may only be unreachable: never leak it

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
        """Stops refilling and shuts the ready kernels down, and the one being started (waiting
        up to `timeout` for it); safe to call twice.
        """
        with self._changed:
            self._closed = True
            kernels, self._ready = self._ready, []
            self._changed.notify_all()
            filler = self._filler
        for kernel in kernels:
            self._shutdown_quietly(kernel["id"])
        if filler is not None and filler is not threading.current_thread():
            filler.join(timeout)  # it shuts down the kernel it was starting
            if filler.is_alive():
                log.warning("a kernel the pool was starting may be left running")

    def _shutdown_quietly(self, kernel_id: str) -> None:
        try:
            self._shutdown(kernel_id)
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
        pause = RETRY_SECONDS[0]
        while True:
            with self._changed:
                full = len(self._ready) >= self.size
                self._changed.wait_for(lambda: self._closed or len(self._ready) < self.size)
                if full and not self._closed:
                    self._changed.wait(REFILL_DELAY_SECONDS)  # closing cuts this short
                if self._closed:
                    return
            try:
                kernel = self._start()
            except KernelError as err:
                log.warning("could not start a kernel for the pool; retrying",
                            extra={"context": {"reason": err.message, "retry_in_s": pause}})
                with self._changed:
                    self._changed.wait(pause)
                pause = min(pause * 2, RETRY_SECONDS[1])
                continue
            pause = RETRY_SECONDS[0]
            with self._changed:
                if not self._closed:
                    self._ready.append(kernel)
                    self._changed.notify_all()
                    continue
            self._shutdown_quietly(kernel["id"])  # closed while it started
            return
