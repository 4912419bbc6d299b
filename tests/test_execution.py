"""Unit tests of `app.kernels.execution.run_execution`, driven by a scripted fake channel.

The fake channel plays a script of messages and silences against a fake clock: a receive that
finds nothing advances the clock by its whole timeout, so deadlines and grace periods pass
instantly and deterministically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from app.kernels import protocol
from app.kernels.errors import ConnectionLost, UpstreamError
from app.kernels.execution import End, Message, run_execution

DEADLINE = 100.0
GRACE = 5.0
CRASH_WAIT = 30.0


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Silence:
    """Nothing arrives for `seconds`."""

    seconds: float


class ScriptedChannel:
    """A KernelChannel stand-in: records what is sent, plays `script` on receive.

    Script items are messages (arrive at once), `Silence`s, or exceptions (raised by recv).
    Once the script is used up, the kernel says nothing more.
    """

    def __init__(self, clock: FakeClock, script: list) -> None:
        self.clock = clock
        self.script = list(script)
        self.sent: list[dict] = []
        self.recv_timeouts: list[float] = []

    def send(self, message: dict) -> None:
        self.sent.append(message)

    def recv(self, timeout: float):
        self.recv_timeouts.append(timeout)
        if not self.script:
            self.clock.now += timeout
            return None
        item = self.script[0]
        if isinstance(item, BaseException):
            self.script.pop(0)
            raise item
        if isinstance(item, Silence):
            waited = min(item.seconds, timeout)
            item.seconds -= waited
            self.clock.now += waited
            if item.seconds <= 0:
                self.script.pop(0)
            return None
        self.script.pop(0)
        return item, len(json.dumps(item))


class Interrupt:
    """The `interrupt` callback: records when it was called; may raise, and makes the kernel
    send `kernel_answers` once called. `run()` connects it to the clock and the channel.
    """

    def __init__(self, raises: Exception | None = None, kernel_answers: list = ()) -> None:
        self.raises = raises
        self.kernel_answers = list(kernel_answers)
        self.called_at: list[float] = []
        self.clock: FakeClock | None = None
        self.channel: ScriptedChannel | None = None

    def __call__(self) -> None:
        self.called_at.append(self.clock())
        if self.channel is not None:
            self.channel.script.extend(self.kernel_answers)
        if self.raises is not None:
            raise self.raises


REQUEST = protocol.execute_request("while True: pass", "session-1")
OWN_ID = REQUEST["header"]["msg_id"]


def kernel_msg(msg_type: str, content: dict | None = None, parent: str | None = OWN_ID) -> dict:
    """A decoded message, answering `parent` (None: parentless, as the server's own)."""
    return {"header": {"msg_id": f"k-{msg_type}", "msg_type": msg_type},
            "parent_header": {"msg_id": parent} if parent else {}, "metadata": {},
            "content": content or {}, "msg_type": msg_type, "channel": "iopub"}


def status(state: str, parent: str | None = OWN_ID) -> dict:
    return kernel_msg("status", {"execution_state": state}, parent)


def stream(text: str, parent: str | None = OWN_ID) -> dict:
    return kernel_msg("stream", {"name": "stdout", "text": text}, parent)


def reply(state: str = "ok") -> dict:
    return kernel_msg("execute_reply", {"status": state, "execution_count": 1})


def interrupted_answers() -> list:
    """What a kernel sends once an interrupt stops the code."""
    return [kernel_msg("error", {"ename": "KeyboardInterrupt", "evalue": "", "traceback": []}),
            reply("error"), status("idle")]


def run(script: list, interrupt: Interrupt | None = None
        ) -> tuple[list, ScriptedChannel, Interrupt, FakeClock]:
    """Runs the request against `script`; returns the events, channel, interrupt and clock."""
    clock = FakeClock()
    channel = ScriptedChannel(clock, script)
    interrupt = interrupt or Interrupt()
    interrupt.clock = clock
    interrupt.channel = channel
    events = list(run_execution(channel, REQUEST, DEADLINE, interrupt=interrupt,
                                timeout=DEADLINE, crash_wait=CRASH_WAIT, grace=GRACE,
                                clock=clock))
    return events, channel, interrupt, clock


def messages_of(events: list) -> list[dict]:
    return [e.message for e in events if isinstance(e, Message)]


def end_of(events: list) -> End:
    assert isinstance(events[-1], End), "the last event must be the End"
    assert sum(isinstance(e, End) for e in events) == 1
    return events[-1]


# -- normal completion -----------------------------------------------------------------------

def test_sends_the_request_once():
    _, channel, _, _ = run([status("busy"), reply(), status("idle")])
    assert channel.sent == [REQUEST]


def test_completes_on_reply_then_idle_and_skips_other_requests():
    other = "someone-elses-request"
    script = [status("busy"), stream("theirs", parent=other), stream("ours"),
              status("starting", parent=None), reply(), status("idle", parent=other),
              status("idle")]
    events, _, interrupt, _ = run(script)
    assert messages_of(events) == [status("busy"), stream("ours"), reply(), status("idle")]
    assert end_of(events) == End()
    assert interrupt.called_at == []


def test_completes_on_idle_then_reply():
    events, _, _, _ = run([status("busy"), status("idle"), reply()])
    assert [m["msg_type"] for m in messages_of(events)] == ["status", "status", "execute_reply"]
    assert end_of(events) == End()


def test_messages_between_reply_and_idle_are_kept():
    events, _, _, _ = run([status("busy"), reply(), stream("late output"), status("idle")])
    assert stream("late output") in messages_of(events)
    assert end_of(events).status is None


def test_stops_reading_once_complete():
    events, channel, _, _ = run([reply(), status("idle"), stream("next request's?")])
    assert channel.script == [stream("next request's?")]
    assert end_of(events) == End()


def test_message_sizes_are_passed_on():
    events, _, _, _ = run([stream("x" * 40), reply(), status("idle")])
    first = events[0]
    assert first.size == len(json.dumps(first.message))


def test_slow_kernel_within_the_deadline_is_not_interrupted():
    events, channel, interrupt, clock = run([status("busy"), Silence(60), stream("done"),
                                             Silence(39), reply(), status("idle")])
    assert end_of(events) == End()
    assert interrupt.called_at == []
    assert clock.now == 99
    assert all(0 < t <= DEADLINE for t in channel.recv_timeouts)


# -- deadline --------------------------------------------------------------------------------

def test_deadline_interrupts_once_and_keeps_what_arrives_in_the_grace_period():
    interrupt = Interrupt(kernel_answers=interrupted_answers())
    events, _, _, clock = run([status("busy"), stream("partial")], interrupt)
    assert interrupt.called_at == [DEADLINE]
    kinds = [m["msg_type"] for m in messages_of(events)]
    assert kinds == ["status", "stream", "error", "execute_reply", "status"]
    end = end_of(events)
    assert end.status == "timeout"
    assert end.error["ename"] == "ExecutionTimeout"
    assert "interrupted" in end.error["evalue"]
    assert "may still be running" not in end.error["evalue"]
    assert clock.now <= DEADLINE + GRACE


def test_kernel_that_ignores_the_interrupt_may_still_be_running():
    events, _, interrupt, clock = run([status("busy"), stream("partial")])
    assert len(interrupt.called_at) == 1
    assert stream("partial") in messages_of(events)
    end = end_of(events)
    assert end.status == "timeout"
    assert end.error["ename"] == "ExecutionTimeout"
    assert "may still be running" in end.error["evalue"]
    assert clock.now == pytest.approx(DEADLINE + GRACE)


def test_failed_interrupt_says_the_code_may_still_be_running():
    interrupt = Interrupt(raises=UpstreamError("interrupt refused"),
                          kernel_answers=[stream("still going")])
    events, _, _, _ = run([status("busy")], interrupt)
    assert len(interrupt.called_at) == 1
    assert stream("still going") in messages_of(events)
    end = end_of(events)
    assert end.status == "timeout"
    assert "may still be running" in end.error["evalue"]


def test_reply_without_idle_by_the_deadline_is_a_timeout():
    events, _, interrupt, _ = run([status("busy"), reply()])
    assert len(interrupt.called_at) == 1
    assert end_of(events).status == "timeout"


# -- kernel death ----------------------------------------------------------------------------

def test_dead_kernel_is_reported_at_once_without_interrupt():
    events, _, interrupt, clock = run([status("busy"), stream("before"), Silence(1),
                                       status("dead", parent=None)])
    assert messages_of(events) == [status("busy"), stream("before")]
    end = end_of(events)
    assert end.status == "crashed"
    assert end.error["ename"] == "KernelDied"
    assert "gone" in end.error["evalue"]
    assert interrupt.called_at == []
    assert clock.now == 1


def test_restarted_kernel_is_reported_once_the_server_says_it_is_back():
    events, _, interrupt, clock = run([status("busy"), Silence(2),
                                       status("restarting", parent=None), Silence(3),
                                       status("starting", parent=None)])
    end = end_of(events)
    assert end.status == "crashed"
    assert end.error["ename"] == "KernelDied"
    assert "works again" in end.error["evalue"]
    assert interrupt.called_at == []
    assert clock.now == 5


def test_restart_that_never_finishes_waits_crash_wait_not_the_deadline():
    events, _, interrupt, clock = run([status("busy"), Silence(2),
                                       status("restarting", parent=None)])
    end = end_of(events)
    assert end.status == "crashed"
    assert "still restarting" in end.error["evalue"]
    assert interrupt.called_at == []
    assert clock.now == pytest.approx(2 + CRASH_WAIT)


def test_death_during_the_grace_period_is_a_crash():
    interrupt = Interrupt(kernel_answers=[status("dead", parent=None)])
    events, _, _, _ = run([status("busy")], interrupt)
    assert len(interrupt.called_at) == 1
    assert end_of(events).status == "crashed"


def test_status_dead_of_another_request_is_not_a_death():
    events, _, _, _ = run([status("dead", parent="other"), reply(), status("idle")])
    assert end_of(events) == End()


# -- broken connection -----------------------------------------------------------------------

def test_connection_lost_propagates_after_the_messages_before_it():
    clock = FakeClock()
    channel = ScriptedChannel(clock, [status("busy"), ConnectionLost("websocket broke")])
    events = run_execution(channel, REQUEST, DEADLINE, interrupt=Interrupt(),
                           timeout=DEADLINE, crash_wait=CRASH_WAIT, grace=GRACE, clock=clock)
    assert next(events) == Message(status("busy"), len(json.dumps(status("busy"))))
    with pytest.raises(ConnectionLost):
        next(events)
