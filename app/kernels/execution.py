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
  restarting`/`dead`), after waiting a bounded time for the server to bring it back. A kernel
  that goes silent is looked up on the server every `LIVENESS_SECONDS`: one shut down while it
  was dead or hung says nothing on its websocket, which the server leaves open.
- once the `execute_reply` (or the `idle`) is in, the other half is awaited only while messages
  keep coming: the server can drop an `idle`, e.g. right after a restart.
- a websocket that breaks is reopened with the same session id, so that the server replays what
  it buffered meanwhile; the request itself is never sent twice. Messages that were on the wire
  when it broke are gone: the kernel's message numbers tell whether any may be (`output_lost`).
  A websocket that went silent while the server says the kernel is idle (a network that dropped
  it without a word) is reopened the same way, unless it answers a ping (the server's view can
  be wrong).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from app.kernels import protocol
from app.kernels.channel import KernelChannel
from app.kernels.errors import ConnectionLost, KernelError, KernelNotFound, UpstreamTimeout
from app.logs import StructuredLogger
from app.metrics import metrics

INTERRUPT_GRACE_SECONDS = 5.0
SETTLE_SECONDS = 2.0  # silence after the reply (or idle) that ends the wait for the other half
RECONNECT_ATTEMPTS = 3  # websockets reopened in a row with no message in between, at most
RECONNECT_PAUSES = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2)  # backoff between tries to reopen one
RECONNECT_WINDOW = 2.0  # reopening gets this long at least, even close to the deadline
MIN_CRASH_WAIT = 5.0  # a crash near the deadline still gets this long to show the restart
LIVENESS_SECONDS = 10.0  # silence while code runs after which the server is asked about the kernel
LOOKUP_SECONDS = 5.0  # longest wait for the server's answer to that question
PING_SECONDS = 2.0  # a websocket that does not answer a ping within this is taken for dead
CANCEL_POLL_SECONDS = 0.5  # how often `cancelled` is asked while the kernel is silent
PROBE_PAUSES = (0.5, 1.0, 2.0)  # between kernel_info requests to a kernel being restarted
SEQUENCE_SLACK = 4  # how far out of order a kernel's threads send its numbered messages
MAX_GAP = 1024  # message numbers awaited after a break, at most (a wider gap is a loss)

log = StructuredLogger(__name__)


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

    def describe(self) -> dict[str, Any]:
        """The server's model of the kernel (`execution_state`, `connections`, ...), within a
        few seconds (`KernelNotFound` if the server has no such kernel)."""


@dataclass(frozen=True)
class Message:
    """A message of this execution, in arrival order; `size` is its encoded length."""

    message: dict[str, Any]
    size: int


@dataclass(frozen=True)
class Sent:
    """The request is on its way to the kernel (always the first event)."""


@dataclass(frozen=True)
class End:
    """The execution is over. `status` is None when the kernel's own reply says how it went;
    `output_lost` says that messages may have been lost with a broken connection;
    `kernel_gone` that the kernel was shut down or is gone from the server.
    """

    status: str | None = None
    error: dict[str, Any] | None = None
    output_lost: bool = False
    kernel_gone: bool = False


Event = Sent | Message | End


def run_execution(kernel: KernelControl, code: str, deadline: float, *, timeout: float,
                  crash_wait: float, connect_timeout: float, silent: bool = False,
                  grace: float = INTERRUPT_GRACE_SECONDS, settle: float = SETTLE_SECONDS,
                  cancelled: Callable[[], bool] | None = None,
                  clock: Callable[[], float] = time.monotonic) -> Iterator[Event]:
    """Runs `code` on the kernel and yields its events; see the module docstring.

    `cancelled`, if given, is asked at least every `CANCEL_POLL_SECONDS` while the code runs;
    once it says True the code is stopped as at a deadline, and the execution ends `cancelled`.
    """
    run = _Run(kernel, deadline, connect_timeout, settle, clock, cancelled)
    try:
        yield from run.execute(code, timeout=timeout, crash_wait=crash_wait, grace=grace,
                               silent=silent)
    finally:
        run.close()


class _Run:
    """The state of one execution: its channel, request and what has been seen of it."""

    def __init__(self, kernel: KernelControl, deadline: float, connect_timeout: float,
                 settle: float, clock: Callable[[], float],
                 cancelled: Callable[[], bool] | None = None) -> None:
        self.kernel = kernel
        self.cancelled = cancelled
        self.was_cancelled = False
        self.deadline = deadline
        self.connect_timeout = connect_timeout
        self.settle = settle
        self.clock = clock
        self.channel: KernelChannel | None = None
        self.session_id = ""
        self.msg_id = ""
        self.reply = self.idle = self.started = self.stdin_refused = False
        self.last_own = 0.0  # when the latest message of this request arrived
        self.last_heard = 0.0  # when anything last arrived (or the websocket was reopened)
        self.reconnects = 0
        self.breaks = 0  # websockets broken since the last message of this request arrived
        self.heard = False  # something arrived since the request was sent
        self.seen_state: str | None = None  # the kernel's state as its websocket last told it
        self.interrupted = False  # the proxy interrupted the code (deadline, cancellation)
        self.suspect = False  # the server says idle, the websocket did not: it may be dead
        self.gaps = _Gaps()
        self.frames_dropped = False  # a frame that was no Jupyter message was skipped
        self.published = False  # a message of this request came on iopub
        self.iopub_lost = False  # the reply came, and nothing of this request on iopub
        self.reusable = False  # set once the execution ended with the channel in a known state
        self.death: str | None = None
        self.restart_asked = False  # the death was a restart someone asked for
        self.dying_sender: str | None = None  # the process that announced its own shutdown
        self.new_process_seen = False  # a parentless `starting`/`idle` came while restarting

    @property
    def complete(self) -> bool:
        return self.reply and self.idle

    @property
    def output_lost(self) -> bool:
        """Messages of this request went missing with a broken websocket, or a frame that was
        no Jupyter message was skipped (or may have)."""
        return self.gaps.lost or self.frames_dropped or self.iopub_lost

    def execute(self, code: str, *, timeout: float, crash_wait: float, grace: float,
                silent: bool) -> Iterator[Event]:
        deadline_first = self.deadline - self.clock() < self.connect_timeout
        try:
            self.channel = self.kernel.connect(None, self._time_left(self.connect_timeout))
        except UpstreamTimeout:
            if not deadline_first:
                raise  # the server was slow, whatever the code's deadline
            metrics().upstream_errors.labels("upstream_timeout").inc()
            log.warning("upstream failure", error="upstream_timeout",  # as app.errors logs them
                        reason="the kernel websocket did not open within the code's deadline")
            yield Sent()  # nothing was: the code's own deadline cut the handshake short
            yield End("timeout", not_sent_error(
                f"the Jupyter server did not open the kernel websocket within the code's "
                f"{timeout:g} s deadline"))
            return
        if self.clock() >= self.deadline:  # the deadline passed while connecting
            self.reusable = True  # nothing was sent: the channel is as it was
            yield Sent()
            yield End("timeout", not_sent_error(
                f"the code's {timeout:g} s deadline passed before it could be sent"))
            return
        self.session_id = self.channel.session_id
        request = protocol.execute_request(code, self.session_id, silent)
        self.msg_id = request["header"]["msg_id"]
        if self.cancelled is not None and self.cancelled():
            self.reusable = True  # nothing was sent: the channel is as it was
            yield Sent()
            yield End("cancelled", _cancel_error("not_sent"))
            return
        self.channel.send(request)
        self.last_heard = self.clock()  # silence is counted from here
        yield Sent()
        while True:
            yield from self._collect(self.deadline)
            if self.death is None:
                break
            now = self.clock()
            crash_until = now + min(crash_wait, max(self.deadline - now, MIN_CRASH_WAIT))
            ran = self.started
            state = yield from self._await_restart(crash_until)
            if ran or state != "restarted" or not self.started:
                yield End("crashed", _crash_error(state, crash_wait, ran, self.restart_asked),
                          self.output_lost and ran,  # code that did not run lost nothing
                          kernel_gone=state in ("shutdown", "gone"))
                return
            # The kernel died before this code started, and the restarted kernel runs it.
            self.death = None
        if not self.complete:
            outcome = yield from self._stop_overrun(grace)
            if self.death is None:
                # (A channel that brought nothing since the request went may be dead.)
                self.reusable = outcome == "interrupted" or (outcome == "not_started"
                                                             and self.heard)
                lost = self.output_lost and outcome != "not_started"
                if self.was_cancelled:
                    yield End("cancelled", _cancel_error(outcome), lost)
                    return
                yield End("timeout", self._timeout_error(timeout, outcome, grace), lost)
                return
            yield End("crashed", _crash_error(self.death, crash_wait, True, self.restart_asked),
                      self.output_lost, kernel_gone=self.death in ("shutdown", "gone"))
        elif self.stdin_refused:
            yield End("error", {"ename": "StdinNotImplementedError",
                                "evalue": "the code asked for input, but this proxy offers no "
                                          "stdin", "traceback": []}, self.output_lost)
        else:
            self.reusable = True
            yield End(output_lost=self.output_lost)

    def _stop_overrun(self, grace: float) -> Generator[Event, None, str]:
        """Stops code that overran its deadline, keeping what it still sends.

        Returns `interrupted`, `restarted`, `not_started` or `failed`. Code that never started
        (the kernel was busy with another client's code) is not interrupted: that would stop
        the other client's code instead. A kernel is restarted only if it is really busy: one
        the server says is idle finished the code, and its answer was lost with a connection,
        unless the websocket answers a ping without that answer coming (the server is wrong).
        """
        if not self.started and self.was_cancelled:
            # Sent, but the kernel has not said it started: if it does soon, stop it too.
            yield from self._collect(self.clock() + min(grace, self.settle), until_started=True)
        if not self.started:
            return "not_started"
        if _attempt(self.kernel.interrupt):
            self.interrupted = True
            yield from self._collect(self.clock() + grace)
            if self.complete or self.death:
                return "interrupted"
        state = self._ask_server(answer_may_be_lost=self.reconnects > 0)
        if self.death:
            return "failed"  # gone: there is nothing left to stop
        if state == "idle":
            # Idle on the server: the code finished and its answer was lost with a websocket
            # that died without a sound, unless that websocket lives (a ping says): its answer
            # would have come, so the code runs on, and the server's view is wrong (a
            # gateway's can stay `idle` after a restart) or passing (an interrupt sent as a
            # message makes the kernel say busy, then idle, on the control channel).
            alive = yield from self._answers_ping()
            if self.death:
                return "failed"
            if self.reply or self.idle:  # the code stopped: the rest of its answer is near
                yield from self._collect(self.clock() + self.settle)
                return "interrupted"
            if not alive:
                raise self._answer_lost()
        return "restarted" if _attempt(self.kernel.restart) else "failed"

    def _collect(self, until: float, until_started: bool = False) -> Iterator[Event]:
        """Yields this request's messages until it completes, the kernel dies or `until`.

        Once the reply (or the idle) is in, the code has finished: `settle` seconds without a
        message of this request then end the wait for the other half (never past `until`).
        Before that, silence is checked against the server's view of the kernel every
        `LIVENESS_SECONDS` (every `settle` after a reconnect, when the answer may be lost).
        """
        while not self.complete and not self.death:
            if until_started and self.started:
                return
            if self.cancelled is not None and self.cancelled():
                self.cancelled = None  # asked once: what follows is the stop itself
                self.was_cancelled = True
                return
            half_in = self.reply or self.idle
            limit = min(until, self.last_own + self.settle) if half_in else until
            if not half_in:
                silence = self.settle if self.reconnects or self.suspect else LIVENESS_SECONDS
                limit = min(limit, self.last_heard + silence)
            if self.clock() >= limit:
                if half_in:
                    self._settle()
                    continue
                if self.clock() >= until:
                    return
                state = self._ask_server(answer_may_be_lost=self.reconnects > 0)
                if state == "idle" and not self.death and self.seen_state != "idle":
                    # Idle on the server, yet the websocket did not say so: it may have died
                    # without a sound (a NAT or firewall dropped it). It gets `settle` more
                    # (the answer may be on its way), then, unless it answers a ping (the
                    # server's view may be wrong), it is reopened as after a break.
                    if not self.suspect:
                        self.suspect = True
                    else:  # the second time in a row: does the websocket still answer?
                        self.suspect = False
                        if not (yield from self._answers_ping()):
                            self._broke(until)
                self.last_heard = self.clock()
                continue
            wait_until = limit
            if self.cancelled is not None:
                wait_until = min(limit, self.clock() + CANCEL_POLL_SECONDS)
            received = self._recv(wait_until, reconnect_until=until)
            if received is not None:
                yield from self._take(*received)

    def _take(self, message: dict[str, Any], size: int) -> Iterator[Event]:
        """Takes in a message that arrived: this request's is yielded, another may be the
        kernel's death."""
        self.last_heard = self.clock()
        if protocol.parent_id(message) == self.msg_id:
            self._note(message)
            yield Message(message, size)
        else:
            self.death = protocol.kernel_death_state(message)
            if self.death and message.get("msg_type") == "shutdown_reply":
                self.restart_asked |= self.death == "restarting"
                numbered = protocol.sequence_number(message)
                self.dying_sender = numbered[0] if numbered else None

    def _answers_ping(self) -> Generator[Event, None, bool]:
        """Whether the websocket lives: it answers a ping within `PING_SECONDS`. What arrives
        before the answer is taken in as usual: the server sends the answer after every frame
        it had sent, so a request's reply or idle on its way has been read by then. A break is
        no answer."""
        channel = self.channel
        assert channel is not None
        pongs = channel.pongs
        until = self.clock() + PING_SECONDS
        try:
            channel.ping()
            while channel.pongs == pongs:
                if self.clock() >= until:
                    return False
                received = self._recv(until, reopen=False)
                if received is not None:
                    yield from self._take(*received)
        except ConnectionLost:
            return False
        return True

    def _settle(self) -> None:
        """Silence after half of the answer: the other half is not coming."""
        if self.reply:
            self.idle = True  # the server dropped the idle: the reply is the answer
            # Not even `busy` came: the iopub stream lost this request's messages (output
            # published before the server's subscription to a new process was up).
            self.iopub_lost = not self.published
            return
        raise ConnectionLost(
            "the kernel finished, but its reply was lost with the connection to the Jupyter "
            "server; the output may be incomplete",
            kernel_id=self.channel.kernel_id if self.channel else None)

    def _ask_server(self, answer_may_be_lost: bool) -> str | None:
        """Looks the silent kernel up on the server and returns its `execution_state` (None if
        the server could not say). Not there: it is `gone` (`death`). Idle although this
        request is not complete, when `answer_may_be_lost`: its answer went with a broken
        connection (raises ConnectionLost, saying what became of the code as far as known).
        """
        try:
            state = self.kernel.describe().get("execution_state")
        except KernelNotFound:
            self.death = "gone"
            return None
        except KernelError:
            return None
        if answer_may_be_lost and state == "idle":
            raise self._answer_lost()
        return state

    def _answer_lost(self) -> ConnectionLost:
        """The error of an execution whose kernel is idle on the server while its answer did
        not come: it went with a broken connection."""
        if self.interrupted:
            what = ("the code was interrupted (its deadline passed, or its client went away), "
                    "but its answer was lost")
        elif self.started:
            what = "the code finished, but its answer was lost"
        else:
            what = ("nothing of this request came back: the request may have been lost (the "
                    "code did not run), or the code ran and its answer was lost")
        return ConnectionLost(
            f"{what} with the connection to the Jupyter server (the kernel is idle and keeps "
            "its state)", kernel_id=self.channel.kernel_id if self.channel else None)

    def _note(self, message: dict[str, Any]) -> None:
        self.started = True
        self.last_own = self.clock()
        msg_type = message.get("msg_type")
        self.published |= message.get("channel") == "iopub"
        if msg_type == "execute_reply":
            self.reply = True
        elif protocol.is_idle(message):
            self.idle = True
        elif msg_type == "input_request" and not self.stdin_refused:
            # allow_stdin is false, so a kernel should never ask; one that does is stopped.
            self.stdin_refused = True
            _attempt(self.kernel.interrupt)

    def _recv(self, until: float, reconnect_until: float | None = None, reopen: bool = True
              ) -> tuple[dict[str, Any], int] | None:
        """The next message before `until`, or None (also right after a broken websocket was
        reopened, so that the caller reconsiders how long to wait). A broken websocket may be
        reopened until `reconnect_until` (default `until`), unless not `reopen` (raises
        `ConnectionLost`).
        """
        reconnect_until = until if reconnect_until is None else reconnect_until
        dropped = self.channel.dropped
        try:
            received = self.channel.recv(until - self.clock())
        except ConnectionLost:
            if self.breaks >= RECONNECT_ATTEMPTS or not reopen:
                raise
            self._broke(reconnect_until)
            return None
        self.frames_dropped |= self.channel.dropped > dropped
        if received is not None:
            message = received[0]
            own = protocol.parent_id(message) == self.msg_id
            self.breaks = 0 if own else self.breaks
            self.heard, self.suspect = True, False
            if message.get("msg_type") == "status":
                self.seen_state = (message.get("content") or {}).get("execution_state")
            self.gaps.note(message, own=own)
        return received

    def _broke(self, until: float) -> None:
        """The websocket broke (or is taken for dead): reopens it. Trying gets at least
        `RECONNECT_WINDOW`, so that a break just before the deadline still leaves a websocket
        to stop the code on, rather than code running on unseen."""
        self.reconnects += 1
        self.breaks += 1
        self.gaps.broke()
        self._reconnect(max(until, self.clock() + RECONNECT_WINDOW))

    def _reconnect(self, until: float) -> None:
        """Reopens the websocket with the same session id, retrying with backoff until
        `until`: the server replays what it buffered meanwhile (only if ours was the kernel's
        only connection; `_Gaps` finds out whether anything is missing).
        """
        self.channel.close()
        error: KernelError | None = None
        for pause in RECONNECT_PAUSES:
            time.sleep(min(pause, max(until - self.clock(), 0)))
            if self.clock() >= until:
                break
            try:
                self.channel = self.kernel.connect(
                    self.session_id, max(min(self.connect_timeout, until - self.clock()), 0.1))
            except KernelNotFound:
                self.death = "gone"  # the kernel went away with the connection
                return
            except KernelError as err:
                error = err
                continue
            self.last_heard = self.clock()
            return
        raise ConnectionLost("the connection to the Jupyter server broke during the "
                             "execution and could not be reopened") from error

    def _await_restart(self, until: float) -> Generator[Event, None, str]:
        """Waits for the server to bring a dead kernel back, yielding this request's messages
        meanwhile (a kernel that died before running the code runs it once restarted).

        Returns `restarted`, `dead`, `shutdown`, `gone` (the server no longer has the kernel),
        or `restarting` if the server said none of these before `until`. A restarted kernel
        counts as back once it runs this code, or once the new process answers a
        `kernel_info_request`. One is sent at once and then after each of `PROBE_PAUSES` (the
        last repeating): the server holds them until the kernel is back, whereas the new
        kernel's `starting` status is easily missed (it can go out before the server's
        subscription reaches the new process). From the second on, each probe also looks the
        kernel up on the server.
        """
        if self.death in ("dead", "shutdown", "gone"):
            return self.death
        ran_before = self.started
        probes: set[str] = set()
        pauses = iter(PROBE_PAUSES)
        pause = 0.0
        next_probe = self.clock()
        self.new_process_seen = False
        while self.clock() < until:
            if self.clock() >= next_probe:
                if probes:  # still not back: is it still there?
                    self._ask_server(answer_may_be_lost=False)
                    if self.death == "gone":
                        return "gone"
                probes.add(self._probe())
                pause = next(pauses, pause)
                next_probe = self.clock() + pause
            received = self._recv(min(until, next_probe), reconnect_until=until)
            if self.death == "gone":
                return "gone"
            if received is None:
                continue
            message, size = received
            parent = protocol.parent_id(message)
            if parent == self.msg_id:
                self._note(message)
                yield Message(message, size)
                if not ran_before:
                    return "restarted"  # back, and running this code
                continue
            if message.get("msg_type") == "kernel_info_reply" and parent in probes \
                    and self._from_new_process(message):
                return "restarted"
            if message.get("msg_type") == "status" and not parent:
                state = message["content"].get("execution_state")
                if state == "dead":
                    return "dead"
                self.new_process_seen |= state in ("starting", "idle")
        return "restarting"

    def _from_new_process(self, message: dict[str, Any]) -> bool:
        """Whether a message comes from the restarted kernel, not the process that died (which
        can still answer while it shuts down after a requested restart).
        """
        old = {self.gaps.sender, self.dying_sender} - {None}
        numbered = protocol.sequence_number(message)
        if numbered is not None and old:
            return numbered[0] not in old
        # Without numbers: after a crash the old process is gone; after a requested restart,
        # only a parentless `starting`/`idle` tells that the new one is up.
        return not self.restart_asked or self.new_process_seen

    def _probe(self) -> str:
        """Sends a `kernel_info_request` and returns its msg_id (a broken websocket is left to
        the next receive, which reopens it).
        """
        request = protocol.kernel_info_request(self.session_id)
        try:
            self.channel.send(request)
        except ConnectionLost:
            pass
        return request["header"]["msg_id"]

    def _time_left(self, cap: float) -> float:
        return max(min(cap, self.deadline - self.clock()), 0.1)

    def _timeout_error(self, timeout: float, outcome: str, grace: float) -> dict[str, Any]:
        if outcome == "not_started":
            return {"ename": "ExecutionTimeout",
                    "evalue": f"the kernel did not start this code within its {timeout:g} s "
                              "deadline (it may have been busy with code sent by another "
                              "client, the deadline shorter than the kernel takes to start "
                              "code, or the request lost with a connection); it was not "
                              "interrupted, and the kernel may still run the code",
                    "traceback": []}
        what = {
            "interrupted": "the kernel was interrupted and keeps its state",
            "restarted": f"the kernel did not stop on an interrupt within {grace:g} s and was "
                         "restarted: its state is lost",
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


class _Gaps:
    """Tells whether messages of this request may have gone missing with a broken websocket.

    After a break the server replays what it buffered once it saw the break, not what was on
    the wire then, and nothing at all if other connections to the kernel were open (they got
    it). The kernel numbers what it sends (`sequence_number`), so the first number that arrives
    after a reconnect bounds what went missing: every number between it and the last ones seen
    before the break must still arrive (the kernel's threads may send a few out of order). A
    kernel also spends numbers on messages that reach only other clients (replies to their
    control requests) or no one, so a gap says that output *may* be missing: the answer is
    marked `truncated`. Not checked: output of forked subprocesses (their own pid). Kernels
    that do not number their messages: a break always counts as a possible loss.
    """

    def __init__(self) -> None:
        self.sender: str | None = None  # the kernel process running the request
        self.own_seen = False
        self.first = -1  # the number of the request's first message
        self.highest = -1  # the highest number of `sender` seen
        self.recent: set[int] = set()  # numbers seen within SEQUENCE_SLACK of `highest`
        self.broken = False
        self.unbounded = False  # a break that no later number of `sender` has bounded yet
        self.missing: set[int] = set()  # numbers that went missing around a break, awaited
        self.unknown = False  # a break that numbers cannot account for

    @property
    def lost(self) -> bool:
        return self.broken and (self.unknown or self.unbounded or bool(self.missing))

    def broke(self) -> None:
        self.broken = True
        if self.sender is None:
            # Nothing numbered of the request yet: fine if its first message (`busy`) comes.
            self.unknown |= self.own_seen
            self.unbounded = True
            return
        if not self.unbounded:
            # Numbers just below the highest that have not come may have been on the wire.
            self.missing.update(n for n in range(max(self.first, self.highest - SEQUENCE_SLACK),
                                                 self.highest) if n not in self.recent)
        self.unbounded = True

    def note(self, message: dict[str, Any], own: bool) -> None:
        numbered = protocol.sequence_number(message)
        self.own_seen |= own
        if numbered is None:
            self.unknown |= own and self.broken
            return
        sender, number = numbered
        if self.sender is None:
            if not own:
                return
            self.sender, self.first = sender, number
            if self.unbounded:  # the break came before anything of this request
                self.unbounded = False
                self.unknown |= not (message.get("msg_type") == "status" and
                                     message["content"].get("execution_state") == "busy")
            self.highest = number - 1
        if sender != self.sender:
            return
        if self.unbounded and number > self.highest:
            self.unbounded = False
            if number - self.highest - 1 > MAX_GAP:
                self.unknown = True
            else:
                self.missing.update(range(self.highest + 1, number))
        self.missing.discard(number)
        if number > self.highest:
            self.highest = number
            self.recent = {n for n in self.recent if n >= number - SEQUENCE_SLACK}
        self.recent.add(number)


def _attempt(action: Callable[[], None]) -> bool:
    try:
        action()
    except KernelError:
        return False
    return True


def not_sent_error(why: str) -> dict[str, Any]:
    """The error of an execution whose code was never sent to the kernel."""
    return {"ename": "ExecutionTimeout", "evalue": f"{why}; this code did not run",
            "traceback": []}


def _cancel_error(outcome: str) -> dict[str, Any]:
    what = {
        "interrupted": "the kernel was interrupted and keeps its state",
        "restarted": "the kernel did not stop on an interrupt and was restarted: its state is "
                     "lost",
        "not_sent": "the code was not sent to the kernel",
        "not_started": "the kernel had not started the code (it may have been busy with code "
                       "sent by another client) and may still run it",
        "failed": "the kernel could not be interrupted or restarted and may still be running it",
    }[outcome]
    return {"ename": "ExecutionCancelled",
            "evalue": f"the execution was cancelled (its client went away); {what}",
            "traceback": []}


def _crash_error(state: str, crash_wait: float, ran: bool,
                 restart_asked: bool = False) -> dict[str, Any]:
    if restart_asked and state == "restarted":
        what = "while running this code" if ran else \
            "before it said it started this code (it may have run in part, or not at all)"
        return {"ename": "KernelRestarted",
                "evalue": "the kernel was restarted on request (POST /restart_kernel, or another "
                          f"client of the Jupyter server) {what}: its state is lost",
                "traceback": []}
    if state == "shutdown":
        return {"ename": "KernelDied",
                "evalue": "the kernel was shut down while running this code: it is gone",
                "traceback": []}
    if state == "gone":
        return {"ename": "KernelDied",
                "evalue": "the kernel is gone from the Jupyter server while running this code "
                          "(shut down, or dead and not restarted): its state is lost",
                "traceback": []}
    after = {
        "restarted": "the Jupyter server restarted it: the same kernel id works again, with "
                     "empty state",
        "dead": "the Jupyter server could not restart it: the kernel is gone",
    }.get(state, f"the Jupyter server was still restarting it after {crash_wait:g} s")
    if ran:
        what = "the kernel died while running this code and its state is lost"
    else:
        # Its `busy` never came: the code was queued behind a death, or crashed the kernel at
        # once, before the kernel's output thread sent anything.
        what = ("the kernel died before it said it started this code (it may have run in part, "
                "or not at all: code that crashes the kernel at once looks the same); its state "
                "is lost")
    return {"ename": "KernelDied", "evalue": f"{what}; {after}", "traceback": []}
