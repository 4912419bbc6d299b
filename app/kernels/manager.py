"""`KernelManager`: start a kernel, run code on it, shut it down. The proxy's Python API.

Kernel state lives in the Jupyter server, not here: any manager (any worker) can drive any
kernel by id. Thread safety: a manager is shared by a worker's threads. Executions on one
kernel are serialized by a per-kernel lock that holds across the processes of one machine
(`locks.py`): the kernel runs one cell at a time, and a deadline must never interrupt another
request's code. Executions on different kernels run in parallel.
"""

from __future__ import annotations

import functools
import os
import time
import uuid
import weakref
from typing import Any

from app.kernels import protocol
from app.kernels.channel import KernelChannel
from app.kernels.client import JupyterClient
from app.kernels.connections import ChannelCache
from app.kernels.locks import KernelLocks
from app.kernels.pool import KernelPool
from app.kernels.errors import (
    CodeTooLarge,
    InvalidRequest,
    KernelError,
    TooManyKernels,
    UpstreamTimeout,
)
from app.kernels.execution import INTERRUPT_GRACE_SECONDS, End, Message, run_execution
from app.kernels.result import ExecutionResult
from app.logs import StructuredLogger
from app.metrics import metrics


START_LOCK = "kernel-starts"  # the lock name that serializes counted kernel starts


def check_kernel_id(kernel_id: str) -> str:
    """`kernel_id` if it is a canonical UUID; anything else never reaches an upstream URL."""
    try:
        if isinstance(kernel_id, str) and str(uuid.UUID(kernel_id)) == kernel_id:
            return kernel_id
    except ValueError:
        pass
    raise InvalidRequest("id must be a kernel id: a canonical UUID such as "
                         "'0b0c4f8e-7d41-4d5c-9a53-2f8a1c6b9e10'", field="id")


def _check_text(value: str, field: str) -> None:
    """Refuses what cannot be sent to the Jupyter server as text."""
    try:
        if isinstance(value, str):
            value.encode("utf-8")
            return
    except UnicodeEncodeError:
        pass
    raise InvalidRequest(f"{field} must be valid Unicode text", field=field)


class KernelManager:
    """Starts kernels, executes code on them and shuts them down, blocking, with deadlines."""

    def __init__(self, client: JupyterClient, logger: StructuredLogger | None = None,
                 pool_size: int | None = None) -> None:
        """`pool_size` ready kernels are kept (default: the `pool_size` setting)."""
        self.client = client
        self.settings = client.settings
        self.logger = logger or StructuredLogger(__name__)
        self._pool_size = self.settings.pool_size if pool_size is None else pool_size
        self._set_up_process_state()
        # A forked child (gunicorn's preload_app) must not share our websockets, pool or locks.
        os.register_at_fork(after_in_child=functools.partial(_after_fork, weakref.ref(self)))

    def _set_up_process_state(self) -> None:
        """What belongs to one process: warm websockets, ready kernels, thread locks."""
        self._locks = KernelLocks(self.client.base_url, self.settings.max_queued_executions)
        self._channels = ChannelCache(self.settings.max_idle_connections)
        self._pool = KernelPool(self._pool_size, self.settings.kernel_name,
                                start=lambda: self._start_new(self.settings.kernel_name,
                                                              warm=True),
                                alive=self._is_alive, shutdown=self.client.shutdown_kernel) \
            if self._pool_size > 0 else None

    def start_kernel(self, name: str | None = None) -> dict[str, Any]:
        """Starts a kernel of spec `name` (default: settings) and returns once it can execute.

        Returns `{"id", "name"}` plus the server's `execution_state` and `last_activity`. With
        a pool, a ready kernel of the default spec is handed out at once. A kernel that does
        not become ready in `kernel_start_timeout` is shut down again.
        """
        name = name or self.settings.kernel_name
        kernel = self._pool.take(name) if self._pool else None
        if kernel is not None:
            self.logger.info("kernel handed out from the pool", kernel_id=kernel["id"],
                             kernel_name=name)
            metrics().kernels_started.labels("pool").inc()
            return kernel
        kernel = self._start_new(name)
        metrics().kernels_started.labels("new").inc()
        return kernel

    def warm_up(self) -> None:
        """Starts filling the kernel pool in the background (if there is one)."""
        if self._pool is not None:
            self._pool.start()

    def _start_new(self, name: str, warm: bool = False) -> dict[str, Any]:
        """Starts a kernel and waits until it is ready; `warm` also runs a silent first cell,
        which costs a new kernel twice an ordinary one (imports, history set-up).
        """
        started = time.monotonic()
        model = self._start_counted(name, started + self.settings.kernel_start_timeout)
        kernel_id = model["id"]
        deadline = started + self.settings.kernel_start_timeout
        try:
            self._wait_until_ready(kernel_id, deadline)
            if warm:
                for _ in run_execution(_Kernel(self.client, self._channels, kernel_id), "None",
                                       deadline, timeout=self.settings.kernel_start_timeout,
                                       crash_wait=0, silent=True,
                                       connect_timeout=self.settings.timeout_connect):
                    pass
        except BaseException:
            self._shutdown_quietly(kernel_id)  # nobody else knows its id: never leave it
            raise
        self.logger.info("kernel started", kernel_id=kernel_id, kernel_name=name,
                         duration_ms=round((time.monotonic() - started) * 1000, 1))
        return {"id": kernel_id, "name": model.get("name", name),
                "execution_state": "idle", "last_activity": model.get("last_activity")}

    def _start_counted(self, name: str, deadline: float) -> dict[str, Any]:
        """`POST /api/kernels`, refused once the server runs `max_kernels` (0: no limit).

        With a limit, counting and starting hold one lock across this host's workers, so that
        concurrent starts cannot both slip under it.
        """
        limit = self.settings.max_kernels
        if not limit:
            return self.client.start_kernel(name)
        with self._locks.hold(START_LOCK, deadline) as acquired:
            if not acquired:
                raise UpstreamTimeout("other kernel starts kept this one waiting too long")
            if len(self.client.list_kernels()) >= limit:
                raise TooManyKernels(f"the Jupyter server already runs {limit} kernels, as "
                                     "many as JUPYTER_MAX_KERNELS allows; shut one down first",
                                     max_kernels=limit)
            return self.client.start_kernel(name)

    def _is_alive(self, kernel_id: str) -> bool:
        """True if the kernel still answers: its warm channel is clean, or one can be opened."""
        channel = self._channels.take(kernel_id)
        if channel is None:
            try:
                channel = self.client.open_channel(kernel_id)
            except KernelError:
                return False
        self._channels.give(channel)
        return True

    def execute_code(self, kernel_id: str, code: str,
                     timeout: float | None = None) -> dict[str, Any]:
        """Runs `code` on the kernel and returns the contract's answer (see `ExecutionResult`).

        `timeout` (seconds, default `execution_timeout`, at most `max_execution_timeout`) covers
        the whole call, waiting for the kernel included. An error in the code is an answer
        with `status: "error"`, not an exception.
        """
        check_kernel_id(kernel_id)
        timeout = self._check_timeout(timeout)
        _check_text(code, "code")
        if len(code.encode()) > self.settings.max_code_bytes:
            raise CodeTooLarge(f"the code is longer than JUPYTER_MAX_CODE_BYTES "
                               f"({self.settings.max_code_bytes} bytes) allows")
        started = time.monotonic()
        deadline = started + timeout
        result = ExecutionResult(self.settings.max_output_bytes)
        with self._locks.hold(kernel_id, deadline) as acquired:
            if acquired:
                end = End()
                for event in run_execution(
                        _Kernel(self.client, self._channels, kernel_id), code, deadline,
                        timeout=timeout,
                        crash_wait=self.settings.crash_sleep_duration,
                        connect_timeout=self.settings.timeout_connect):
                    if isinstance(event, Message):
                        result.add(event.message, event.size)
                    else:
                        end = event
                result.truncated |= end.output_lost
                answer = result.answer(end.status, end.error)
            else:
                answer = result.answer("timeout", {
                    "ename": "ExecutionTimeout",
                    "evalue": f"the kernel stayed busy with earlier code for the whole "
                              f"{timeout:g} s deadline; this code did not run",
                    "traceback": []})
        elapsed = time.monotonic() - started
        self.logger.info("code executed", kernel_id=kernel_id, status=answer["status"],
                         duration_ms=round(elapsed * 1000, 1))
        metrics().executions.labels(answer["status"]).inc()
        metrics().execution_seconds.observe(elapsed)
        return answer

    def shutdown_kernel(self, kernel_id: str) -> dict[str, str]:
        """Shuts the kernel down; raises `KernelNotFound` if the server has no such kernel."""
        check_kernel_id(kernel_id)
        self.client.shutdown_kernel(kernel_id)
        self._channels.forget(kernel_id)
        self._locks.forget(kernel_id)
        self.logger.info("kernel shut down", kernel_id=kernel_id)
        metrics().kernels_shut_down.inc()
        return {"message": f"Kernel {kernel_id} shutdown"}

    def _wait_until_ready(self, kernel_id: str, deadline: float) -> None:
        """Returns once the kernel answers a `kernel_info_request`."""
        remaining = deadline - time.monotonic()
        channel = self.client.open_channel(kernel_id, timeout=max(remaining, 0.1))
        try:
            request = protocol.kernel_info_request(channel.session_id)
            msg_id = request["header"]["msg_id"]
            channel.send(request)
            while (remaining := deadline - time.monotonic()) > 0:
                received = channel.recv(remaining)
                if received and received[0].get("msg_type") == "kernel_info_reply" \
                        and protocol.parent_id(received[0]) == msg_id:
                    self._channels.give(channel)  # warm for the first execution
                    channel = None
                    return
        finally:
            if channel is not None:
                channel.close()
        raise UpstreamTimeout(f"the kernel did not become ready within "
                              f"{self.settings.kernel_start_timeout:g} s", kernel_id=kernel_id)

    def close(self) -> None:
        """Shuts the pooled kernels down and closes the warm websockets; safe to call twice."""
        if self._pool is not None:
            self._pool.close()
        self._channels.close()

    def __enter__(self) -> KernelManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return self.settings.execution_timeout
        limit = self.settings.max_execution_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not 0 < timeout <= limit:
            raise InvalidRequest(f"timeout must be a number of seconds greater than 0 and at "
                                 f"most {limit:g} (JUPYTER_MAX_EXECUTION_TIMEOUT)",
                                 field="timeout")
        return float(timeout)

    def _shutdown_quietly(self, kernel_id: str) -> None:
        try:
            self.client.shutdown_kernel(kernel_id)
        except KernelError:
            self.logger.warning("could not shut down a kernel that failed to start",
                                kernel_id=kernel_id)


def _after_fork(manager_ref: weakref.ref) -> None:
    """In a forked child: fresh per-process state; the parent's stays the parent's."""
    manager = manager_ref()
    if manager is not None:
        manager.client.reset_connections()
        manager._set_up_process_state()


class _Kernel:
    """One kernel as the execution loop sees it (`execution.KernelControl`): channels come
    from the worker's cache of warm websockets and go back to it.
    """

    def __init__(self, client: JupyterClient, channels: ChannelCache, kernel_id: str) -> None:
        self.client = client
        self.channels = channels
        self.kernel_id = kernel_id

    def connect(self, session_id: str | None, timeout: float) -> KernelChannel:
        if session_id is None:
            warm = self.channels.take(self.kernel_id)
            if warm is not None:
                return warm
        return self.client.open_channel(self.kernel_id, timeout, session_id)

    def release(self, channel: KernelChannel, reusable: bool) -> None:
        if reusable:
            self.channels.give(channel)
        else:
            channel.close()

    def describe(self) -> dict[str, Any]:
        return self.client.get_kernel(self.kernel_id)

    def interrupt(self) -> None:
        self.client.interrupt_kernel(self.kernel_id, timeout=INTERRUPT_GRACE_SECONDS)

    def restart(self) -> None:
        self.client.restart_kernel(self.kernel_id)
