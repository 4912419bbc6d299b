"""Kernel websockets against real peers: handshake failures become the right errors, and the
encoding (v1, or legacy JSON) is the one the server chose."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import websocket

from app import JupyterClient, KernelManager, Settings
from app.embedded import EmbeddedJupyterServer
from app.kernels import (
    KernelNotFound,
    UpstreamAuthError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.kernels import protocol
from app.kernels.channel import KernelChannel


def kernel_info(channel: KernelChannel) -> tuple[dict, int]:
    """Asks the kernel for its info on `channel`; the reply and its size in bytes."""
    request = protocol.kernel_info_request(channel.session_id)
    channel.send(request)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        received = channel.recv(deadline - time.monotonic())
        if received and protocol.parent_id(received[0]) == request["header"]["msg_id"] \
                and received[0]["msg_type"] == "kernel_info_reply":
            return received
    pytest.fail("no kernel_info_reply")


def test_channel_exchanges_messages_with_a_real_kernel(settings, shared_kernel):
    with JupyterClient(settings) as client, client.open_channel(shared_kernel) as channel:
        reply, size = kernel_info(channel)
        assert reply["content"]["status"] == "ok" and size > 0


def test_recv_times_out_with_none_and_channel_stays_usable(settings, shared_kernel):
    with JupyterClient(settings) as client, client.open_channel(shared_kernel) as channel:
        while channel.recv(0.5) is not None:  # drain the server's greeting
            pass
        started = time.monotonic()
        assert channel.recv(0.3) is None
        assert time.monotonic() - started < 2
        channel.send(protocol.kernel_info_request(channel.session_id))
        assert channel.recv(10) is not None


def test_the_server_answers_a_ping_on_a_live_websocket(settings, shared_kernel):
    """What the execution loop asks when the server says idle and the websocket did not."""
    with JupyterClient(settings) as client, client.open_channel(shared_kernel) as channel:
        channel.ping()
        deadline = time.monotonic() + 10
        while channel.pongs == 0 and time.monotonic() < deadline:
            channel.recv(deadline - time.monotonic())  # (the server's greeting may come first)
        assert channel.pongs == 1


def test_unknown_kernel_is_not_found_and_hides_the_servers_page(settings):
    kernel_id = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"
    with JupyterClient(settings) as client, pytest.raises(KernelNotFound) as caught:
        client.open_channel(kernel_id)
    assert settings.token not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_wrong_token_is_an_auth_error(settings, shared_kernel):
    with JupyterClient(settings.replace(token="wrong")) as client, \
            pytest.raises(UpstreamAuthError):
        client.open_channel(shared_kernel)


def test_closed_port_is_unavailable(settings, closed_port_url):
    with JupyterClient(settings.replace(server_url=closed_port_url)) as client, \
            pytest.raises(UpstreamUnavailable):
        client.open_channel("6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b")


def test_silent_server_times_out(settings, silent_upstream):
    with JupyterClient(settings.replace(server_url=silent_upstream)) as client:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            client.open_channel("6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b", timeout=0.5)
        assert time.monotonic() - started < 5


def test_executions_reuse_one_warm_websocket(settings, manager):
    kernel_id = manager.start_kernel()["id"]
    try:
        for _ in range(5):
            assert manager.execute_code(kernel_id, "1")["status"] == "ok"
        # The server counts open websockets per kernel: ours is kept, and only one.
        assert manager.client.get_kernel(kernel_id)["connections"] == 1
    finally:
        manager.shutdown_kernel(kernel_id)


def test_warm_websocket_notices_its_kernel_was_shut_down_elsewhere(settings, manager):
    from app.kernels import KernelNotFound

    kernel_id = manager.start_kernel()["id"]
    manager.execute_code(kernel_id, "1")
    manager.client.shutdown_kernel(kernel_id)  # as another client would, around the proxy
    started = time.monotonic()
    with pytest.raises(KernelNotFound):
        manager.execute_code(kernel_id, "1", timeout=30)
    assert time.monotonic() - started < 5


def test_pings_do_not_stretch_a_receive_past_its_timeout():
    """A server that pings without end must not keep recv() waiting: each ping restarts the
    socket's own timeout, so the channel keeps its own deadline."""

    def ping_forever(conn: socket.socket, stop: threading.Event) -> None:
        while not stop.wait(0.05):
            conn.sendall(b"\x89\x00")  # an empty ping frame

    with fake_websocket_server(then=ping_forever) as url:
        channel = KernelChannel.open(url, "k", [], timeout=5)
        try:
            started = time.monotonic()
            assert channel.recv(0.5) is None
            assert time.monotonic() - started < 2
        finally:
            channel.close()


# -- the v1 websocket protocol ---------------------------------------------------------------

def test_channel_speaks_v1_to_a_server_that_offers_it(settings, shared_kernel, manager):
    # All three upstreams do (Enterprise Gateway 3.3 through its jupyter_server 1.24).
    with JupyterClient(settings) as client, client.open_channel(shared_kernel) as channel:
        assert channel.v1
    # Non-ASCII text in every part of the messages (v1 frames carry raw UTF-8 JSON).
    answer = manager.execute_code(shared_kernel, "print('héllo ✓'); x = '日本'; x")
    assert answer["status"] == "ok", answer
    assert answer["stdout"] == "héllo ✓\n"
    assert answer["outputs"][0]["data"]["text/plain"] == "'日本'"


def test_bytes_that_are_not_utf8_come_through_replaced(jupyter_server, kernel, manager):
    # A file name, a subprocess's output: kernels on jupyter_client 7+ send them raw. (A kernel
    # of its own: Enterprise Gateway's kernels, on jupyter_client 6, cannot encode such text,
    # drop the message and may send no output after it.)
    answer = manager.execute_code(
        kernel, "print(b'\\xff'.decode('utf-8', 'surrogateescape'), flush=True); "
                "print('after')")
    assert answer["status"] == "ok", answer
    if jupyter_server.kind != "enterprise_gateway":
        assert answer["stdout"] == "\ufffd\nafter\n"
    else:
        assert "\ufffd" not in answer["stdout"]


class LegacyProtocolServer(EmbeddedJupyterServer):
    """A jupyter_server that speaks only the legacy JSON encoding on kernel websockets, as
    servers without the v1 protocol do (they choose no subprotocol)."""

    def config(self) -> str:
        return super().config() + 'c.ZMQChannelsWebsocketConnection.kernel_ws_protocol = ""\n'


def test_server_without_v1_is_spoken_to_in_json():
    with LegacyProtocolServer(startup_timeout=120) as server:
        settings = Settings(server_url=server.url, token=server.token)
        with KernelManager(JupyterClient(settings)) as manager:
            kernel_id = manager.start_kernel()["id"]
            with manager.client.open_channel(kernel_id) as channel:
                assert not channel.v1
            answer = manager.execute_code(kernel_id, "print('é'); 1 + 1")
            assert answer["status"] == "ok", answer
            assert answer["stdout"] == "é\n"
            assert answer["outputs"][0]["data"]["text/plain"] == "2"
            failed = manager.execute_code(kernel_id, "1 / 0")
            assert failed["status"] == "error" and failed["error"]["ename"] == "ZeroDivisionError"
            manager.shutdown_kernel(kernel_id)


def test_json_can_be_chosen_even_with_a_server_that_speaks_v1(settings, shared_kernel):
    with JupyterClient(settings.replace(websocket_protocol="json")) as client, \
            client.open_channel(shared_kernel) as channel:
        assert not channel.v1
        reply, _ = kernel_info(channel)
        assert reply["content"]["status"] == "ok"


def channel_reading(opcode: int, frames: list[bytes], v1: bool) -> KernelChannel:
    """A KernelChannel whose websocket hands out `frames` (all of one opcode), in order."""

    class Frames:
        sock = None

        def settimeout(self, timeout: float) -> None:
            pass

        def recv_data_frame(self, control_frame: bool = False):
            return opcode, type("Frame", (), {"data": frames.pop(0)})

    return KernelChannel(Frames(), "k", "s", v1=v1)


def test_a_frame_that_is_no_jupyter_message_is_skipped_and_counted():
    good = protocol.encode_v1({**protocol.kernel_info_request("s"), "channel": "iopub"})
    channel = channel_reading(websocket.ABNF.OPCODE_BINARY, [b"\x00garbage", good], v1=True)
    message, size = channel.recv(5)
    assert message["msg_type"] == "kernel_info_request" and size == len(good)
    assert channel.dropped == 1


def test_a_message_nested_too_deeply_to_decode_is_skipped_and_counted():
    good = protocol.encode({**protocol.kernel_info_request("s"), "channel": "iopub"})
    nested = '{"header": ' + "[" * 200_000 + "]" * 200_000 + "}"
    channel = channel_reading(websocket.ABNF.OPCODE_TEXT, [nested.encode(), good.encode()],
                              v1=False)
    message, _ = channel.recv(5)
    assert message["msg_type"] == "kernel_info_request"
    assert channel.dropped == 1


def test_a_subprotocol_the_proxy_did_not_offer_is_refused():
    with fake_websocket_server(subprotocol=b"something.else") as url, \
            pytest.raises(UpstreamError, match="unknown websocket subprotocol"):
        KernelChannel.open(url, "k", [], timeout=5)


@contextlib.contextmanager
def fake_websocket_server(subprotocol: bytes | None = None,
                          then: Callable[[socket.socket, threading.Event], None] | None = None,
                          ) -> Iterator[str]:
    """A one-connection websocket server: it completes the handshake (choosing `subprotocol`
    if given), then runs `then(connection, stop)` until the block ends; yields a channel URL.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key"))
            accept = base64.b64encode(hashlib.sha1(
                key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            chosen = b"Sec-WebSocket-Protocol: " + subprotocol + b"\r\n" if subprotocol else b""
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n"
                         + chosen + b"\r\n")
            with contextlib.suppress(OSError):
                if then is not None:
                    then(conn, stop)
                else:
                    stop.wait(30)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield f"ws://127.0.0.1:{listener.getsockname()[1]}/api/kernels/k/channels"
    finally:
        stop.set()
        server.join(5)
        listener.close()
