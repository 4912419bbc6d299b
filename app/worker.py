"""The gunicorn worker class: gthread, and async jobs are not cut short by a worker stopping.

- gunicorn recycles a worker after `max_requests` requests, and starts its replacement only
  once the old process has exited. A worker running jobs therefore puts its recycling off
  until its jobs are done, and keeps serving meanwhile.
- On a shutdown (SIGTERM) gthread waits for the requests in flight; async jobs are not
  requests, so this class waits for them afterwards, heartbeating so that gunicorn does not
  take the wait for a hang. The shutdown still ends at gunicorn's `graceful_timeout`; a job cut
  short then reads `lost`.
"""

from __future__ import annotations

from typing import Any

from gunicorn.workers.gthread import ThreadWorker

from app.jobs import finish_jobs, jobs_running
from app.kernels.execution import INTERRUPT_GRACE_SECONDS

WORKER_CLASS = "app.worker.JobFinishingThreadWorker"


class JobFinishingThreadWorker(ThreadWorker):
    """gunicorn's gthread worker that lets its jobs end before it exits."""

    def handle_request(self, req: Any, conn: Any) -> Any:
        if jobs_running() and self.nr + 1 >= self.max_requests:
            self.max_requests = self.nr + 2  # recycle after the jobs, not during them
        return super().handle_request(req, conn)

    def run(self) -> None:
        super().run()
        settings = self.wsgi.config["SETTINGS"]
        finish_jobs(self.notify, settings.max_execution_timeout + INTERRUPT_GRACE_SECONDS
                    + settings.kernel_start_timeout)
