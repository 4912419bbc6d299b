"""The cache of warm kernel websockets: reuse, bounds, and noticing kernels that went away."""

from __future__ import annotations

import os
import time

import pytest

from app.kernels import connections
from app.kernels.connections import ChannelCache
from app.kernels.errors import ConnectionLost


PONG = object()  # the answer to a websocket ping


class FakeChannel:
    """A KernelChannel stand-in with messages already waiting to be read."""

    def __init__(self, kernel_id: str, pending: list | None = None) -> None:
        self.kernel_id = kernel_id
        self.waiting = list(pending or [])
        self.closed = False
        self.pongs = 0

    def pending(self) -> bool:
        return bool(self.waiting)

    def recv(self, timeout: float):
        item = self.waiting.pop(0)
        if isinstance(item, BaseException):
            raise item
        if item is PONG:  # the real channel's recv returns None for one
            self.pongs += 1
            return None
        return item, 100

    def close(self) -> None:
        self.closed = True


def broadcast(msg_type: str, content: dict, parent: str | None = "someone-else") -> dict:
    return {"header": {"msg_type": msg_type}, "msg_type": msg_type, "channel": "iopub",
            "parent_header": {"msg_id": parent} if parent else {}, "content": content}


OTHER_OUTPUT = broadcast("stream", {"name": "stdout", "text": "another client's output"})


def test_a_channel_given_back_is_taken_again():
    cache = ChannelCache(capacity=4)
    channel = FakeChannel("k1")
    cache.give(channel)
    assert cache.take("k1") is channel
    assert cache.take("k1") is None  # owned by the taker now, not shared


def test_what_piled_up_on_an_idle_channel_is_read_before_it_is_handed_out():
    cache = ChannelCache(capacity=4)
    channel = FakeChannel("k1")
    cache.give(channel)
    channel.waiting = [OTHER_OUTPUT, OTHER_OUTPUT]
    assert cache.take("k1") is channel
    assert channel.waiting == []


@pytest.mark.parametrize("gone", [
    broadcast("shutdown_reply", {"status": "ok", "restart": False}),
    broadcast("status", {"execution_state": "dead"}, parent=None),
    ConnectionLost("closed by the server"),
])
def test_a_channel_whose_kernel_went_away_is_closed_not_handed_out(gone):
    cache = ChannelCache(capacity=4)
    channel = FakeChannel("k1")
    cache.give(channel)
    channel.waiting = [OTHER_OUTPUT, gone]
    assert cache.take("k1") is None
    assert channel.closed


def test_a_restart_does_not_spoil_the_channel():
    cache = ChannelCache(capacity=4)
    channel = FakeChannel("k1", [broadcast("status", {"execution_state": "restarting"},
                                           parent=None)])
    cache.give(channel)
    assert cache.take("k1") is channel


def test_least_recently_used_channels_are_closed_past_the_capacity():
    cache = ChannelCache(capacity=2)
    channels = [FakeChannel(f"k{i}") for i in range(3)]
    for channel in channels:
        cache.give(channel)
    assert channels[0].closed and not channels[1].closed and not channels[2].closed
    assert len(cache) == 2


def test_one_idle_channel_per_kernel():
    cache = ChannelCache(capacity=4)
    first, second = FakeChannel("k1"), FakeChannel("k1")
    cache.give(first)
    cache.give(second)
    assert first.closed and cache.take("k1") is second


def test_zero_capacity_closes_every_channel_given_back():
    cache = ChannelCache(capacity=0)
    channel = FakeChannel("k1")
    cache.give(channel)
    assert channel.closed and cache.take("k1") is None


def test_sweep_closes_long_idle_and_dead_channels_and_keeps_the_rest():
    now = [0.0]
    cache = ChannelCache(capacity=4, clock=lambda: now[0])
    old, dead, fine = FakeChannel("old"), FakeChannel("dead"), FakeChannel("fine")
    cache.give(old)
    now[0] = connections.IDLE_SECONDS - 10
    cache.give(dead)
    cache.give(fine)
    dead.waiting = [broadcast("shutdown_reply", {"restart": False})]
    fine.waiting = [OTHER_OUTPUT]
    now[0] = connections.IDLE_SECONDS + 1
    cache.sweep()
    assert old.closed and dead.closed and not fine.closed
    assert fine.waiting == []  # read, so that nothing piles up on the server
    assert cache.take("fine") is fine


def test_sweep_closes_a_channel_it_failed_to_read():
    cache = ChannelCache(capacity=4)
    broken = FakeChannel("broken", pending=[RuntimeError("something unforeseen")])
    cache.give(broken)
    with pytest.raises(RuntimeError):
        cache.sweep()
    assert broken.closed and cache.take("broken") is None


def test_sweep_closes_an_idle_channel_whose_kernel_another_process_uses():
    """The server copies each iopub message to every connection of a kernel: a worker that
    no longer uses a kernel must not keep a second connection to it.
    """
    now = [0.0]
    elsewhere = {"moved", "busy-here"}
    cache = ChannelCache(capacity=4, clock=lambda: now[0],
                         used_elsewhere=lambda kernel_id: kernel_id in elsewhere)
    moved, ours = FakeChannel("moved"), FakeChannel("ours")
    cache.give(moved)
    cache.give(ours)
    now[0] = connections.SWEEP_SECONDS / 2
    recent = FakeChannel("busy-here")
    cache.give(recent)  # just used here: not idle for a sweep yet
    now[0] = connections.SWEEP_SECONDS + 0.1
    cache.sweep()
    assert moved.closed
    assert not ours.closed and not recent.closed
    assert cache.take("ours") is ours and cache.take("busy-here") is recent


def test_kernel_lock_records_its_last_user(tmp_path, monkeypatch):
    from app.kernels.locks import KernelLocks

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    locks = KernelLocks("http://127.0.0.1:1")
    assert locks.last_user("k") is None
    with locks.hold("k", deadline=time.monotonic() + 10) as acquired:
        assert acquired
    assert locks.last_user("k") == os.getpid()


def test_forget_and_close():
    cache = ChannelCache(capacity=4)
    a, b = FakeChannel("a"), FakeChannel("b")
    cache.give(a)
    cache.give(b)
    cache.forget("a")
    assert a.closed and not b.closed
    cache.close()
    assert b.closed
    late = FakeChannel("c")
    cache.give(late)
    assert late.closed


def test_a_late_answer_to_a_ping_does_not_hide_what_follows_it():
    cache = ChannelCache(capacity=4)
    channel = FakeChannel("k1")
    cache.give(channel)
    channel.waiting = [PONG, broadcast("status", {"execution_state": "dead"}, parent=None)]
    assert cache.take("k1") is None  # the kernel's death behind the pong was read
    assert channel.closed
