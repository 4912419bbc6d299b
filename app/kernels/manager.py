"""`KernelManager`: start a kernel, run code on it, shut it down. The proxy's Python API.

Kernel state lives in the Jupyter server, not here: any manager (any worker) can drive any
kernel by id. Thread safety: a manager is shared by a worker's threads. Executions on one
kernel are serialized by a per-kernel lock that holds across the processes of one machine
(`locks.py`): the kernel runs one cell at a time, and a deadline must never interrupt another
request's code. Executions on different kernels run in parallel.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from app.kernels import protocol
from app.kernels.channel import KernelChannel
from app.kernels.client import START_REQUEST, JupyterClient
from app.kernels.connections import ChannelCache
from app.kernels.locks import START_LOCK, KernelLocks
from app.kernels.orphans import OrphanReaper
from app.kernels.pool import KernelPool, PoolLedger
from app.kernels.errors import (
    ClientGone,
    CodeTooLarge,
    InvalidRequest,
    KernelError,
    KernelNotFound,
    TooManyKernels,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.kernels.execution import (
    INTERRUPT_GRACE_SECONDS,
    LOOKUP_SECONDS,
    End,
    Event,
    Message,
    not_sent_error,
    run_execution,
)
from app.kernels.result import ExecutionResult
from app.logs import StructuredLogger
from app.metrics import metrics


_log = StructuredLogger(__name__)

CONTROL_CONNECT_SECONDS = 2.0  # per connection attempt of an execution's REST questions
READY_PROBE_SECONDS = 0.5  # a kernel that replied but published no status is asked again
READY_IOPUB_SECONDS = 3.0  # after its reply, how long a kernel's status is awaited at most
ALIVE_PROBE_SECONDS = 2.0  # how long a pooled kernel has to answer before it is handed out


def check_kernel_id(kernel_id: str) -> str:
    """`kernel_id` if it is a canonical UUID; anything else never reaches an upstream URL."""
    if protocol.is_canonical_uuid(kernel_id):
        return kernel_id
    raise InvalidRequest("id must be a kernel id: a canonical UUID such as "
                         "'0b0c4f8e-7d41-4d5c-9a53-2f8a1c6b9e10'", field="id")


def _answer_lost(err: KernelError) -> bool:
    """Whether a failed request may still have been carried out: no answer came, or the
    server (or a proxy in front of it) failed with a 5xx."""
    return isinstance(err, (UpstreamTimeout, UpstreamUnavailable)) or (
        isinstance(err, UpstreamError) and err.details.get("upstream_status", 0) >= 500)


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
                 pool_size: int | None = None, max_waiting_total: int = 0) -> None:
        """`pool_size` ready kernels are kept (default: the `pool_size` setting); at most
        `max_waiting_total` executions of this process wait for busy kernels at once, more
        raise `KernelBusy` (0: no limit but the per-kernel `max_queued_executions`)."""
        self.client = client
        self._max_waiting_total = max_waiting_total
        self.settings = client.settings
        self.logger = logger or StructuredLogger(__name__)
        self._pool_size = self.settings.pool_size if pool_size is None else pool_size
        self._set_up_process_state()
        # A forked child (gunicorn's preload_app) must not share our websockets, pool or locks.
        os.register_at_fork(after_in_child=functools.partial(_after_fork, weakref.ref(self)))

    def limit_waiting(self, total: int) -> None:
        """At most `total` executions of this process wait for busy kernels (0: no limit)."""
        self._max_waiting_total = total
        self._locks.max_waiting_total = total

    def _set_up_process_state(self) -> None:
        """What belongs to one process: warm websockets, ready kernels, thread locks."""
        self._locks = KernelLocks(self.client.base_url, self.settings.max_queued_executions,
                                  self._max_waiting_total)
        self._orphans = OrphanReaper(self.client.shutdown_kernel, self.logger)
        self._ids_taken: bool | None = None  # whether the server starts kernels under our ids
        self._channels = ChannelCache(self.settings.max_idle_connections,
                                      used_elsewhere=self._used_by_another_process)
        self._pool = KernelPool(self._pool_size, self.settings.kernel_name,
                                start=lambda kernel_id: self._start_new(
                                    self.settings.kernel_name, warm=True, kernel_id=kernel_id),
                                alive=self._is_alive, shutdown=self._shutdown_quietly,
                                ledger=PoolLedger(self._locks.directory)) \
            if self._pool_size > 0 else None

    def _used_by_another_process(self, kernel_id: str) -> bool:
        last = self._locks.last_user(kernel_id)
        return last is not None and last != os.getpid()

    def start_kernel(self, name: str | None = None, *,
                     poll: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Starts a kernel of spec `name` (default: settings) and returns once it can execute.

        Returns `{"id", "name"}` plus the server's `execution_state` and `last_activity`. With
        a pool, a ready kernel of the default spec is handed out at once. A kernel that does
        not become ready in `kernel_start_timeout` is shut down again. `poll`, asked once the
        kernel is ready, says whether the caller went away meanwhile: the kernel, whose id
        nobody would learn, is then shut down, and `ClientGone` raised.
        """
        name = name or self.settings.kernel_name
        kernel = self._pool.take(name) if self._pool else None
        if kernel is not None:
            self.logger.info("kernel handed out from the pool", kernel_id=kernel["id"],
                             kernel_name=name)
            metrics().kernels_started.labels("pool").inc()
        else:
            kernel = self._start_new(name)
            metrics().kernels_started.labels("new").inc()
        if poll is not None and poll():
            self.logger.warning("the client went away before its kernel was ready; shutting "
                                "the kernel down", kernel_id=kernel["id"])
            self._shutdown_quietly(kernel["id"])
            raise ClientGone("the client closed its connection before the kernel was ready; "
                             "the kernel was shut down", kernel_id=kernel["id"])
        return kernel

    def warm_up(self) -> None:
        """Starts filling the kernel pool in the background (if there is one)."""
        if self._pool is not None:
            self._pool.start()

    def _start_new(self, name: str, warm: bool = False,
                   kernel_id: str | None = None) -> dict[str, Any]:
        """Starts a kernel (under `kernel_id` if given, else a new id) and waits until it is
        ready; `warm` also runs a silent first cell, which costs a new kernel twice an ordinary
        one (imports, history set-up).
        """
        started = time.monotonic()
        model = self._start_counted(name, started + self.settings.kernel_start_timeout,
                                    kernel_id or str(uuid.uuid4()))
        kernel_id = model["id"]
        deadline = started + self.settings.kernel_start_timeout
        try:
            self._wait_until_ready(kernel_id, deadline)
            if warm:
                end = End()
                for event in run_execution(_Kernel(self.client, self._channels, kernel_id),
                                           "None", deadline,
                                           timeout=self.settings.kernel_start_timeout,
                                           crash_wait=0, silent=True,
                                           connect_timeout=self.settings.timeout_connect):
                    end = event if isinstance(event, End) else end
                if end.status is not None:  # not ready after all (timeout, crashed)
                    error = UpstreamTimeout if end.status == "timeout" else UpstreamError
                    raise error(f"the new kernel did not run its first cell ({end.status})",
                                kernel_id=kernel_id)
        except BaseException:
            self._shutdown_quietly(kernel_id)  # nobody else knows its id: never leave it
            raise
        self.logger.info("kernel started", kernel_id=kernel_id, kernel_name=name,
                         duration_ms=round((time.monotonic() - started) * 1000, 1))
        return {"id": kernel_id, "name": model.get("name", name),
                "execution_state": "idle", "last_activity": model.get("last_activity")}

    def _start_counted(self, name: str, deadline: float, kernel_id: str) -> dict[str, Any]:
        """`POST /api/kernels`, refused once the server runs `max_kernels` (0: no limit),
        counting the kernels this host's workers are starting.

        With a limit, a start counts and reserves its place under one lock across this host's
        workers, so that concurrent starts cannot both slip under it; the starts themselves
        then run side by side, each holding its reservation until the server has its kernel.
        """
        limit = self.settings.max_kernels
        if not limit:
            return self._post_start(name, kernel_id)
        with contextlib.ExitStack() as reservation:
            # Not limited as executions are: starts wait their turn, bounded by their deadline.
            with self._locks.hold(START_LOCK, deadline, limited=False) as acquired:
                if not acquired:
                    raise UpstreamTimeout("other kernel starts kept this one waiting too long")
                starting = self._locks.reserved()  # first: a start that ends now is listed
                running = {kernel["id"] for kernel in self.client.list_kernels()}
                if len(running | starting) >= limit:
                    raise TooManyKernels(f"the Jupyter server already runs (or is starting) "
                                         f"{limit} kernels, as many as JUPYTER_MAX_KERNELS "
                                         "allows; shut one down first", max_kernels=limit)
                try:
                    reservation.enter_context(self._locks.reserve(kernel_id))
                except OSError as err:  # counted all the same: the start holds the lock
                    self.logger.warning("a kernel start could not reserve its place; it runs "
                                        "alone", reason=str(err))
                    return self._post_start(name, kernel_id)
            return self._post_start(name, kernel_id)

    def _post_start(self, name: str, kernel_id: str) -> dict[str, Any]:
        """`POST /api/kernels` under an id of our choosing: if the answer is lost (a timeout,
        a broken connection, a 5xx from the server or a proxy in front of it), the kernel is
        shut down should the server start it anyway (`orphans`).
        """
        try:
            model = self.client.start_kernel(name, self.settings.kernel_env_vars or None,
                                             kernel_id=kernel_id)
        except KernelError as err:
            if err.details.get("request") != START_REQUEST or not _answer_lost(err):
                raise
            if self._ids_taken is not False:
                self._orphans.watch(kernel_id)
            else:
                self.logger.warning("a kernel start failed without an answer; if the server "
                                    "starts the kernel anyway, it runs unknown to the proxy "
                                    "(this server chooses kernel ids itself)")
            raise
        self._ids_taken = model["id"] == kernel_id
        return model

    def _is_alive(self, kernel_id: str) -> bool:
        """True if the kernel answers a `kernel_info_request` within `ALIVE_PROBE_SECONDS` (a
        few ms when it is well), on its warm websocket, or on a new one (opened within the
        usual connect timeout), which stays warm for the first execution. An open websocket is
        not enough: a killed kernel looks alive until the server's restarter polls it (every
        few seconds), and a hung one for ever.
        """
        try:
            self._channels.give(self._channels.take(kernel_id)
                                or self.client.open_channel(kernel_id))
            return wait_until_ready(self.client, self._channels, kernel_id,
                                    time.monotonic() + ALIVE_PROBE_SECONDS, warm_channel=True)
        except KernelError:
            return False

    def execute_code(self, kernel_id: str, code: str, timeout: float | None = None, *,
                     poll: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Runs `code` on the kernel and returns the contract's answer (see `ExecutionResult`).

        `timeout` (seconds, default `execution_timeout`, at most `max_execution_timeout`) covers
        the whole call, waiting for the kernel included. An error in the code is an answer
        with `status: "error"`, not an exception. `poll`: as in `begin_execution`.
        """
        with self.begin_execution(kernel_id, code, timeout, poll=poll) as execution:
            for _ in execution.updates():
                pass
        return execution.answer

    def begin_execution(self, kernel_id: str, code: str, timeout: float | None = None, *,
                        poll: Callable[[], bool] | None = None,
                        queue_limited: bool = True) -> Execution:
        """Starts running `code` and returns once the kernel has it (or the deadline passed
        while waiting for the kernel): errors of the request and of reaching the kernel are
        raised here. Read what follows from `Execution.updates()`; always close it.

        `poll` is called at least every half second while the execution waits for the kernel
        or the code runs, in the thread that reads the updates; once it returns True the code
        is stopped as at a deadline (or never sent), and the answer says `cancelled`.

        Without `queue_limited` the execution may wait for the kernel behind any number of
        others (`JUPYTER_MAX_QUEUED_EXECUTIONS` does not refuse it): for callers that bound
        their executions themselves, such as jobs.
        """
        timeout = self.check_request(kernel_id, code, timeout)
        started = time.monotonic()
        deadline = started + timeout
        stack = contextlib.ExitStack()
        stop = threading.Event()

        def stopped() -> bool:
            return stop.is_set() or (poll is not None and bool(poll()))

        try:
            events = None
            if stack.enter_context(self._locks.hold(kernel_id, deadline, stopped,
                                                     limited=queue_limited)):
                events = run_execution(
                    _Kernel(self.client, self._channels, kernel_id), code, deadline,
                    timeout=timeout, crash_wait=self.settings.crash_sleep_duration,
                    connect_timeout=self.settings.timeout_connect, cancelled=stopped)
                stack.callback(events.close)
                try:
                    next(events)  # `Sent`: connected, and the request is on its way
                except KernelNotFound:  # the server says so (not the lock's memory of it)
                    self._gone_for_good(kernel_id)  # before the lock is let go: those
                    raise  # waiting for it learn it too; and no lock file is left
                waited_out = None
            elif time.monotonic() < deadline:
                waited_out = End("cancelled", {
                    "ename": "ExecutionCancelled",
                    "evalue": "the execution was cancelled while it waited for the kernel; "
                              "this code did not run", "traceback": []})
            else:
                waited_out = End("timeout", not_sent_error(
                    f"the kernel stayed busy with earlier code for the whole {timeout:g} s "
                    "deadline"))
        except BaseException:
            stack.close()
            raise
        return Execution(self, kernel_id, started, events or waited_out, stack, stop, deadline)

    def check_request(self, kernel_id: str, code: str, timeout: float | None) -> float:
        """Raises what is wrong with an execution request; returns its timeout in seconds."""
        check_kernel_id(kernel_id)
        timeout = self._check_timeout(timeout)
        _check_text(code, "code")
        if len(code.encode()) > self.settings.max_code_bytes:
            raise CodeTooLarge(f"the code is longer than JUPYTER_MAX_CODE_BYTES "
                               f"({self.settings.max_code_bytes} bytes) allows")
        return timeout

    def interrupt_kernel(self, kernel_id: str) -> dict[str, Any]:
        """Interrupts whatever the kernel runs (it keeps its state); raises `KernelNotFound`."""
        check_kernel_id(kernel_id)
        self.client.interrupt_kernel(kernel_id)
        self.logger.info("kernel interrupted", kernel_id=kernel_id)
        return {"id": kernel_id, "message": f"Kernel {kernel_id} interrupted"}

    def restart_kernel(self, kernel_id: str) -> dict[str, Any]:
        """Restarts the kernel (its state is lost) and returns once it can execute again."""
        check_kernel_id(kernel_id)
        started = time.monotonic()
        self.client.get_kernel(kernel_id)  # jupyter_server answers 500 for an unknown one
        self.client.restart_kernel(kernel_id)
        self._channels.forget(kernel_id)
        self._wait_until_ready(kernel_id, started + self.settings.kernel_start_timeout)
        self.logger.info("kernel restarted", kernel_id=kernel_id,
                         duration_ms=round((time.monotonic() - started) * 1000, 1))
        return {"id": kernel_id, "state_lost": True,
                "message": f"Kernel {kernel_id} restarted; its variables and imports are gone"}

    def describe_kernel(self, kernel_id: str) -> dict[str, Any]:
        """The server's model of the kernel; raises `KernelNotFound` if it has none."""
        check_kernel_id(kernel_id)
        return self.client.get_kernel(kernel_id)

    def list_kernels(self) -> list[dict[str, Any]]:
        """The kernels the Jupyter server runs (all of them, not only this proxy's)."""
        return [{"id": k.get("id"), "name": k.get("name"),
                 "execution_state": k.get("execution_state"),
                 "last_activity": k.get("last_activity"),
                 "connections": k.get("connections")}
                for k in self.client.list_kernels()]

    def kernel_specs(self) -> dict[str, Any]:
        """The kernel specs the server offers: `{"default", "kernelspecs": {name: ...}}`."""
        raw = self.client.kernelspecs()
        specs = raw.get("kernelspecs") if isinstance(raw.get("kernelspecs"), dict) else {}
        described = {}
        for name, entry in specs.items():
            spec = entry.get("spec", {}) if isinstance(entry, dict) else {}
            described[name] = {"name": name, "display_name": spec.get("display_name", name),
                               "language": spec.get("language")}
        return {"default": raw.get("default"), "kernelspecs": described}

    def shutdown_kernel(self, kernel_id: str) -> dict[str, str]:
        """Shuts the kernel down; raises `KernelNotFound` if the server has no such kernel."""
        check_kernel_id(kernel_id)
        try:
            self.client.shutdown_kernel(kernel_id)
        except KernelNotFound:
            self._gone_for_good(kernel_id)
            raise
        self._gone_for_good(kernel_id)
        self._channels.forget(kernel_id)
        self.logger.info("kernel shut down", kernel_id=kernel_id)
        metrics().kernels_shut_down.inc()
        return {"message": f"Kernel {kernel_id} shutdown"}

    def _gone_for_good(self, kernel_id: str) -> None:
        """A kernel shut down or gone from the server: executions waiting for it, in any
        worker, answer 404 at once when their turn comes (asking the server would wait for
        it to finish removing the kernel)."""
        self._locks.forget(kernel_id)

    def _wait_until_ready(self, kernel_id: str, deadline: float) -> None:
        """Returns once the kernel answers on a websocket, which is kept warm (`ready`)."""
        if not wait_until_ready(self.client, self._channels, kernel_id, deadline):
            raise UpstreamTimeout(f"the kernel did not become ready within "
                                  f"{self.settings.kernel_start_timeout:g} s",
                                  kernel_id=kernel_id)

    def close(self) -> None:
        """Shuts the pooled kernels down and closes the warm websockets; safe to call twice.
        Each kernel still watched (`orphans`) gets one last try at a shutdown."""
        if self._pool is not None:
            self._pool.close()
        self._channels.close()
        self._orphans.close()

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

    def _shutdown_quietly(self, kernel_id: str, starting: bool = False) -> None:
        """Shuts down a kernel nobody else knows of; if the server cannot say it did, the
        kernel is watched and shut down later (`orphans`), as it is if the server does not
        know it (yet) and it may still be `starting`."""
        try:
            self.client.shutdown_kernel(kernel_id)
        except KernelNotFound:
            if starting:
                self._orphans.watch(kernel_id)
        except KernelError:
            self._orphans.watch(kernel_id)


class Execution:
    """One execution under way, holding its kernel: `updates()` yields what the kernel
    produces (see `ExecutionResult.add`) and last `{"type": "result", **answer}`; `answer` is
    then set. Close it (or use `with`) to release the kernel: closing it before the end stops
    the code as a deadline would (interrupt, then restart if need be), so that no code runs on
    unseen.
    """

    def __init__(self, manager: KernelManager, kernel_id: str, started: float,
                 events: Iterator[Event] | End, stack: contextlib.ExitStack,
                 stop: threading.Event, deadline: float) -> None:
        """`events` are those of the running code, or the `End` of code that never ran;
        `deadline` (monotonic) is the code's.
        """
        self.kernel_id = kernel_id
        self.deadline = deadline
        self.answer: dict[str, Any] | None = None
        self._manager = manager
        self._started = started
        self._events = (events,) if isinstance(events, End) else events
        self._stack = stack
        self._stop = stop
        self._closing = False
        self._result = ExecutionResult(manager.settings.max_output_bytes)
        self._updates = self._run()

    def updates(self) -> Iterator[dict[str, Any]]:
        """What the kernel produces, as it comes; the final `result` update comes last. There
        is one stream of updates per execution: every call returns the same iterator.
        """
        return self._updates

    def _run(self) -> Iterator[dict[str, Any]]:
        try:
            end = End()
            for event in self._events:
                if isinstance(event, Message):
                    yield from self._result.add(event.message, event.size)
                elif isinstance(event, End):
                    end = event
                    if end.kernel_gone:  # before the kernel is released to those waiting
                        self._manager._gone_for_good(self.kernel_id)
            self._result.truncated |= end.output_lost
            answer = self._result.answer(end.status, end.error)
        finally:
            self._stack.close()
        self.answer = answer
        elapsed = time.monotonic() - self._started
        self._manager.logger.info("code executed", kernel_id=self.kernel_id,
                                  status=answer["status"], duration_ms=round(elapsed * 1000, 1))
        metrics().executions.labels(answer["status"]).inc()
        metrics().execution_seconds.observe(elapsed)
        yield {"type": "result", **answer}

    def cancel(self) -> None:
        """Asks for the code to be stopped as at a deadline; safe from any thread. The reader
        of the updates then sees them end with `status: "cancelled"`.
        """
        self._stop.set()

    @property
    def output_bytes(self) -> int:
        """How much output the answer holds so far (what counts against the output cap)."""
        return self._result.kept_bytes

    def partial_answer(self) -> dict[str, Any]:
        """The answer so far (`status: "running"`) until the execution is over."""
        return self.answer or self._result.answer("running")

    def close(self) -> None:
        """Releases the kernel (and its websocket), stopping the code first if it still runs;
        safe to call twice. Call it from the thread that reads the updates.
        """
        try:
            if self.answer is None and not self._closing:
                self._closing = True
                self._stop.set()
                for _ in self._updates:  # the stop, as a deadline would do it, then the end
                    pass
        except KernelError as err:
            self._manager.logger.warning("could not stop an abandoned execution",
                                         kernel_id=self.kernel_id, reason=err.message)
        finally:
            self._stack.close()

    def __enter__(self) -> Execution:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _after_fork(manager_ref: weakref.ref) -> None:
    """In a forked child: fresh per-process state; the parent's stays the parent's."""
    manager = manager_ref()
    if manager is not None:
        if manager._pool is not None:
            manager._pool.forget_inherited()
        manager._locks.forget_inherited()
        manager.client.reset_connections()
        manager._set_up_process_state()


def wait_until_ready(client: JupyterClient, channels: ChannelCache, kernel_id: str,
                     deadline: float, *, warm_channel: bool = False) -> bool:
    """Whether the kernel answered a `kernel_info_request` on a new websocket before `deadline`
    (the websocket is then kept warm for the next execution); with `warm_channel`, on the
    kernel's warm websocket if it has one.

    Ready means its reply came and its output reaches this websocket: a status message of
    the request arrived on iopub. Right after a start or restart the server's subscription
    to the new process may not be up yet, and what the kernel publishes meanwhile is lost
    (its next execution's output would be, with only the reply coming back). After the
    reply the request is sent again every `READY_PROBE_SECONDS` until a status comes; a
    kernel that never publishes one counts as ready `READY_IOPUB_SECONDS` after its reply.
    """
    channel = channels.take(kernel_id) if warm_channel else None
    if channel is None:
        channel = client.open_channel(kernel_id, timeout=max(deadline - time.monotonic(), 0.1))
    try:
        asked: set[str] = set()
        replied_at: float | None = None
        published = False
        next_probe = time.monotonic()
        while not (replied_at is not None and (
                published or time.monotonic() - replied_at >= READY_IOPUB_SECONDS)):
            now = time.monotonic()
            if now >= deadline:
                if replied_at is None:
                    return False
                break  # it answered: its status is not worth failing the start for
            if now >= next_probe:  # (a request waits for a kernel still starting: one will do)
                request = protocol.kernel_info_request(channel.session_id)
                asked.add(request["header"]["msg_id"])
                channel.send(request)
                next_probe = now + READY_PROBE_SECONDS if replied_at else float("inf")
            received = channel.recv(min(deadline, next_probe) - now)
            if received is None or protocol.parent_id(received[0]) not in asked:
                continue
            if received[0].get("msg_type") == "kernel_info_reply" and replied_at is None:
                replied_at = time.monotonic()
                next_probe = replied_at + READY_PROBE_SECONDS  # its status may have been lost
            elif received[0].get("channel") == "iopub":
                published = True
        channels.give(channel)  # warm for the first execution
        channel = None
        return True
    finally:
        if channel is not None:
            channel.close()


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

    # The execution loop's questions and its stop at a deadline: a server that cannot be
    # reached is given CONTROL_CONNECT_SECONDS per connection attempt, not the full
    # JUPYTER_TIMEOUT_CONNECT, so that they cannot hold the answer much past its deadline.

    def describe(self) -> dict[str, Any]:
        return self.client.get_kernel(self.kernel_id, timeout=LOOKUP_SECONDS,
                                      connect_timeout=CONTROL_CONNECT_SECONDS)

    def interrupt(self) -> None:
        self.client.interrupt_kernel(self.kernel_id, timeout=INTERRUPT_GRACE_SECONDS,
                                     connect_timeout=CONTROL_CONNECT_SECONDS)

    def restart(self) -> None:
        """Restarts the kernel; returns once the new process answers (`wait_until_ready`), so
        that the next execution, waiting for the lock, is not sent before its output can reach
        anyone. A restart that is not ready within the start timeout is logged, not raised:
        the kernel was restarted all the same."""
        deadline = time.monotonic() + self.client.settings.kernel_start_timeout
        self.client.restart_kernel(self.kernel_id, connect_timeout=CONTROL_CONNECT_SECONDS)
        try:
            ready = wait_until_ready(self.client, self.channels, self.kernel_id, deadline)
        except KernelError as err:
            ready, reason = False, str(err)
        else:
            reason = "no answer in time"
        if not ready:
            _log.warning("the restarted kernel did not answer within the start timeout",
                         kernel_id=self.kernel_id, reason=reason)
