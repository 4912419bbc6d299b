"""Unit tests of `app.kernels.execution.run_execution`, driven by a fake kernel and fake clock.

`FakeKernel` is the loop's `KernelControl`: each `connect()` hands out the next
`ScriptedChannel` of a list (so reconnections can be scripted), and `interrupt()`/`restart()`
are recorded, may raise, and may make the kernel send more messages. A channel plays its script
of messages, `Silence`s and exceptions against a `FakeClock`: a receive that finds nothing
advances the clock by its whole timeout, so deadlines, grace and settle periods pass instantly
and deterministically. The loop builds the `execute_request` itself, so scripted messages name
their parent with the placeholders `OWN` (the execute_request sent) and `INFO` (the oldest
kernel_info_request not answered yet), which the channel resolves when it delivers them.
Delivered messages are numbered as jupyter_client numbers them (`<session>_<pid>_<n>`): the
kernel's in the order the script sends them, a `Lost` item taking numbers of messages that
never arrive; the server's own death notices are another sender's; a restarted kernel is a new
pid.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from app.kernels import execution
from app.kernels.errors import (
    ConnectionLost,
    KernelError,
    KernelNotFound,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.kernels.execution import (
    LIVENESS_SECONDS,
    PING_SECONDS,
    RECONNECT_ATTEMPTS,
    RECONNECT_PAUSES,
    End,
    Message,
    Sent,
    run_execution,
)

CODE = "while True: pass"
DEADLINE = 100.0  # the clock starts at 0, so this is also the timeout
TIMEOUT = 100.0
GRACE = 5.0
SETTLE = 2.0
CRASH_WAIT = 30.0
CONNECT_TIMEOUT = 10.0
KERNEL_ID = "kernel-1"

OWN = "<the execute_request>"
INFO = "<the last kernel_info_request>"


# -- fakes -------------------------------------------------------------------------------------

class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The fake clock; the loop's own `time.sleep` (between reconnections) advances it."""
    fake = FakeClock()
    monkeypatch.setattr(execution, "time", SimpleNamespace(sleep=fake.sleep, monotonic=fake))
    return fake


@dataclass
class Silence:
    """Nothing arrives for `seconds`."""

    seconds: float


@dataclass
class Lost:
    """`count` messages the kernel sent that never arrive (they were on a broken connection)."""

    count: int = 1


class NewProcess:
    """The kernel process was replaced (a restart): numbering starts again under a new pid."""


class Dropped:
    """A frame that was no Jupyter message: the channel skipped it (and counted it)."""


class Pong:
    """The server's answer to a websocket ping (the kernel's `pong` says when one comes)."""


class ScriptedChannel:
    """A KernelChannel stand-in: records what is sent, plays `script` on receive.

    Script items are messages (delivered at once), `Silence`s (a receive whose timeout ends
    within one returns None; otherwise the silence passes and the next item is delivered in the
    same receive, as a real websocket would), or exceptions (raised by recv). Once the script is
    used up, the kernel says nothing more.
    """

    def __init__(self, kernel: FakeKernel, script: list, session_id: str) -> None:
        self.kernel = kernel
        self.clock = kernel.clock
        self.script = list(script)
        self.session_id = session_id
        self.kernel_id = KERNEL_ID
        self.sent: list[dict] = []
        self.recvs: list[tuple[float, float]] = []  # (clock at the call, timeout)
        self.closed = False
        self.dropped = 0
        self.pongs = 0
        self.pings: list[float] = []  # clock at each ping

    def ping(self) -> None:
        assert not self.closed, "ping on a closed channel"
        self.pings.append(self.clock())
        if self.kernel.pong:  # after what is on the wire already (up to the next silence)
            on_the_wire = next((i for i, item in enumerate(self.script)
                                if isinstance(item, Silence)), len(self.script))
            self.script.insert(on_the_wire, Pong())

    def send(self, message: dict) -> None:
        assert not self.closed, "send on a closed channel"
        self.sent.append(copy.deepcopy(message))

    def recv(self, timeout: float) -> tuple[dict[str, Any], int] | None:
        assert not self.closed, "recv on a closed channel"
        assert timeout > 0
        self.recvs.append((self.clock(), timeout))
        remaining = timeout
        while True:
            if not self.script:
                self.clock.now += remaining
                return None
            item = self.script[0]
            if isinstance(item, Silence):
                if item.seconds >= remaining:
                    item.seconds -= remaining
                    self.clock.now += remaining
                    if item.seconds <= 0:
                        self.script.pop(0)
                    return None
                self.clock.now += item.seconds
                remaining -= item.seconds
                self.script.pop(0)
                continue
            self.script.pop(0)
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Lost):
                self.kernel.numbered += item.count
                continue
            if isinstance(item, Dropped):
                self.dropped += 1
                continue
            if isinstance(item, Pong):
                self.pongs += 1
                return None
            if isinstance(item, NewProcess):
                self.kernel.pid, self.kernel.numbered = self.kernel.pid + 1, 0
                continue
            message = self.kernel.resolve(item)
            return message, len(json.dumps(message))

    def close(self) -> None:
        self.closed = True


class FakeKernel:
    """The loop's `KernelControl`: scripted connections, recorded interrupts and restarts.

    `scripts` holds one item per `connect()`: a script for a new `ScriptedChannel`, or an
    exception that connect raises. `on_interrupt`/`on_restart` are appended to the current
    channel's script when those are called (even if they then raise `interrupt_raises` /
    `restart_raises`). `connect_seconds` is how long each connection takes on the clock.
    """

    def __init__(self, clock: FakeClock, *scripts: list | BaseException,
                 on_interrupt: list = (), interrupt_raises: KernelError | None = None,
                 on_restart: list = (), restart_raises: KernelError | None = None,
                 connect_seconds: float = 0.0, model: dict | None = None,
                 pong: bool = False) -> None:
        self.clock = clock
        self.pong = pong  # whether the websockets answer pings (False: they died unheard)
        # What the server says of the kernel: busy (running the code) with only our connection.
        self.model = model if model is not None else {"execution_state": "busy",
                                                      "connections": 1}
        self.scripts = list(scripts)
        self.on_interrupt = list(on_interrupt)
        self.interrupt_raises = interrupt_raises
        self.on_restart = list(on_restart)
        self.restart_raises = restart_raises
        self.connect_seconds = connect_seconds
        self.channels: list[ScriptedChannel] = []
        self.connects: list[tuple[str | None, float]] = []  # (session_id, timeout)
        self.interrupts: list[float] = []  # clock at each call
        self.restarts: list[float] = []
        self.described: list[float] = []  # clock at each look-up of the kernel on the server
        self.released: list[bool] = []  # `reusable` of each channel handed back
        self.answered: set[str] = set()  # kernel_info_requests answered
        self.pid = 100  # the kernel process; a restart makes a new one
        self.numbered = 0  # how many messages this process sent
        self.server_numbered = 0

    def connect(self, session_id: str | None, timeout: float) -> ScriptedChannel:
        self.connects.append((session_id, timeout))
        self.clock.now += self.connect_seconds
        assert self.scripts, "the loop connected more often than the test scripted"
        item = self.scripts.pop(0)
        if isinstance(item, BaseException):
            raise item
        channel = ScriptedChannel(self, item, session_id or f"session-{len(self.connects)}")
        self.channels.append(channel)
        return channel

    def interrupt(self) -> None:
        self.interrupts.append(self.clock())
        self.channels[-1].script.extend(self.on_interrupt)
        if self.interrupt_raises is not None:
            raise self.interrupt_raises

    def restart(self) -> None:
        self.restarts.append(self.clock())
        self.channels[-1].script.extend(self.on_restart)
        if self.restart_raises is not None:
            raise self.restart_raises

    def describe(self) -> dict:
        self.described.append(self.clock())
        if isinstance(self.model, BaseException):
            raise self.model
        return self.model

    def release(self, channel: ScriptedChannel, reusable: bool) -> None:
        self.released.append(reusable)
        channel.close()

    @property
    def sent(self) -> list[dict]:
        return [message for channel in self.channels for message in channel.sent]

    def last_sent(self, msg_type: str) -> dict | None:
        matching = [m for m in self.sent if m["header"]["msg_type"] == msg_type]
        return matching[-1] if matching else None

    def first_unanswered_info(self) -> dict | None:
        """The kernel_info_request a kernel answers next: the oldest not answered yet."""
        for message in self.sent:
            if message["header"]["msg_type"] == "kernel_info_request" and \
                    message["header"]["msg_id"] not in self.answered:
                self.answered.add(message["header"]["msg_id"])
                return message
        return self.last_sent("kernel_info_request")

    def resolve(self, message: dict) -> dict:
        """A copy of `message` with the parent placeholders replaced by the real msg_ids."""
        message = copy.deepcopy(message)
        parent = message["parent_header"].get("msg_id")
        request = {OWN: self.last_sent("execute_request"),
                   INFO: self.first_unanswered_info()}.get(parent)
        if request is not None:
            message["parent_header"]["msg_id"] = request["header"]["msg_id"]
        state = message["content"].get("execution_state")
        if not message["header"]["msg_id"].startswith("k-"):
            pass  # the test set its id
        elif message["msg_type"] == "status" and not parent and state in ("restarting", "dead"):
            message["header"]["msg_id"] = f"server_1_{self.server_numbered}"
            self.server_numbered += 1
            self.pid, self.numbered = self.pid + 1, 0  # the kernel that comes back is new
        else:
            message["header"]["msg_id"] = f"kernel_{self.pid}_{self.numbered}"
            self.numbered += 1
        return message


# -- messages ----------------------------------------------------------------------------------

def kernel_msg(msg_type: str, content: dict | None = None, parent: str | None = OWN,
               channel: str = "iopub") -> dict:
    """A decoded message answering `parent` (None: parentless, as the server's own)."""
    return {"header": {"msg_id": f"k-{msg_type}", "msg_type": msg_type},
            "parent_header": {"msg_id": parent} if parent else {}, "metadata": {},
            "content": content or {}, "msg_type": msg_type, "channel": channel}


def status(state: str, parent: str | None = OWN) -> dict:
    return kernel_msg("status", {"execution_state": state}, parent)


def stream(text: str, parent: str | None = OWN) -> dict:
    return kernel_msg("stream", {"name": "stdout", "text": text}, parent)


def reply(state: str = "ok", parent: str | None = OWN) -> dict:
    return kernel_msg("execute_reply", {"status": state, "execution_count": 1}, parent,
                      channel="shell")


def numbered(message: dict, number: int | None) -> dict:
    """`message` with a set place in the kernel's numbering (None: a msg_id without one)."""
    message = copy.deepcopy(message)
    message["header"]["msg_id"] = "a-uuid" if number is None else f"kernel_100_{number}"
    return message


def info_reply(parent: str | None = INFO) -> dict:
    return kernel_msg("kernel_info_reply", {"status": "ok"}, parent, channel="shell")


def interrupted_answers() -> list:
    """What a kernel sends once an interrupt stops the code."""
    return [kernel_msg("error", {"ename": "KeyboardInterrupt", "evalue": "", "traceback": []}),
            reply("error"), status("idle")]


# -- running -----------------------------------------------------------------------------------

def start(kernel: FakeKernel, cancelled=lambda: False):
    """The event generator of one execution of CODE on `kernel`, with the test constants.

    `cancelled` is asked as in production (where it is always given, so the loop also wakes
    every CANCEL_POLL_SECONDS while the kernel is silent).
    """
    return run_execution(kernel, CODE, DEADLINE, timeout=TIMEOUT, crash_wait=CRASH_WAIT,
                         connect_timeout=CONNECT_TIMEOUT, grace=GRACE, settle=SETTLE,
                         cancelled=cancelled, clock=kernel.clock)


def run(kernel: FakeKernel) -> list:
    return list(start(kernel))


def run_until_raises(kernel: FakeKernel, error: type[BaseException]
                     ) -> tuple[list, BaseException]:
    """The events yielded before the execution raised `error`, and the exception."""
    events = []
    with pytest.raises(error) as caught:
        for event in start(kernel):
            events.append(event)
    return events, caught.value


def messages_of(events: list) -> list[dict]:
    return [e.message for e in events if isinstance(e, Message)]


def kinds(events: list) -> list[str]:
    return [m["msg_type"] for m in messages_of(events)]


def texts(events: list) -> list[str]:
    return [m["content"]["text"] for m in messages_of(events) if m["msg_type"] == "stream"]


def end_of(events: list) -> End:
    assert isinstance(events[-1], End), "the last event must be the End"
    assert sum(isinstance(e, End) for e in events) == 1
    return events[-1]


def assert_all_closed(kernel: FakeKernel) -> None:
    """Every channel opened was closed or handed back."""
    assert kernel.channels and all(channel.closed for channel in kernel.channels)


def recv_ends(kernel: FakeKernel, before: float = DEADLINE) -> list[float]:
    """When each receive started before `before` would time out at the latest."""
    return [at + timeout for channel in kernel.channels for at, timeout in channel.recvs
            if at < before]


# -- the request ---------------------------------------------------------------------------------

def test_opens_a_new_session_and_sends_one_execute_request(clock):
    """First connect has no session id; the request carries the code, that session, no stdin."""
    kernel = FakeKernel(clock, [status("busy"), reply(), status("idle")])
    run(kernel)
    assert kernel.connects == [(None, CONNECT_TIMEOUT)]
    [request] = kernel.channels[0].sent
    assert request["header"]["msg_type"] == "execute_request"
    assert request["header"]["session"] == kernel.channels[0].session_id
    assert request["content"]["code"] == CODE
    assert request["content"]["allow_stdin"] is False


def test_yielded_messages_answer_the_sent_request_and_carry_their_size(clock):
    kernel = FakeKernel(clock, [stream("x" * 40), reply(), status("idle")])
    events = run(kernel)
    msg_id = kernel.last_sent("execute_request")["header"]["msg_id"]
    assert isinstance(events[0], Sent), "the first event says the request is sent"
    for event in events[1:-1]:
        assert event.message["parent_header"]["msg_id"] == msg_id
        assert event.size == len(json.dumps(event.message))


def test_connect_timeout_is_capped_by_the_time_left(clock):
    """A connection opened 3 s before the deadline may take 3 s, not CONNECT_TIMEOUT."""
    clock.now = DEADLINE - 3
    kernel = FakeKernel(clock, [reply(), status("idle")])
    assert end_of(run(kernel)) == End()
    assert kernel.connects == [(None, 3.0)]


def test_a_handshake_cut_short_by_the_deadline_is_a_timeout_of_code_that_did_not_run(clock):
    clock.now = DEADLINE - 0.05  # a tiny timeout, and no warm websocket
    kernel = FakeKernel(clock, UpstreamTimeout("the kernel websocket did not open"),
                        connect_seconds=0.1)
    events = run(kernel)
    assert isinstance(events[0], Sent)
    end = end_of(events)
    assert end.status == "timeout" and "did not run" in end.error["evalue"]
    assert not end.output_lost


def test_a_frame_that_is_no_message_is_skipped_and_marks_the_output_maybe_incomplete(clock):
    kernel = FakeKernel(clock, [status("busy"), Dropped(), stream("after"), reply(),
                                status("idle")])
    events = run(kernel)
    assert texts(events) == ["after"]
    end = end_of(events)
    assert end.status is None and end.output_lost


def test_code_is_not_sent_once_its_deadline_passed_while_connecting(clock):
    clock.now = DEADLINE - 0.05
    kernel = FakeKernel(clock, [reply(), status("idle")], connect_seconds=0.1)
    events = run(kernel)
    end = end_of(events)
    assert end.status == "timeout" and "did not run" in end.error["evalue"]
    assert kernel.channels[0].sent == []
    assert kernel.released == [True]  # nothing was sent: the websocket stays usable


def test_a_slow_handshake_within_the_deadline_is_the_servers_timeout(clock):
    kernel = FakeKernel(clock, UpstreamTimeout("the kernel websocket did not open"),
                        connect_seconds=CONNECT_TIMEOUT)
    events, error = run_until_raises(kernel, UpstreamTimeout)
    assert events == [] and "did not open" in str(error)


# -- normal completion -------------------------------------------------------------------------

def test_messages_of_other_requests_are_skipped(clock):
    """Other clients' messages, and parentless statuses that are no death, are not yielded."""
    other = "someone-elses-request"
    kernel = FakeKernel(clock, [status("busy"), stream("theirs", parent=other), stream("ours"),
                                status("starting", parent=None), reply(parent=other),
                                reply(), status("idle", parent=other), status("idle")])
    events = run(kernel)
    assert kinds(events) == ["status", "stream", "execute_reply", "status"]
    assert texts(events) == ["ours"]
    assert end_of(events) == End()
    assert kernel.interrupts == [] and kernel.restarts == []


@pytest.mark.parametrize("ending", [
    [reply(), status("idle")],
    [status("idle"), reply()],
], ids=["reply-then-idle", "idle-then-reply"])
def test_completes_on_reply_and_idle_in_either_order(clock, ending):
    kernel = FakeKernel(clock, [status("busy"), stream("hi"), *ending])
    events = run(kernel)
    assert kinds(events) == ["status", "stream"] + [m["msg_type"] for m in ending]
    assert end_of(events) == End()
    assert clock.now == 0  # nothing waited for: both halves were in
    assert kernel.interrupts == [] and kernel.restarts == []
    assert kernel.released == [True]  # the channel is clean: kept warm for the next request


def test_messages_between_reply_and_idle_are_kept(clock):
    kernel = FakeKernel(clock, [status("busy"), reply(), Silence(1), stream("late output"),
                                status("idle")])
    events = run(kernel)
    assert texts(events) == ["late output"]
    assert end_of(events) == End()


def test_stops_reading_once_complete(clock):
    kernel = FakeKernel(clock, [reply(), status("idle"), stream("the next request's?")])
    events = run(kernel)
    assert end_of(events) == End()
    assert kernel.channels[0].script == [stream("the next request's?")]


def test_error_reply_is_a_normal_end(clock):
    """An error in the code is the kernel's own answer: End() leaves the status to the reply."""
    kernel = FakeKernel(clock, [kernel_msg("error", {"ename": "ZeroDivisionError"}),
                                reply("error"), status("idle")])
    events = run(kernel)
    assert kinds(events) == ["error", "execute_reply", "status"]
    assert end_of(events) == End()


def test_slow_kernel_within_the_deadline_is_not_interrupted(clock):
    kernel = FakeKernel(clock, [status("busy"), Silence(60), stream("done"), Silence(39),
                                reply(), status("idle")])
    events = run(kernel)
    assert end_of(events) == End()
    assert texts(events) == ["done"]
    assert kernel.interrupts == []
    assert clock.now == 99


# -- one half missing --------------------------------------------------------------------------

def test_a_reply_with_nothing_of_its_request_on_iopub_says_output_may_be_missing(clock):
    """Only the reply came, not even `busy`: iopub lost the request's messages (as when the
    server's subscription to a just restarted process was not up yet)."""
    kernel = FakeKernel(clock, [reply()])
    events = run(kernel)
    assert end_of(events) == End(output_lost=True)


def test_dropped_idle_completes_after_settle_seconds_not_at_the_deadline(clock):
    kernel = FakeKernel(clock, [status("busy"), Silence(10), reply()])
    events = run(kernel)
    assert kinds(events) == ["status", "execute_reply"]
    assert end_of(events) == End()
    assert clock.now == 10 + SETTLE
    assert kernel.interrupts == [] and kernel.restarts == []


def test_settle_wait_restarts_with_each_message_after_the_reply(clock):
    """The idle is awaited while messages keep coming; SETTLE s of silence ends the wait."""
    kernel = FakeKernel(clock, [reply(), Silence(1.5), stream("a"), Silence(1.5), stream("b")])
    events = run(kernel)
    assert texts(events) == ["a", "b"]
    assert end_of(events) == End()
    assert clock.now == 1.5 + 1.5 + SETTLE


def test_idle_without_reply_raises_connection_lost_after_settle_seconds(clock):
    kernel = FakeKernel(clock, [status("busy"), stream("out"), Silence(10), status("idle")])
    events, error = run_until_raises(kernel, ConnectionLost)
    assert kinds(events) == ["status", "stream", "status"]
    assert "reply was lost" in error.message
    assert error.details.get("kernel_id") == KERNEL_ID
    assert clock.now == 10 + SETTLE
    assert kernel.interrupts == [] and kernel.restarts == []
    assert_all_closed(kernel)


@pytest.mark.parametrize("half", [reply(), status("idle")], ids=["reply", "idle"])
def test_half_in_just_before_the_deadline_does_not_interrupt(clock, half):
    """A reply (or idle) 1 s before the deadline means the code finished: no interrupt.

    The settle wait is cut short by the deadline, and the loop then treats the finished code
    as overrunning: it interrupts the kernel (which by now may run someone else's code) and
    reports a timeout for code that completed (or, for the idle, interrupts and only then
    raises ConnectionLost).
    """
    # Code that finished just before the deadline must not be treated as overrunning: an
    # interrupt then could hit whatever the kernel runs next.
    kernel = FakeKernel(clock, [status("busy"), Silence(DEADLINE - 1), half])
    if half["msg_type"] == "execute_reply":
        events = run(kernel)
        assert kernel.interrupts == [] and kernel.restarts == []
        assert end_of(events) == End()
    else:
        run_until_raises(kernel, ConnectionLost)
        assert kernel.interrupts == [] and kernel.restarts == []


# -- deadline ----------------------------------------------------------------------------------

def test_deadline_interrupts_once_and_keeps_what_arrives_in_the_grace_period(clock):
    kernel = FakeKernel(clock, [status("busy"), stream("partial")],
                        on_interrupt=[Silence(1), *interrupted_answers()])
    events = run(kernel)
    assert kernel.interrupts == [DEADLINE]
    assert kernel.restarts == []
    assert kinds(events) == ["status", "stream", "error", "execute_reply", "status"]
    end = end_of(events)
    assert end.status == "timeout"
    assert end.error["ename"] == "ExecutionTimeout"
    assert f"{TIMEOUT:g} s deadline" in end.error["evalue"]
    assert "interrupted and keeps its state" in end.error["evalue"]
    assert clock.now == DEADLINE + 1
    assert_all_closed(kernel)
    assert kernel.released == [True]


def test_cancelled_execution_is_interrupted_and_ends_cancelled(clock):
    """A client that goes away (a dropped stream) stops its code as a deadline would."""
    kernel = FakeKernel(clock, [status("busy"), stream("partial"), Silence(3)],
                        on_interrupt=interrupted_answers())
    seen: list = []
    events = []
    for event in start(kernel, cancelled=lambda: bool(seen)):
        events.append(event)
        if isinstance(event, Message) and event.message["msg_type"] == "stream":
            seen.append(clock.now)
    assert len(kernel.interrupts) == 1 and kernel.interrupts[0] < DEADLINE
    assert kernel.restarts == []
    end = end_of(events)
    assert end.status == "cancelled"
    assert end.error["ename"] == "ExecutionCancelled"
    assert "interrupted and keeps its state" in end.error["evalue"]
    assert kinds(events) == ["status", "stream", "error", "execute_reply", "status"]
    assert kernel.released == [True]


def test_cancelled_before_sending_never_sends_the_code(clock):
    kernel = FakeKernel(clock, [])
    events = list(start(kernel, cancelled=lambda: True))
    assert isinstance(events[0], Sent)
    end = end_of(events)
    assert end.status == "cancelled" and "not sent" in end.error["evalue"]
    assert kernel.channels[0].sent == []
    assert kernel.released == [True]


def test_cancelled_before_the_kernel_says_it_started_still_interrupts_once_it_does(clock):
    """Cancelled right after sending: the kernel's busy comes a moment later; the code it
    starts must not run on unseen.
    """
    kernel = FakeKernel(clock, [Silence(0.2), status("busy")],
                        on_interrupt=interrupted_answers())
    calls = []
    events = list(start(kernel, cancelled=lambda: calls.append(1) or len(calls) > 1))
    assert len(kernel.interrupts) == 1
    assert end_of(events).status == "cancelled"
    assert "interrupted" in end_of(events).error["evalue"]


def test_the_cancel_poll_does_not_shorten_the_reconnect_window(clock):
    kernel = FakeKernel(clock, [status("busy"), ConnectionLost("broke")],
                        UpstreamUnavailable("restarting"), UpstreamUnavailable("restarting"),
                        UpstreamUnavailable("restarting"),
                        [stream("after"), reply(), status("idle")])
    events = list(start(kernel))
    assert texts(events) == ["after"]
    assert end_of(events) == End()


def test_reply_without_idle_in_the_grace_period_settles(clock):
    """After the interrupt, a reply whose idle is dropped still ends the grace wait early."""
    kernel = FakeKernel(clock, [status("busy")], on_interrupt=[reply("error")])
    events = run(kernel)
    assert kernel.interrupts == [DEADLINE] and kernel.restarts == []
    assert "interrupted and keeps its state" in end_of(events).error["evalue"]
    assert clock.now == DEADLINE + SETTLE


def test_kernel_that_ignores_the_interrupt_is_restarted(clock):
    kernel = FakeKernel(clock, [status("busy"), stream("partial")],
                        on_interrupt=[Silence(1), stream("still going")])
    events = run(kernel)
    assert kernel.interrupts == [DEADLINE]
    assert kernel.restarts == [DEADLINE + GRACE]
    assert texts(events) == ["partial", "still going"]
    end = end_of(events)
    assert end.status == "timeout"
    assert end.error["ename"] == "ExecutionTimeout"
    assert "restarted" in end.error["evalue"]
    assert "state is lost" in end.error["evalue"]
    assert "may still be running" not in end.error["evalue"]
    assert clock.now == DEADLINE + GRACE
    assert_all_closed(kernel)
    assert kernel.released == [False]  # a restarted kernel's channel is not reused


def test_failed_interrupt_goes_straight_to_restart(clock):
    kernel = FakeKernel(clock, [status("busy")], interrupt_raises=UpstreamError("refused"))
    events = run(kernel)
    assert kernel.interrupts == [DEADLINE]
    assert kernel.restarts == [DEADLINE]
    end = end_of(events)
    assert end.status == "timeout"
    assert "state is lost" in end.error["evalue"]


@pytest.mark.parametrize("interrupt_raises", [None, UpstreamError("interrupt refused")],
                         ids=["interrupt-ignored", "interrupt-failed"])
def test_failed_restart_says_the_code_may_still_be_running(clock, interrupt_raises):
    kernel = FakeKernel(clock, [status("busy")], interrupt_raises=interrupt_raises,
                        restart_raises=UpstreamUnavailable("server down"))
    events = run(kernel)
    assert len(kernel.interrupts) == 1
    assert len(kernel.restarts) == 1
    end = end_of(events)
    assert end.status == "timeout"
    assert end.error["ename"] == "ExecutionTimeout"
    assert "may still be running" in end.error["evalue"]
    assert_all_closed(kernel)


def test_code_that_never_started_is_neither_interrupted_nor_restarted(clock):
    """The kernel was busy with another client's code: interrupting would stop theirs."""
    other = "someone-elses-request"
    kernel = FakeKernel(clock, [status("busy", parent=other), stream("theirs", parent=other),
                                Silence(50), stream("still theirs", parent=other)])
    events = run(kernel)
    assert messages_of(events) == []
    assert kernel.interrupts == [] and kernel.restarts == []
    end = end_of(events)
    assert end.status == "timeout"
    assert end.error["ename"] == "ExecutionTimeout"
    assert "did not start" in end.error["evalue"] and "may still run" in end.error["evalue"]
    assert clock.now == DEADLINE  # no grace period either
    assert_all_closed(kernel)


def test_death_during_the_grace_period_is_a_crash_not_a_restart(clock):
    kernel = FakeKernel(clock, [status("busy")],
                        on_interrupt=[Silence(1), status("dead", parent=None)])
    events = run(kernel)
    assert kernel.interrupts == [DEADLINE]
    assert kernel.restarts == []
    end = end_of(events)
    assert end.status == "crashed"
    assert "gone" in end.error["evalue"]


def test_recv_never_waits_beyond_the_deadline(clock):
    """Each receive started before the deadline times out by the deadline at the latest."""
    kernel = FakeKernel(clock, [status("busy"), Silence(30), stream("a"), Silence(69.5),
                                stream("b")],
                        on_interrupt=[Silence(GRACE - 1), *interrupted_answers()])
    assert end_of(run(kernel)).status == "timeout"
    ends = recv_ends(kernel)
    assert ends and max(ends) <= DEADLINE
    assert max(recv_ends(kernel, before=float("inf"))) <= DEADLINE + GRACE


# -- kernel death ------------------------------------------------------------------------------

@pytest.mark.parametrize("back", ["starting", "idle"])
def test_restarted_kernel_is_reported_once_it_answers_kernel_info(clock, back):
    kernel = FakeKernel(clock, [status("busy"), stream("before"), Silence(2),
                                status("restarting", parent=None), Silence(3),
                                status(back, parent=None), Silence(1), info_reply()])
    events = run(kernel)
    assert texts(events) == ["before"]
    end = end_of(events)
    assert end.status == "crashed"
    assert end.error["ename"] == "KernelDied"
    assert "works again" in end.error["evalue"]
    assert kernel.interrupts == [] and kernel.restarts == []
    assert clock.now == 6  # long before the deadline
    info = kernel.last_sent("kernel_info_request")
    assert info is not None and info["header"]["session"] == kernel.channels[0].session_id
    assert_all_closed(kernel)
    assert kernel.released == [False]


def test_restarted_kernel_is_found_by_asking_even_when_its_starting_status_is_missed(clock):
    """The new kernel's `starting` is often sent before the server's subscription reaches it;
    kernel_info requests sent from the start are held by the server and answered."""
    kernel = FakeKernel(clock, [status("busy"), Silence(2), status("restarting", parent=None),
                                Silence(3), info_reply()])
    end = end_of(run(kernel))
    assert "works again" in end.error["evalue"]
    assert clock.now == 5
    probes = [m for m in kernel.sent if m["header"]["msg_type"] == "kernel_info_request"]
    assert len(probes) == 3  # at 2, 2.5 and 3.5 s: fewer and fewer while the kernel is away


def test_restart_asked_for_is_reported_once_the_new_process_answers(clock):
    """After a requested restart the old process can still answer for a moment: that answer
    does not count."""
    shutdown = kernel_msg("shutdown_reply", {"restart": True}, parent="the server's request")
    kernel = FakeKernel(clock, [status("busy"), Silence(1), shutdown, Silence(1), info_reply(),
                                Silence(1), NewProcess(), info_reply()])
    end = end_of(run(kernel))
    assert end.status == "crashed"
    assert end.error["ename"] == "KernelRestarted"
    assert "while running this code" in end.error["evalue"]
    assert clock.now == 3


def test_without_numbers_a_requested_restart_waits_for_the_new_process_to_show(clock):
    unnumbered = [numbered(m, None) for m in (
        status("busy"), kernel_msg("shutdown_reply", {"restart": True}, parent="the server's"),
        info_reply(), status("starting", parent=None), info_reply())]
    busy, shutdown, old_answer, starting, new_answer = unnumbered
    kernel = FakeKernel(clock, [busy, Silence(1), shutdown, Silence(1), old_answer, Silence(1),
                                starting, Silence(1), new_answer])
    end = end_of(run(kernel))
    assert end.error["ename"] == "KernelRestarted"
    assert clock.now == 4  # the answer before `starting` may be the old process's


def test_after_a_crash_any_answer_is_the_new_process(clock):
    """The server saw the process die: whoever answers is the new one, numbers or not."""
    kernel = FakeKernel(clock, [numbered(status("busy"), None), Silence(1),
                                status("restarting", parent=None), Silence(1),
                                numbered(info_reply(), None)])
    end = end_of(run(kernel))
    assert "works again" in end.error["evalue"]
    assert clock.now == 2


def test_kernel_info_reply_to_another_request_does_not_count(clock):
    kernel = FakeKernel(clock, [status("busy"), status("restarting", parent=None),
                                status("starting", parent=None), info_reply(parent="other")])
    end = end_of(run(kernel))
    assert "still restarting" in end.error["evalue"]
    assert clock.now == CRASH_WAIT


def test_dead_kernel_is_reported_at_once(clock):
    kernel = FakeKernel(clock, [status("busy"), stream("before"), Silence(1),
                                status("dead", parent=None), stream("never read")])
    events = run(kernel)
    assert texts(events) == ["before"]
    end = end_of(events)
    assert end.status == "crashed"
    assert end.error["ename"] == "KernelDied"
    assert "gone" in end.error["evalue"]
    assert kernel.interrupts == [] and kernel.restarts == []
    assert clock.now == 1
    assert_all_closed(kernel)


def test_restart_that_fails_is_reported_when_the_server_says_dead(clock):
    kernel = FakeKernel(clock, [status("busy"), Silence(2), status("restarting", parent=None),
                                Silence(4), status("dead", parent=None)])
    end = end_of(run(kernel))
    assert end.status == "crashed"
    assert "gone" in end.error["evalue"]
    assert clock.now == 6


def test_dead_after_starting_is_reported_at_once(clock):
    """A restarted kernel that dies again before answering kernel_info is gone, at once."""
    # A kernel that dies again while coming back is gone: say so at once, not after crash_wait.
    kernel = FakeKernel(clock, [status("busy"), Silence(2), status("restarting", parent=None),
                                Silence(1), status("starting", parent=None), Silence(1),
                                status("dead", parent=None)])
    end = end_of(run(kernel))
    assert end.status == "crashed"
    assert "gone" in end.error["evalue"]
    assert clock.now == 4


def test_restart_that_never_finishes_waits_crash_wait(clock):
    kernel = FakeKernel(clock, [status("busy"), Silence(2), status("restarting", parent=None)])
    events = run(kernel)
    end = end_of(events)
    assert end.status == "crashed"
    assert end.error["ename"] == "KernelDied"
    assert "still restarting" in end.error["evalue"]
    assert f"{CRASH_WAIT:g} s" in end.error["evalue"]
    assert kernel.interrupts == [] and kernel.restarts == []
    assert clock.now == 2 + CRASH_WAIT
    assert_all_closed(kernel)


def test_silent_kernel_is_looked_up_on_the_server_every_liveness_period(clock):
    kernel = FakeKernel(clock, [status("busy"), Silence(8), stream("a"), Silence(8),
                                stream("b")], on_interrupt=interrupted_answers())
    assert end_of(run(kernel)).status == "timeout"
    # Not while messages come; from the last one on, after each LIVENESS_SECONDS of silence.
    assert kernel.described == [16 + n * LIVENESS_SECONDS
                                for n in range(1, int((DEADLINE - 16) // LIVENESS_SECONDS) + 1)]


def test_an_ordinary_cell_is_not_looked_up_on_the_server(clock):
    clock.now = 5000.0  # a real monotonic clock is far from 0
    kernel = FakeKernel(clock, [status("busy"), stream("a"), reply(), status("idle")])
    events = list(run_execution(kernel, CODE, clock.now + DEADLINE, timeout=TIMEOUT,
                                crash_wait=CRASH_WAIT, connect_timeout=CONNECT_TIMEOUT,
                                clock=clock))
    assert end_of(events) == End()
    assert kernel.described == []


def test_a_look_up_the_server_cannot_answer_changes_nothing(clock):
    kernel = FakeKernel(clock, [status("busy")], on_interrupt=interrupted_answers(),
                        model=UpstreamTimeout("slow"))
    end = end_of(run(kernel))
    assert end.status == "timeout" and kernel.interrupts == [DEADLINE]
    assert kernel.described == [n * LIVENESS_SECONDS
                                for n in range(1, int(DEADLINE // LIVENESS_SECONDS) + 1)]


def test_kernel_shut_down_while_silent_is_reported_at_the_next_look_up(clock):
    """A kernel deleted while it was dead (before the server noticed) or hung sends nothing,
    and the server leaves its websocket open."""
    kernel = FakeKernel(clock, [status("busy")], model=KernelNotFound(KERNEL_ID))
    end = end_of(run(kernel))
    assert end.status == "crashed" and "shut down" in end.error["evalue"]
    assert clock.now == LIVENESS_SECONDS
    assert kernel.interrupts == [] and kernel.restarts == []
    assert_all_closed(kernel)


def test_kernel_shut_down_while_the_server_restarts_it_is_reported_at_the_second_probe(clock):
    kernel = FakeKernel(clock, [status("busy"), Silence(2), status("restarting", parent=None)],
                        model=KernelNotFound(KERNEL_ID))
    end = end_of(run(kernel))
    assert end.status == "crashed" and "shut down" in end.error["evalue"]
    assert clock.now == 2 + execution.PROBE_PAUSES[0]  # not after CRASH_WAIT


def test_status_dead_of_another_request_is_not_a_death(clock):
    kernel = FakeKernel(clock, [status("dead", parent="other"), reply(), status("idle")])
    assert end_of(run(kernel)) == End()


# -- stdin -------------------------------------------------------------------------------------

def test_input_request_interrupts_and_ends_with_a_stdin_error(clock):
    kernel = FakeKernel(clock, [status("busy"), kernel_msg("input_request", {"prompt": "?"})],
                        on_interrupt=interrupted_answers())
    events = run(kernel)
    assert kernel.interrupts == [0] and kernel.restarts == []
    assert kinds(events) == ["status", "input_request", "error", "execute_reply", "status"]
    end = end_of(events)
    assert end.status == "error"
    assert end.error["ename"] == "StdinNotImplementedError"


# -- broken connection -------------------------------------------------------------------------

def test_connection_lost_reconnects_with_the_same_session_and_collects_the_replay(clock):
    kernel = FakeKernel(clock,
                        [status("busy"), stream("a"), Silence(5), ConnectionLost("broke")],
                        [stream("b"), reply(), status("idle")])
    events = run(kernel)
    first, second = kernel.channels
    assert [session for session, _ in kernel.connects] == [None, first.session_id]
    assert second.session_id == first.session_id
    assert second.sent == []  # the request is never sent twice
    assert [m["header"]["msg_type"] for m in first.sent] == ["execute_request"]
    assert texts(events) == ["a", "b"]
    assert kinds(events)[-2:] == ["execute_reply", "status"]
    assert end_of(events) == End()
    assert kernel.interrupts == [] and kernel.restarts == []
    assert_all_closed(kernel)


def test_reconnect_failure_raises_connection_lost_after_the_messages_before_it(clock):
    down = [UpstreamUnavailable("server down") for _ in RECONNECT_PAUSES]
    kernel = FakeKernel(clock, [status("busy"), ConnectionLost("broke")], *down)
    events, error = run_until_raises(kernel, ConnectionLost)
    assert kinds(events) == ["status"]
    assert isinstance(error.__cause__, UpstreamUnavailable)
    session = kernel.channels[0].session_id
    assert [s for s, _ in kernel.connects] == [None] + [session] * len(RECONNECT_PAUSES)
    assert_all_closed(kernel)


def test_reconnect_is_retried_with_backoff_until_the_server_answers(clock):
    kernel = FakeKernel(clock, [status("busy"), ConnectionLost("broke")],
                        UpstreamUnavailable("restarting"), UpstreamUnavailable("restarting"),
                        [stream("after"), reply(), status("idle")])
    events = run(kernel)
    assert texts(events) == ["after"]
    assert end_of(events) == End()
    assert len(kernel.connects) == 4


def test_messages_lost_on_the_wire_when_the_connection_broke_mark_the_output_lost(clock):
    """The server replays only what it buffered after it saw the break: the hole in the
    kernel's message numbers shows what was in flight."""
    kernel = FakeKernel(clock, [status("busy"), stream("a"), Lost(2), ConnectionLost("broke")],
                        [stream("d"), reply(), status("idle")])
    events = run(kernel)
    assert texts(events) == ["a", "d"]
    assert end_of(events) == End(output_lost=True)


def test_replay_out_of_order_loses_nothing(clock):
    kernel = FakeKernel(clock, [numbered(status("busy"), 0), numbered(stream("a"), 1),
                                ConnectionLost("broke")],
                        [numbered(stream("c"), 3), numbered(stream("b"), 2),
                         numbered(reply(), 4), numbered(status("idle"), 5)])
    assert end_of(run(kernel)) == End()


def test_a_hole_after_the_break_was_bounded_is_not_a_loss(clock):
    """Numbers the kernel spends on messages to others (another client's control reply) while
    the connection is fine again are no loss; a hole before the first number after the break
    is."""
    fine = FakeKernel(clock, [status("busy"), ConnectionLost("broke")],
                      [stream("a"), Lost(), stream("b"), reply(), status("idle")])
    assert end_of(run(fine)) == End()
    lost = FakeKernel(clock, [status("busy"), ConnectionLost("broke")],
                      [Lost(), stream("a"), stream("b"), reply(), status("idle")])
    assert end_of(run(lost)) == End(output_lost=True)


def test_a_message_sent_out_of_order_just_before_the_break_is_awaited(clock):
    """ipykernel's threads can send #2 before #1: a break between them may lose #1."""
    kernel = FakeKernel(clock, [numbered(status("busy"), 0), numbered(stream("b"), 2),
                                ConnectionLost("broke")],
                        [numbered(stream("c"), 3), numbered(reply(), 4),
                         numbered(status("idle"), 5)])
    assert end_of(run(kernel)) == End(output_lost=True)


def test_break_before_any_message_of_the_request(clock):
    whole = FakeKernel(clock, [status("busy", parent="other"), ConnectionLost("broke")],
                       [Lost(), status("busy"), stream("a"), reply(), status("idle")])
    assert end_of(run(whole)) == End()  # its `busy` came: nothing of it is missing
    start_lost = FakeKernel(clock, [ConnectionLost("broke")],
                            [Lost(2), stream("a"), reply(), status("idle")])
    assert end_of(run(start_lost)) == End(output_lost=True)


def test_without_message_numbers_a_break_counts_as_a_possible_loss(clock):
    kernel = FakeKernel(clock, [numbered(status("busy"), None), ConnectionLost("broke")],
                        [numbered(reply(), None), numbered(status("idle"), None)])
    assert end_of(run(kernel)) == End(output_lost=True)


def test_messages_of_other_senders_do_not_fill_or_make_holes(clock):
    """The server's own messages (its rate-limit notice answers our request) are numbered by
    the server's session, not the kernel's."""
    notice = kernel_msg("stream", {"name": "stderr", "text": "IOPub message rate exceeded"})
    filler = {**notice, "header": {**notice["header"], "msg_id": "server_1_1"}}
    kernel = FakeKernel(clock, [status("busy"), ConnectionLost("broke")],
                        [filler, Lost(), reply(), status("idle")])
    assert end_of(run(kernel)) == End(output_lost=True)  # kernel's #1 is still missing
    far = {**notice, "header": {**notice["header"], "msg_id": "server_1_99"}}
    kernel = FakeKernel(clock, [status("busy"), ConnectionLost("broke")],
                        [far, reply(), status("idle")])
    assert end_of(run(kernel)) == End()  # and #99 opens no gap in the kernel's numbers


def test_a_break_that_nothing_follows_counts_as_a_possible_loss(clock):
    """The reply came, then the break: the idle (and anything after the reply) is gone."""
    kernel = FakeKernel(clock, [status("busy"), reply(), ConnectionLost("broke")], [])
    assert end_of(run(kernel)) == End(output_lost=True)


def test_code_that_did_not_start_lost_nothing(clock):
    kernel = FakeKernel(clock, [ConnectionLost("broke")], [],
                        model={"execution_state": "busy", "connections": 1})
    end = end_of(run(kernel))
    assert end.status == "timeout" and "did not start" in end.error["evalue"]
    assert end.output_lost is False


def test_silence_after_a_reconnect_with_an_idle_kernel_means_the_answer_was_lost(clock):
    kernel = FakeKernel(clock, [status("busy"), ConnectionLost("broke")], [],
                        model={"execution_state": "idle", "connections": 2})
    run_until_raises(kernel, ConnectionLost)
    assert clock.now < 10  # found out within a settle period, not at the deadline
    assert kernel.interrupts == [] and kernel.restarts == []


class IdleOnceInterrupted(FakeKernel):
    """The server says the kernel is busy until the interrupt, and idle after it."""

    def interrupt(self) -> None:
        super().interrupt()
        self.model = {"execution_state": "idle", "connections": 1}


def test_an_idle_kernel_is_never_restarted_at_the_deadline(clock):
    kernel = IdleOnceInterrupted(clock, [status("busy")], [])
    run_until_raises(kernel, ConnectionLost)
    assert kernel.interrupts == [DEADLINE]
    assert kernel.restarts == []  # its state is kept: the code had finished


def test_a_silent_websocket_to_an_idle_kernel_is_reopened_and_the_lost_answer_told_early(clock):
    """A network that drops the websocket without a word (no FIN, no RST): the server says the
    kernel is idle while nothing of the request came; the proxy reopens the websocket (the
    server replays what it buffered, if it saw the break) and, still nothing, says so."""
    kernel = FakeKernel(clock, [status("busy")], [], model={"execution_state": "idle"})
    _, error = run_until_raises(kernel, ConnectionLost)
    assert [session for session, _ in kernel.connects] == [None, "session-1"]  # same session
    assert clock.now <= LIVENESS_SECONDS + 2 * SETTLE + PING_SECONDS + 1  # not at the deadline
    assert "the code finished, but its answer was lost" in error.message
    assert kernel.interrupts == [] and kernel.restarts == []
    assert kernel.released == [False]  # the dead websocket is not kept


def test_a_live_websocket_is_believed_over_a_server_that_says_idle(clock):
    """A gateway's view of a kernel can stay `idle` after a restart while code runs: a
    websocket that answers a ping is not reopened, and the code's output still comes."""
    kernel = FakeKernel(clock, [status("busy"), Silence(3 * LIVENESS_SECONDS), stream("late"),
                                reply(), status("idle")],
                        model={"execution_state": "idle"}, pong=True)
    events = run(kernel)
    assert texts(events) == ["late"] and end_of(events) == End()
    assert len(kernel.connects) == 1 and kernel.channels[0].pings


def test_code_past_its_deadline_on_a_live_websocket_is_restarted_though_the_server_says_idle(
        clock):
    """The same wrong view at the deadline: code that ignores the interrupt is restarted, not
    reported finished with its answer lost (it would run on, holding the kernel)."""
    kernel = FakeKernel(clock, [status("busy"), stream("partial")],
                        on_interrupt=[Silence(1), stream("still going")],
                        model={"execution_state": "idle"}, pong=True)
    events = run(kernel)
    assert kernel.interrupts == [DEADLINE] and len(kernel.restarts) == 1
    assert kernel.channels[0].pings
    end = end_of(events)
    assert end.status == "timeout" and "restarted" in end.error["evalue"]


def test_an_answer_on_the_wire_when_the_server_says_idle_at_the_deadline_is_read(clock):
    """The interrupt took just as the grace ended: the server says idle, and the reply and
    idle are on their way, ahead of the ping's answer. The code stopped: no restart."""
    kernel = FakeKernel(clock, [status("busy")],
                        on_interrupt=[Silence(GRACE), reply("error"), status("idle")],
                        model={"execution_state": "idle"}, pong=True)
    events = run(kernel)
    assert kernel.restarts == []
    end = end_of(events)
    assert end.status == "timeout" and "interrupted and keeps its state" in end.error["evalue"]


def test_code_past_its_deadline_on_a_dead_websocket_to_an_idle_kernel_is_an_answer_lost(clock):
    ticks = [item for _ in range(int(DEADLINE / 5)) for item in (Silence(5), stream("."))]
    kernel = FakeKernel(clock, [status("busy"), *ticks],  # (never silent before the deadline)
                        model={"execution_state": "idle"})
    _, error = run_until_raises(kernel, ConnectionLost)
    assert "interrupted" in error.message and "answer was lost" in error.message
    assert kernel.restarts == [] and kernel.channels[0].pings


def test_an_answer_on_its_way_when_the_server_says_idle_is_read_not_thrown_away(clock):
    """The cell ends just as the silent kernel is looked up: the websocket gets `settle` more
    before it is taken for dead."""
    kernel = FakeKernel(clock, [status("busy"), Silence(LIVENESS_SECONDS + 0.5), stream("done"),
                                reply(), status("idle")], model={"execution_state": "idle"})
    events = run(kernel)
    assert texts(events) == ["done"] and end_of(events) == End()
    assert len(kernel.connects) == 1


def test_an_idle_the_websocket_itself_brought_is_no_reason_to_reopen_it(clock):
    """Another client's control request (usage, debug, subshells) makes the kernel say busy,
    then idle, and the server believes it, while this code runs on: the websocket, which
    brought that idle too, is alive."""
    kernel = FakeKernel(clock, [status("busy"), Silence(3), status("busy", parent="other"),
                                status("idle", parent="other"), Silence(30), reply(),
                                status("idle")], model={"execution_state": "idle"})
    assert end_of(run(kernel)) == End()
    assert len(kernel.connects) == 1


def test_a_reopen_far_from_the_deadline_may_take_longer_than_the_next_look_up(clock):
    """A break 9 s into a silence: reopening is bounded by the deadline, not by the look-up
    of the silent kernel due at 10 s."""
    refused = [UpstreamUnavailable("refused") for _ in range(5)]
    kernel = FakeKernel(clock, [status("busy"), Silence(9), ConnectionLost("broke")], *refused,
                        [reply(), status("idle")])
    assert end_of(run(kernel)).status is None  # the kernel's own reply: reopened in time
    assert len(kernel.connects) == 7


def test_an_answer_lost_after_the_deadline_interrupt_says_the_code_was_interrupted(clock):
    kernel = IdleOnceInterrupted(clock, [status("busy")], [])
    _, error = run_until_raises(kernel, ConnectionLost)
    assert "the code was interrupted (its deadline passed" in error.message
    assert "the code finished" not in error.message


def test_a_request_lost_with_a_silent_websocket_is_told_it_may_not_have_run(clock):
    kernel = FakeKernel(clock, [], [], model={"execution_state": "idle"})
    _, error = run_until_raises(kernel, ConnectionLost)
    assert "the request may have been lost (the code did not run)" in error.message
    assert "the code finished" not in error.message


def test_an_answer_the_server_replays_on_the_reopened_websocket_completes_the_execution(clock):
    kernel = FakeKernel(clock, [status("busy")], [stream("late"), reply(), status("idle")],
                        model={"execution_state": "idle"})
    events = run(kernel)
    assert texts(events) == ["late"] and end_of(events).status is None
    assert len(kernel.connects) == 2


@pytest.mark.parametrize("before", [0.03, LIVENESS_SECONDS - 0.03])
def test_a_break_just_before_a_wait_ends_is_still_reopened(clock, before):
    """Just before the deadline (the code is then stopped on the reopened websocket) or just
    before a look-up of a silent kernel: reopening is tried all the same."""
    silence = DEADLINE - before if before < 1 else before
    kernel = FakeKernel(clock, [status("busy"), Silence(silence), ConnectionLost("broke")],
                        [], on_interrupt=interrupted_answers())
    end = end_of(run(kernel))
    assert len(kernel.connects) == 2
    assert end.status == "timeout" and kernel.interrupts and kernel.interrupts[0] >= DEADLINE
    assert "interrupted and keeps its state" in end.error["evalue"]


def test_breaks_are_counted_in_a_row_not_over_the_whole_execution(clock):
    """A long cell on a connection that breaks now and then is reopened each time."""
    scripts = [[status("busy"), stream(f"{i}"), ConnectionLost("broke")] for i in range(5)]
    kernel = FakeKernel(clock, *scripts, [reply(), status("idle")])
    events = run(kernel)
    assert end_of(events).status is None and len(kernel.connects) == 6
    assert texts(events) == ["0", "1", "2", "3", "4"]


def test_a_websocket_that_brought_nothing_before_the_deadline_is_not_reused(clock):
    """Code that never started (the kernel busy elsewhere, or the websocket dead): with not a
    message heard, the websocket may be dead, so it is closed rather than kept warm."""
    kernel = FakeKernel(clock, [], model={"execution_state": "busy", "connections": 1})
    end = end_of(run(kernel))
    assert end.status == "timeout" and "did not start" in end.error["evalue"]
    assert kernel.released == [False]
    kernel = FakeKernel(clock, [Silence(50), status("busy", parent="another client")],
                        model={"execution_state": "busy", "connections": 2})
    clock.now = 0.0
    end_of(run(kernel))
    assert kernel.released == [True]  # it brought the other client's output: alive


def test_connection_that_keeps_breaking_is_given_up_after_the_reconnect_attempts(clock):
    broken = [[ConnectionLost("broke again")] for _ in range(RECONNECT_ATTEMPTS)]
    kernel = FakeKernel(clock, [status("busy"), ConnectionLost("broke")], *broken)
    run_until_raises(kernel, ConnectionLost)
    assert len(kernel.connects) == 1 + RECONNECT_ATTEMPTS
    assert all(channel.sent == [] for channel in kernel.channels[1:])
    assert_all_closed(kernel)


def test_reconnect_timeout_is_capped_by_the_time_left(clock):
    kernel = FakeKernel(clock, [status("busy"), Silence(DEADLINE - 4), ConnectionLost("broke")],
                        [reply(), status("idle")])
    assert end_of(run(kernel)) == End()
    (_, first_timeout), (_, second_timeout) = kernel.connects
    assert first_timeout == CONNECT_TIMEOUT
    assert second_timeout <= 4


def test_recv_after_a_reconnect_does_not_wait_beyond_the_deadline(clock):
    """The time spent in the broken receive and reconnecting counts against the deadline."""
    # The time spent in the broken receive and in reconnecting counts against the deadline.
    kernel = FakeKernel(clock, [status("busy"), Silence(90), ConnectionLost("broke")], [],
                        on_interrupt=interrupted_answers(), connect_seconds=1)
    end = end_of(run(kernel))
    assert end.status == "timeout"
    assert max(recv_ends(kernel)) <= DEADLINE
    assert kernel.interrupts == [pytest.approx(DEADLINE)]


# -- cleanup -----------------------------------------------------------------------------------

def test_channel_is_closed_when_the_consumer_stops_early(clock):
    kernel = FakeKernel(clock, [status("busy"), stream("a"), reply(), status("idle")])
    events = start(kernel)
    assert isinstance(next(events), Sent)
    assert isinstance(next(events), Message)
    events.close()
    assert_all_closed(kernel)


def test_channel_is_closed_when_recv_raises_something_else(clock):
    kernel = FakeKernel(clock, [status("busy"), UpstreamError("not a Jupyter message")])
    run_until_raises(kernel, UpstreamError)
    assert len(kernel.connects) == 1  # only ConnectionLost reconnects
    assert_all_closed(kernel)


def test_failing_first_connect_propagates(clock):
    kernel = FakeKernel(clock, UpstreamUnavailable("server down"))
    with pytest.raises(UpstreamUnavailable):
        run(kernel)
    assert kernel.channels == []


# -- a kernel that died before this code started ---------------------------------------------

def test_code_queued_on_a_dead_kernel_runs_after_the_restart_and_is_answered(clock):
    """A warm websocket can send to a kernel that died while idle: the server restarts it and
    the queued request runs there. That is an ordinary answer, not a crash."""
    kernel = FakeKernel(clock, [Silence(3), status("restarting", parent=None), Silence(1),
                                status("starting", parent=None), status("busy"),
                                stream("ran"), reply(), status("idle")])
    events = run(kernel)
    assert texts(events) == ["ran"]
    assert end_of(events) == End()
    assert kernel.interrupts == [] and kernel.restarts == []


def test_a_death_before_the_code_said_it_started_is_not_called_not_run(clock):
    """The request went to a kernel that died (queued behind the death, or it crashed the
    kernel before its `busy` got out): whether it ran is unknown, and the answer says so."""
    kernel = FakeKernel(clock, [Silence(3), status("restarting", parent=None), Silence(1),
                                status("starting", parent=None), info_reply()])
    end = end_of(run(kernel))
    assert end.status == "crashed"
    assert "may have run in part, or not at all" in end.error["evalue"]
    assert "works again" in end.error["evalue"]


def test_other_clients_output_does_not_extend_the_wait_for_a_dropped_idle(clock):
    """Once the reply is in, only this request's messages keep the wait going."""
    chatter = [stream("background thread of an older cell", parent="older")] * 50
    script = [status("busy"), reply()]
    for line in chatter:
        script += [Silence(0.5), line]
    kernel = FakeKernel(clock, script)
    assert end_of(run(kernel)) == End()
    assert clock.now <= SETTLE + 0.5
