"""Streamed execution output: one JSON object per line (NDJSON), flushed as the kernel sends it.

The lines are `Execution.updates()` as they come (`stdout`, `stderr`, `output`,
`clear_output`, `update_display`, `error`), then one `result` line carrying the whole
`execute_code` answer. A failure after the 200 went out (the Jupyter server went away) ends the
stream with a `failure` line in the error shape of the API instead.

The status line and headers go out at once, before the first output (an empty first chunk),
so that a client knows its code runs even while the kernel is silent.

A client that goes away mid-stream must not leave its code running unseen: the proxy notices
when a write fails, and while the kernel is silent (or the execution waits for the kernel) it
peeks at the client's socket every half second (gunicorn hands it over as `gunicorn.socket`;
a client that half-closes its side after the request counts as gone). A client that stays
connected but stops reading is given `STALLED_WRITE_SECONDS` per 64 KiB write (while its code
runs, no later than the deadline and the interrupt grace), then counts as gone too, so that
it cannot hold the kernel past the deadline. Either way the execution is closed,
which interrupts the kernel (see `Execution.close`).
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, stream_with_context

from app import logs
from app.errors import failure_body
from app.kernels.execution import INTERRUPT_GRACE_SECONDS
from app.kernels.manager import Execution

NDJSON = "application/x-ndjson"
STALLED_WRITE_SECONDS = 10.0
CLIENT_LOOK_SECONDS = 0.25  # how often a running execution looks whether its client is gone
WRITE_BYTES = 64 * 1024


def ndjson_response(execution: Execution, environ: dict[str, Any] | None = None) -> Response:
    """A 200 whose body streams the execution's updates, one JSON line each."""
    sock = (environ or {}).get("gunicorn.socket")
    if not isinstance(sock, socket.socket):
        sock = None  # not gunicorn (`flask run`): writes have no timeout of ours
    else:
        sock.settimeout(STALLED_WRITE_SECONDS)  # gunicorn resets it for the next request

    streaming_request_id = logs.request_id.get()

    def lines() -> Iterator[bytes]:
        # gunicorn reads this generator after the view returned and the request's log context
        # was reset: the execution's log lines still belong to this request.
        token = logs.request_id.set(streaming_request_id)
        try:
            yield b""  # the headers, now
            for update in execution.updates():
                for piece in _pieces(_line(update)):
                    if sock is not None:
                        sock.settimeout(_write_timeout(execution))
                    yield piece
        except Exception as err:  # noqa: BLE001 - the status is sent: say it in the stream
            yield _line({"type": "failure", **failure_body(err)})
        finally:
            execution.close()  # the client went away early: stop the code
            with contextlib.suppress(ValueError):  # closed from another context (GC)
                logs.request_id.reset(token)

    response = Response(stream_with_context(lines()), mimetype=NDJSON,
                        headers={"X-Accel-Buffering": "no", "Cache-Control": "no-store"})
    response.call_on_close(execution.close)  # also if the body is never read
    return response


def client_gone(environ: dict[str, Any]) -> Callable[[], bool] | None:
    """A check that says True once the HTTP client has closed its connection, or None where
    the server does not expose the socket (`flask run`: then a failed write tells).
    """
    sock = environ.get("gunicorn.socket")
    if not isinstance(sock, socket.socket):
        return None
    next_look = [time.monotonic() + CLIENT_LOOK_SECONDS]

    def gone() -> bool:
        # Asked before each message too: look at most every CLIENT_LOOK_SECONDS, so that a
        # short execution costs no system call.
        now = time.monotonic()
        if now < next_look[0]:
            return False
        next_look[0] = now + CLIENT_LOOK_SECONDS
        poller = select.poll()
        try:
            poller.register(sock, select.POLLIN)
            if not poller.poll(0):
                return False  # open, nothing sent: the usual case
            return sock.recv(1, socket.MSG_PEEK) == b""  # readable, so this does not wait
        except (BlockingIOError, InterruptedError):
            return False
        except ValueError:
            return False  # a TLS socket takes no flags: rely on failed writes
        except OSError:
            return True  # reset by the peer

    return gone


def _write_timeout(execution: Execution) -> float:
    """How long one write may block: `STALLED_WRITE_SECONDS`, but while the code runs (and
    holds the kernel) no later than its deadline and interrupt grace, so that a client that
    reads slowly cannot hold the kernel much past the deadline either.
    """
    if execution.answer is not None:
        return STALLED_WRITE_SECONDS
    left = execution.deadline + INTERRUPT_GRACE_SECONDS - time.monotonic()
    return max(min(STALLED_WRITE_SECONDS, left), 1.0)


def _pieces(line: bytes) -> Iterator[bytes]:
    """A line in writes of at most `WRITE_BYTES`, so that the stall timeout measures a client
    that stopped reading, not one that reads a large line slowly.
    """
    for start in range(0, len(line), WRITE_BYTES):
        yield line[start:start + WRITE_BYTES]


def _line(update: dict[str, Any]) -> bytes:
    return json.dumps(update, ensure_ascii=False).encode("utf-8") + b"\n"
