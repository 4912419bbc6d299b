"""One websocket to one kernel (`/api/kernels/{id}/channels`), with a timeout on every call.

A `KernelChannel` is not thread-safe and is never shared: one owner sends and receives on it,
so two threads never `recv()` on one websocket. websocket-client keeps a partly read frame
across a receive timeout, so a timed-out `recv` can simply be called again.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
import uuid
from typing import Any

import websocket

from app.kernels import protocol
from app.logs import StructuredLogger
from app.metrics import metrics
from app.kernels.errors import (
    ConnectionLost,
    KernelNotFound,
    UpstreamAuthError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)


log = StructuredLogger(__name__)

# Linux only; elsewhere receives simply go without it.
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def _ack_quickly(sock: socket.socket | None) -> None:
    """Turns off delayed ACKs for the next receive (Linux resets this after a while).

    The Jupyter server writes each message separately without TCP_NODELAY, so its second small
    write waits for our ACK of the first: a delayed ACK would stall every exchange ~40 ms.
    """
    if _TCP_QUICKACK is not None and sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        except OSError:
            pass


class KernelChannel:
    """A websocket to one kernel's channels, speaking Jupyter messages (v1 or JSON encoded)."""

    def __init__(self, ws: Any, kernel_id: str, session_id: str, v1: bool = False) -> None:
        """`v1`: the server chose the v1 encoding (see `protocol`), else it speaks JSON."""
        self.ws = ws
        self.kernel_id = kernel_id
        self.session_id = session_id
        self.v1 = v1
        self.dropped = 0  # frames received that were not Jupyter messages (skipped)
        self.pongs = 0  # answers to `ping()` received
        self._open = True
        metrics().open_websockets.inc()

    @classmethod
    def open(cls, url: str, kernel_id: str, headers: list[str], timeout: float,
             session_id: str | None = None, offer_v1: bool = True) -> KernelChannel:
        """Opens the websocket; `url` has no query string, `timeout` bounds the handshake.

        The session id (new unless given) makes the server treat a reconnection as the same
        client and replay what it buffered for it meanwhile.

        The proxy offers the v1 encoding (unless `offer_v1` is False); a server that does not
        know it chooses none and speaks JSON. (The offer goes as a plain header:
        websocket-client's `subprotocols` would refuse such a server's answer.)
        """
        session_id = session_id or uuid.uuid4().hex
        try:
            ws = websocket.create_connection(
                f"{url}?session_id={session_id}", timeout=timeout,
                header=[*headers, f"Sec-WebSocket-Protocol: {protocol.V1_SUBPROTOCOL}"]
                if offer_v1 else headers,
                enable_multithread=False, skip_utf8_validation=True,
            )
        except websocket.WebSocketBadStatusException as err:
            # The error's text holds the server's page, which embeds its token: never show it.
            if err.status_code == 404:
                raise KernelNotFound(kernel_id) from None
            if err.status_code in (401, 403):
                raise UpstreamAuthError(
                    "the Jupyter server refused the proxy's token; check JUPYTER_TOKEN"
                ) from None
            raise UpstreamError(
                f"the Jupyter server refused the kernel websocket (HTTP {err.status_code})",
                kernel_id=kernel_id,
            ) from None
        except (websocket.WebSocketTimeoutException, socket.timeout, TimeoutError):
            raise UpstreamTimeout(
                f"the kernel websocket did not open within {timeout:g} s", kernel_id=kernel_id
            ) from None
        except (websocket.WebSocketException, OSError):
            raise UpstreamUnavailable(
                "cannot open a websocket to the Jupyter server", kernel_id=kernel_id
            ) from None
        chosen = ((ws.getheaders() or {}).get("sec-websocket-protocol") or "").strip()
        if chosen not in ("", protocol.V1_SUBPROTOCOL) or (chosen and not offer_v1):
            with contextlib.suppress(Exception):
                ws.close(timeout=0)
            raise UpstreamError(f"the Jupyter server chose an unknown websocket subprotocol "
                                f"({chosen[:100]!r})", kernel_id=kernel_id)
        return cls(ws, kernel_id, session_id, v1=chosen == protocol.V1_SUBPROTOCOL)

    def send(self, message: dict[str, Any]) -> None:
        """Sends one message; the connection breaking raises `ConnectionLost`."""
        try:
            self.ws.settimeout(10.0)
            if self.v1:
                self.ws.send_binary(protocol.encode_v1(message))
            else:
                self.ws.send(protocol.encode(message))
        except (websocket.WebSocketException, OSError) as err:
            raise ConnectionLost("the websocket to the kernel broke while sending",
                                 kernel_id=self.kernel_id) from err

    def ping(self) -> None:
        """Sends a websocket ping: the server answers it (`pongs`) if the connection lives,
        whatever the kernel does. Breaking raises `ConnectionLost`."""
        try:
            self.ws.settimeout(10.0)
            self.ws.ping()
        except (websocket.WebSocketException, OSError) as err:
            raise ConnectionLost("the websocket to the kernel broke while sending",
                                 kernel_id=self.kernel_id) from err

    def recv(self, timeout: float) -> tuple[dict[str, Any], int] | None:
        """The next message and its size in bytes, or None if `timeout` passes first, or a
        pong came (counted in `pongs`: a caller waiting for one can look).

        Control frames are read one at a time (pings answered) and the time left recomputed
        after each: websocket-client's own `recv()` would wait through any number of pings,
        each one restarting the socket's timeout.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                self.ws.settimeout(max(remaining, 0.001))
                _ack_quickly(self.ws.sock)
                opcode, frame = self.ws.recv_data_frame(control_frame=True)
            except (websocket.WebSocketTimeoutException, socket.timeout, TimeoutError):
                return None
            except (websocket.WebSocketException, OSError) as err:
                raise ConnectionLost("the websocket to the kernel broke",
                                     kernel_id=self.kernel_id) from err
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                raise ConnectionLost("the Jupyter server closed the websocket to the kernel",
                                     kernel_id=self.kernel_id)
            if opcode == websocket.ABNF.OPCODE_PONG:
                self.pongs += 1
                return None
            if opcode not in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                continue
            data = frame.data
            try:
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    return protocol.decode(data.decode("utf-8")), len(data)
                return (protocol.decode_v1(data) if self.v1 else protocol.decode(data)), \
                    len(data)
            except (ValueError, UnicodeDecodeError, RecursionError):  # Recursion: absurd nesting
                # One bad message must not end the execution (its code would run on unseen):
                # it is skipped, and counted so that the answer says output may be missing.
                self.dropped += 1
                log.warning("skipped a websocket frame that is not a Jupyter message",
                            kernel_id=self.kernel_id, bytes=len(data))

    def pending(self) -> bool:
        """True if a message (or the connection's end) can be read without waiting."""
        sock = self.ws.sock
        if sock is None:
            return True  # closed: recv() will say so
        buffered = getattr(getattr(self.ws, "frame_buffer", None), "recv_buffer", None)
        if buffered or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            return True
        try:
            return bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        """Closes the websocket; safe to call twice."""
        if self._open:
            self._open = False
            metrics().open_websockets.dec()
        try:
            self.ws.close(timeout=0.5)
        except Exception:  # noqa: BLE001 - closing is best effort, nothing to report
            pass

    def __enter__(self) -> KernelChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
