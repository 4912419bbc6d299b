"""Warm websockets: open kernel channels kept between executions, so that no request pays a
websocket handshake (or, with TCP keep-alive, a TCP connect) on its hot path.

Lock story: a channel is either idle in the cache or owned by exactly one thread. `take()`
removes it from the cache under the cache's lock and hands it over; `give()` puts it back.
No thread reads a channel it does not own, so two threads never `recv()` on one websocket; the
janitor thread takes idle channels like any caller. No I/O happens under the lock.

An idle channel still receives what the kernel broadcasts (other clients' output, a restart, a
shutdown). Whoever takes it first reads everything pending: a channel whose kernel was shut
down or is dead is closed instead of handed out, and so is one with more pending than can be
read quickly. The janitor does the same every few seconds, so that nothing piles up on the
server for an idle connection, and closes channels idle for too long, or idle while another
worker process uses their kernel: the server copies every iopub message to each connection of
a kernel, so a kernel should not keep one per worker. At most `capacity` idle
channels are kept; the least recently used go first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from app.kernels import protocol
from app.kernels.channel import KernelChannel
from app.kernels.errors import KernelError

log = logging.getLogger(__name__)

IDLE_SECONDS = 300.0  # an idle channel older than this is closed
SWEEP_SECONDS = 2.0  # how often the janitor reads idle channels
DRAIN_SECONDS = 0.25  # longest a take() spends reading what piled up on an idle channel


class ChannelCache:
    """Idle kernel channels of one process, at most one per kernel."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.monotonic,
                 used_elsewhere: Callable[[str], bool] | None = None) -> None:
        """`used_elsewhere(kernel_id)` says whether another process ran code on the kernel
        since this one did (see `KernelLocks.last_user`).
        """
        self.capacity = capacity
        self.clock = clock
        self.used_elsewhere = used_elsewhere
        self._lock = threading.Lock()
        self._idle: OrderedDict[str, tuple[KernelChannel, float]] = OrderedDict()
        self._janitor: threading.Thread | None = None
        self._closed = threading.Event()

    def take(self, kernel_id: str) -> KernelChannel | None:
        """The kernel's idle channel, read up and known alive, or None."""
        with self._lock:
            entry = self._idle.pop(kernel_id, None)
        if entry is None:
            return None
        channel = entry[0]
        if drain(channel, time.monotonic() + DRAIN_SECONDS):
            return channel
        channel.close()
        return None

    def give(self, channel: KernelChannel) -> None:
        """Keeps `channel` for the next execution on its kernel (or closes it if no room)."""
        if self.capacity <= 0 or self._closed.is_set():
            channel.close()
            return
        surplus: list[KernelChannel] = []
        with self._lock:
            old = self._idle.pop(channel.kernel_id, None)
            if old is not None:
                surplus.append(old[0])
            self._idle[channel.kernel_id] = (channel, self.clock())
            while len(self._idle) > self.capacity:
                surplus.append(self._idle.popitem(last=False)[1][0])
            self._start_janitor()
        for extra in surplus:
            extra.close()

    def forget(self, kernel_id: str) -> None:
        """Closes the idle channel of a kernel that is gone."""
        with self._lock:
            entry = self._idle.pop(kernel_id, None)
        if entry is not None:
            entry[0].close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._idle)

    def sweep(self) -> None:
        """Reads every idle channel; closes the dead, the overfull and the long idle."""
        now = self.clock()
        with self._lock:
            kernel_ids = list(self._idle)
        for kernel_id in kernel_ids:
            with self._lock:
                entry = self._idle.pop(kernel_id, None)
            if entry is None:
                continue  # taken meanwhile
            channel, since = entry
            try:
                usable = now - since <= IDLE_SECONDS and not self._used_elsewhere(
                    kernel_id, now - since) and drain(channel, time.monotonic() + DRAIN_SECONDS)
            except BaseException:
                channel.close()  # taken out of the cache: never leave it open
                raise
            if not usable:
                channel.close()
                continue
            with self._lock:
                if kernel_id in self._idle or self._closed.is_set():
                    keep = False  # someone gave one back meanwhile: keep theirs
                else:
                    self._idle[kernel_id] = (channel, since)
                    self._idle.move_to_end(kernel_id, last=False)  # keep its LRU place
                    keep = True
            if not keep:
                channel.close()

    def _used_elsewhere(self, kernel_id: str, idle: float) -> bool:
        """A channel idle for a sweep while another process uses its kernel is a duplicate."""
        if self.used_elsewhere is None or idle < SWEEP_SECONDS:
            return False
        try:
            return self.used_elsewhere(kernel_id)
        except OSError:
            return False

    def close(self) -> None:
        """Closes every idle channel and stops the janitor; safe to call twice."""
        self._closed.set()
        with self._lock:
            entries = list(self._idle.values())
            self._idle.clear()
        for channel, _ in entries:
            channel.close()

    def _start_janitor(self) -> None:
        if self._janitor is None or not self._janitor.is_alive():
            self._janitor = threading.Thread(target=self._sweep_forever, daemon=True,
                                             name="kernel-channel-janitor")
            self._janitor.start()

    def _sweep_forever(self) -> None:
        while not self._closed.wait(SWEEP_SECONDS):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the janitor must outlive any one bad channel
                log.exception("sweeping idle kernel channels failed")


def drain(channel: KernelChannel, until: float) -> bool:
    """Reads everything pending on an idle channel; False if its kernel is gone, the channel
    is broken, or more is pending than can be read by `until`.
    """
    try:
        while channel.pending():
            if time.monotonic() >= until:
                return False
            pongs = channel.pongs
            received = channel.recv(max(until - time.monotonic(), 0.001))
            if received is None:
                if channel.pongs > pongs:
                    continue  # a late answer to a ping: what follows it is read too
                break  # a ping, or a frame still arriving: the next reader finishes it
            if protocol.kernel_death_state(received[0]) in ("dead", "shutdown"):
                return False
    except KernelError:
        return False
    return True
