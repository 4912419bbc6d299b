"""The execution loop: one `execute_request`, and the stream of events it produces.

`run_execution` is the single place that reads a kernel's answer to code. It yields every
message of this request (matched by `parent_header.msg_id`) as it arrives, then one final `End`
event saying how the execution ended. Callers fold the events into what they need: the full
answer (`ExecutionResult`), and later a stream or a job record.

Everything is bounded:
- one monotonic deadline covers the exchange; the time left is recomputed before each receive.
  When it passes, the kernel is interrupted (it keeps its state) and what it still sends within
  a short grace period is kept; a kernel that ignores the interrupt is restarted.
- a kernel that dies is reported as soon as the server says so (a parentless `status:
  restarting`/`dead`), after waiting a bounded time for the server to bring it back.
- once the `execute_reply` (or the `idle`) is in, the other half is awaited only while messages
  keep coming: the server can drop an `idle`, e.g. right after a restart.
- a websocket that breaks is reopened with the same session id, so that the server replays what
  it buffered meanwhile; the request itself is never sent twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from app.kernels import protocol
from app.kernels.channel import KernelChannel
from app.kernels.errors import ConnectionLost, KernelError, KernelNotFound

INTERRUPT_GRACE_SECONDS = 5.0
SETTLE_SECONDS = 2.0  # silence after the reply (or idle) that ends the wait for the other half
RECONNECT_ATTEMPTS = 3


class KernelControl(Protocol):
    """What the loop needs from the world, bound to one kernel."""

    def connect(self, session_id: str | None, timeout: float) -> KernelChannel:
        """Opens a websocket to the kernel with this session id (None: a new one)."""

    def interrupt(self) -> None:
        """Interrupts the kernel (`POST .../interrupt`)."""

    def restart(self) -> None:
        """Restarts the kernel (`POST .../restart`); its state is lost."""

    def release(self, channel: KernelChannel, reusable: bool) -> None:
        """Takes back a channel the loop is done with (`reusable`: it is in a known state)."""


@dataclass(frozen=True)
class Message:
    """A message of this execution, in arrival order; `size` is its encoded length."""

    message: dict[str, Any]
    size: int


@dataclass(frozen=True)
class End:
    """The execution is over. `status` is None when the kernel's own reply says how it went."""

    status: str | None = None
    error: dict[str, Any] | None = None


Event = Message | End


def run_execution(kernel: KernelControl, code: str, deadline: float, *, timeout: float,
                  crash_wait: float, connect_timeout: float, silent: bool = False,
                  grace: float = INTERRUPT_GRACE_SECONDS, settle: float = SETTLE_SECONDS,
                  clock: Callable[[], float] = time.monotonic) -> Iterator[Event]:
    """Runs `code` on the kernel and yields its events; see the module docstring."""
    run = _Run(kernel, deadline, connect_timeout, settle, clock)
    try:
        yield from run.execute(code, timeout=timeout, crash_wait=crash_wait, grace=grace,
                               silent=silent)
    finally:
        run.close()


class _Run:
    """The state of one execution: its channel, request and what has been seen of it."""

    def __init__(self, kernel: KernelControl, deadline: float, connect_timeout: float,
                 settle: float, clock: Callable[[], float]) -> None:
        self.kernel = kernel
        self.deadline = deadline
        self.connect_timeout = connect_timeout
        self.settle = settle
        self.clock = clock
        self.channel: KernelChannel | None = None
        self.session_id = ""
        self.msg_id = ""
        self.reply = self.idle = self.started = self.stdin_refused = False
        self.reusable = False  # set once the execution ended with the channel in a known state
        self.death: str | None = None

    @property
    def complete(self) -> bool:
        return self.reply and self.idle

    def execute(self, code: str, *, timeout: float, crash_wait: float, grace: float,
                silent: bool) -> Iterator[Event]:
        self.channel = self.kernel.connect(None, self._time_left(self.connect_timeout))
        self.session_id = self.channel.session_id
        request = protocol.execute_request(code, self.session_id, silent)
        self.msg_id = request["header"]["msg_id"]
        self.channel.send(request)
        yield from self._collect(self.deadline)
        if not self.complete and not self.death:
            outcome = yield from self._stop_overrun(grace)
            if not self.death:
                self.reusable = outcome in ("interrupted", "not_started")
                yield End("timeout", self._timeout_error(timeout, outcome, grace))
                return
        if self.death:
            state = self._await_restart(self.clock() + crash_wait)
            yield End("crashed", _crash_error(state, crash_wait))
        elif self.stdin_refused:
            yield End("error", {"ename": "StdinNotImplementedError",
                                "evalue": "the code asked for input, but this proxy offers no "
                                          "stdin", "traceback": []})
        else:
            self.reusable = True
            yield End()

    def _stop_overrun(self, grace: float) -> Generator[Event, None, str]:
        """Stops code that overran its deadline, keeping what it still sends.

        Returns `interrupted`, `restarted`, `not_started` or `failed`. Code that never started
        (the kernel was busy with another client's code) is not interrupted: that would stop
        the other client's code instead.
        """
        if not self.started:
            return "not_started"
        if _attempt(self.kernel.interrupt):
            yield from self._collect(self.clock() + grace)
            if self.complete or self.death:
                return "interrupted"
        return "restarted" if _attempt(self.kernel.restart) else "failed"

    def _collect(self, until: float) -> Iterator[Event]:
        """Yields this request's messages until it completes, the kernel dies or `until`.

        Once the reply (or the idle) is in, the code has finished: silence then ends the wait
        for the other half instead of counting as an overrun.
        """
        while not self.complete and not self.death:
            half_in = self.reply or self.idle
            if self.clock() >= until and not half_in:
                return
            received = self._recv(min(until, self.clock() + self.settle) if half_in else until)
            if received is None:
                if self.reply:
                    self.idle = True  # the server dropped the idle: the reply is the answer
                elif self.idle:
                    raise ConnectionLost(
                        "the kernel finished, but its reply was lost with the connection to "
                        "the Jupyter server; the output may be incomplete",
                        kernel_id=self.channel.kernel_id if self.channel else None)
                continue
            message, size = received
            if protocol.parent_id(message) == self.msg_id:
                self._note(message)
                yield Message(message, size)
            else:
                self.death = protocol.kernel_death_state(message)

    def _note(self, message: dict[str, Any]) -> None:
        self.started = True
        msg_type = message.get("msg_type")
        if msg_type == "execute_reply":
            self.reply = True
        elif protocol.is_idle(message):
            self.idle = True
        elif msg_type == "input_request" and not self.stdin_refused:
            # allow_stdin is false, so a kernel should never ask; one that does is stopped.
            self.stdin_refused = True
            _attempt(self.kernel.interrupt)

    def _recv(self, until: float) -> tuple[dict[str, Any], int] | None:
        """The next message before `until`, or None; a broken websocket is reopened."""
        for attempt in range(RECONNECT_ATTEMPTS + 1):
            try:
                return self.channel.recv(until - self.clock())
            except ConnectionLost:
                if attempt == RECONNECT_ATTEMPTS or self.clock() >= until:
                    raise
                self._reconnect(until)
                if self.death:
                    return None
        return None

    def _reconnect(self, until: float) -> None:
        """Reopens the websocket with the same session id: the server replays its buffer."""
        self.channel.close()
        time.sleep(0.1)
        try:
            self.channel = self.kernel.connect(
                self.session_id, max(min(self.connect_timeout, until - self.clock()), 0.1))
        except KernelNotFound:
            self.death = "shutdown"  # the kernel went away with the connection
        except KernelError as err:
            raise ConnectionLost("the connection to the Jupyter server broke during the "
                                 "execution and could not be reopened") from err

    def _await_restart(self, until: float) -> str:
        """`restarted`, `dead`, or `restarting` if the server said neither before `until`.

        A restarted kernel counts as back only once it answers a `kernel_info_request`.
        """
        if self.death in ("dead", "shutdown"):
            return self.death
        info_id = None
        while self.clock() < until:
            received = self._recv(until)
            if self.death == "shutdown":
                return "shutdown"
            if received is None:
                continue
            message = received[0]
            if info_id and message.get("msg_type") == "kernel_info_reply" \
                    and protocol.parent_id(message) == info_id:
                return "restarted"
            if message.get("msg_type") != "status" or protocol.parent_id(message):
                continue
            state = message["content"].get("execution_state")
            if state == "dead":
                return "dead"
            if state in ("starting", "idle") and info_id is None:
                request = protocol.kernel_info_request(self.session_id)
                info_id = request["header"]["msg_id"]
                self.channel.send(request)
        return "restarting"

    def _time_left(self, cap: float) -> float:
        return max(min(cap, self.deadline - self.clock()), 0.1)

    def _timeout_error(self, timeout: float, outcome: str, grace: float) -> dict[str, Any]:
        what = {
            "interrupted": "the kernel was interrupted and keeps its state",
            "restarted": f"the kernel did not stop on an interrupt within {grace:g} s and was "
                         "restarted: its state is lost",
            "not_started": "the kernel was busy with other code the whole time; this code "
                           "did not start and may still run later",
            "failed": "the kernel could not be interrupted or restarted and may still be "
                      "running it; restart or shut it down",
        }[outcome]
        return {"ename": "ExecutionTimeout",
                "evalue": f"the code ran longer than its {timeout:g} s deadline; {what}",
                "traceback": []}

    def close(self) -> None:
        if self.channel is not None:
            self.kernel.release(self.channel, self.reusable)
            self.channel = None


def _attempt(action: Callable[[], None]) -> bool:
    try:
        action()
    except KernelError:
        return False
    return True


def _crash_error(state: str, crash_wait: float) -> dict[str, Any]:
    after = {
        "restarted": "the Jupyter server restarted it: the same kernel id works again, with "
                     "empty state",
        "dead": "the Jupyter server could not restart it: the kernel is gone",
    }.get(state, f"the Jupyter server was still restarting it after {crash_wait:g} s")
    if state == "shutdown":
        return {"ename": "KernelDied",
                "evalue": "the kernel was shut down while running this code: it is gone",
                "traceback": []}
    return {"ename": "KernelDied",
            "evalue": f"the kernel died while running this code and its state is lost; {after}",
            "traceback": []}
