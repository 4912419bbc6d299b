"""The execution loop: one `execute_request`, and the stream of events it produces.

`run_execution` is the single place that reads a kernel's answer to code. It yields every
message of this request (matched by `parent_header.msg_id`) as it arrives, then one final `End`
event saying how the execution ended. Callers fold the events into what they need: the full
answer (`ExecutionResult`), and later a stream or a job record.

One monotonic deadline covers the exchange; the time left is recomputed before each receive.
When it passes, the kernel is interrupted (it keeps its state) and what it still sends within a
short grace period is kept. A kernel that dies is reported as soon as the server says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from app.kernels import protocol
from app.kernels.channel import KernelChannel
from app.kernels.errors import KernelError

INTERRUPT_GRACE_SECONDS = 5.0
RESTARTED_STATES = frozenset({"starting", "idle"})


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


def run_execution(channel: KernelChannel, request: dict[str, Any], deadline: float, *,
                  interrupt: Callable[[], None], timeout: float, crash_wait: float,
                  grace: float = INTERRUPT_GRACE_SECONDS,
                  clock: Callable[[], float] = time.monotonic) -> Iterator[Event]:
    """Sends `request` on `channel` and yields its events until both the `execute_reply` and
    the `status: idle` have arrived (in either order), the deadline passes, or the kernel dies.

    After a death the server restarts the kernel; the loop waits up to `crash_wait` seconds
    for that, so that the answer can say whether the same kernel id works again.
    """
    msg_id = request["header"]["msg_id"]
    channel.send(request)
    progress = _Progress()
    death = yield from _collect(channel, msg_id, deadline, progress, clock)
    if not death and not progress.complete:
        interrupted = _try(interrupt)
        death = yield from _collect(channel, msg_id, clock() + grace, progress, clock)
        if not death:
            yield End("timeout", _timeout_error(timeout, interrupted and progress.complete,
                                                grace))
            return
    if death:
        if death == "restarting":
            death = _await_restart(channel, clock() + crash_wait, clock)
        yield End("crashed", _crash_error(death, crash_wait))
        return
    yield End()


class _Progress:
    """Whether the reply and the idle status of the request have been seen."""

    def __init__(self) -> None:
        self.reply = False
        self.idle = False

    @property
    def complete(self) -> bool:
        return self.reply and self.idle


def _collect(channel: KernelChannel, msg_id: str, until: float, progress: _Progress,
             clock: Callable[[], float]) -> Iterator[Event]:
    """Yields this request's messages until it completes or `until` passes.

    Returns the kernel's death state (`restarting`/`dead`) if the server announced one.
    """
    while not progress.complete:
        remaining = until - clock()
        if remaining <= 0:
            return None
        received = channel.recv(remaining)
        if received is None:
            continue
        message, size = received
        if protocol.parent_id(message) == msg_id:
            if message.get("msg_type") == "execute_reply":
                progress.reply = True
            elif protocol.is_idle(message):
                progress.idle = True
            yield Message(message, size)
        else:
            death = protocol.kernel_death_state(message)
            if death:
                return death
    return None


def _await_restart(channel: KernelChannel, until: float, clock: Callable[[], float]) -> str:
    """`restarted`, `dead`, or `restarting` if the server said neither before `until`."""
    while (remaining := until - clock()) > 0:
        received = channel.recv(remaining)
        if received is None or protocol.parent_id(received[0]):
            continue
        content = received[0].get("content", {})
        if received[0].get("msg_type") == "status":
            state = content.get("execution_state")
            if state in RESTARTED_STATES:
                return "restarted"
            if state == "dead":
                return "dead"
    return "restarting"


def _try(action: Callable[[], None]) -> bool:
    try:
        action()
    except KernelError:
        return False
    return True


def _timeout_error(timeout: float, stopped: bool, grace: float) -> dict[str, Any]:
    if stopped:
        what = "the kernel was interrupted and keeps its state"
    else:
        what = (f"the kernel did not stop within {grace:g} s of an interrupt and may still be "
                "running it; interrupt, restart or shut it down")
    return {"ename": "ExecutionTimeout",
            "evalue": f"the code ran longer than its {timeout:g} s deadline; {what}",
            "traceback": []}


def _crash_error(state: str, crash_wait: float) -> dict[str, Any]:
    after = {
        "restarted": "the Jupyter server restarted it: the same kernel id works again, with "
                     "empty state",
        "dead": "the Jupyter server could not restart it: the kernel is gone",
    }.get(state, f"the Jupyter server was still restarting it after {crash_wait:g} s")
    return {"ename": "KernelDied",
            "evalue": f"the kernel died while running this code and its state is lost; {after}",
            "traceback": []}
