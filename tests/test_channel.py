"""Kernel websockets against real peers: handshake failures become the right errors."""

from __future__ import annotations

import time

import pytest

from app import JupyterClient
from app.kernels import (
    KernelNotFound,
    UpstreamAuthError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.kernels import protocol


def test_channel_exchanges_messages_with_a_real_kernel(settings, shared_kernel):
    with JupyterClient(settings) as client, client.open_channel(shared_kernel) as channel:
        request = protocol.kernel_info_request(channel.session_id)
        channel.send(request)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            received = channel.recv(deadline - time.monotonic())
            if received and protocol.parent_id(received[0]) == request["header"]["msg_id"] \
                    and received[0]["msg_type"] == "kernel_info_reply":
                assert received[0]["content"]["status"] == "ok"
                assert received[1] > 0
                return
        pytest.fail("no kernel_info_reply")


def test_recv_times_out_with_none_and_channel_stays_usable(settings, shared_kernel):
    with JupyterClient(settings) as client, client.open_channel(shared_kernel) as channel:
        while channel.recv(0.5) is not None:  # drain the server's greeting
            pass
        started = time.monotonic()
        assert channel.recv(0.3) is None
        assert time.monotonic() - started < 2
        channel.send(protocol.kernel_info_request(channel.session_id))
        assert channel.recv(10) is not None


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
    import base64
    import hashlib
    import socket
    import threading

    from app.kernels.channel import KernelChannel

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key"))
        accept = base64.b64encode(hashlib.sha1(
            key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        while not stop.wait(0.05):
            try:
                conn.sendall(b"\x89\x00")  # an empty ping frame
            except OSError:
                break
        conn.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    url = f"ws://127.0.0.1:{listener.getsockname()[1]}/api/kernels/k/channels"
    channel = KernelChannel.open(url, "k", [], timeout=5)
    try:
        started = time.monotonic()
        assert channel.recv(0.5) is None
        assert time.monotonic() - started < 2
    finally:
        stop.set()
        channel.close()
        server.join(5)
        listener.close()
