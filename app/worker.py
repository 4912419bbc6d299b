"""The gunicorn worker class: gthread, with executions and async jobs never cut short by the
worker recycling itself.

- gunicorn recycles a worker after `max_requests` requests, stopping it at once and starting
  its replacement once the old process has exited; gthread then gives requests in flight
  `graceful_timeout` to finish, and async jobs (not requests) none. This worker recycles only
  at a moment when it runs no request and no job (it checks once a second, in its main loop,
  which is the only place that takes new requests), and keeps serving until then.
- On a shutdown (SIGTERM), or when a request came in just as the worker recycled, gthread waits
  for the requests in flight; this class then waits for whatever still runs (requests past
  `graceful_timeout`, jobs), heartbeating so that gunicorn does not take the wait for a hang,
  for as long as an execution may last. gunicorn's arbiter still ends a shutdown at its
  `graceful_timeout`; a job cut short then reads `lost`.
- A stopping worker takes no new job (503 `jobs_unavailable`, "submit it again": another
  worker will): the job would keep alive a worker that no longer serves.
- Request threads that end after the main loop closed do not write to its closed wake-up pipe
  (whose descriptor number may belong to something else by then).
- A request gunicorn itself refuses (a malformed request line or header, headers too large)
  is answered in the API's JSON error shape, not gunicorn's HTML page; after the app's answer to
  a body that cannot be read (a malformed chunk), the connection closes without a second one.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from gunicorn import util
from gunicorn.http.errors import ParseException
from gunicorn.workers.gthread import PollableMethodQueue, ThreadWorker

from app.errors import HTTP_ERROR_CODES
from app.jobs import jobs_running, stop_taking_jobs
from app.kernels.execution import INTERRUPT_GRACE_SECONDS
from app.settings import waiting_limit

WORKER_CLASS = "app.worker.JobFinishingThreadWorker"


def write_json_error(sock: Any, status: int, reason: str, message: str) -> None:
    """What gunicorn answers to a request it cannot parse, in the API's error shape (gunicorn's
    `util.write_error` writes an HTML page); the connection closes after it, as there.
    """
    code = HTTP_ERROR_CODES.get(status, "bad_request" if status < 500 else "internal_error")
    body = json.dumps({"error": code,
                       "message": f"{reason}: {message}" if message else reason}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


class _MethodQueue(PollableMethodQueue):
    """gthread's wake-up queue, which ignores what is deferred to it once it is closed."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            super().close()

    def defer(self, callback: Any, *args: Any) -> None:
        with self._lock:
            if not self._closed:
                super().defer(callback, *args)


class JobFinishingThreadWorker(ThreadWorker):
    """gunicorn's gthread worker that lets its executions and jobs end before it exits."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.method_queue = _MethodQueue()
        # Recycling is decided in `notify`; gunicorn's own check would stop the worker however
        # busy it is.
        self.recycle_after = self.max_requests
        self.max_requests = sys.maxsize
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()

    def init_process(self) -> None:
        # In this worker process only: gunicorn's handle_error() calls util.write_error().
        util.write_error = write_json_error
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        # The app sized its limit of waiting executions by JUPYTER_PROXY_THREADS; the threads
        # this worker really has may differ (gunicorn's --threads, GUNICORN_CMD_ARGS).
        manager = getattr(self.wsgi, "extensions", {}).get("kernel_manager")
        if manager is not None:
            manager.limit_waiting(waiting_limit(self.cfg.threads))

    def enqueue_req(self, conn: Any) -> None:
        # Counted from here (the main loop, which also decides to recycle), not from when a
        # thread starts on it: a request accepted meanwhile must put the recycling off.
        with self._in_flight_lock:
            self._in_flight += 1
        try:
            super().enqueue_req(conn)
        except BaseException:
            self._done()
            raise

    def handle(self, conn: Any) -> Any:
        try:
            return super().handle(conn)
        finally:
            self._done()

    def _keepalive_after(self, conn: Any, keepalive: bool) -> bool:
        # gthread reads what the app left of the body before keeping the connection; a body
        # that breaks its framing (a bad chunk) made it answer a second time, after the app's
        # 400: the answer is out, so the connection just closes.
        try:
            return super()._keepalive_after(conn, keepalive)
        except (ParseException, OSError):
            return False

    def _done(self) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1

    def busy(self) -> bool:
        """True while a request or an async job runs in this worker."""
        return self._in_flight > 0 or jobs_running()

    def notify(self) -> None:
        super().notify()
        if self.alive and self.nr >= self.recycle_after and not self.busy():
            self.log.info("Autorestarting worker: max_requests reached, nothing running")
            self.alive = False
        if not self.alive:
            stop_taking_jobs()  # a job submitted now would keep a worker that serves no one

    def handle_exit(self, sig: Any, frame: Any) -> None:
        stop_taking_jobs()
        super().handle_exit(sig, frame)

    def run(self) -> None:
        super().run()
        settings = self.wsgi.config["SETTINGS"]
        deadline = time.monotonic() + (settings.max_execution_timeout + INTERRUPT_GRACE_SECONDS
                                       + settings.kernel_start_timeout)
        while self.busy() and time.monotonic() < deadline:
            super().notify()
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))
