"""The gunicorn worker class: gthread, and a stopping worker finishes its async jobs first.

A worker stops when gunicorn recycles it (`max_requests`) or shuts down (SIGTERM). gthread
then waits for the requests in flight; async jobs are not requests, so this class waits for
them afterwards, heartbeating so that gunicorn does not take the wait for a hang. A full
shutdown still ends at gunicorn's `graceful_timeout`; a job cut short then reads `lost`.
"""

from __future__ import annotations

from gunicorn.workers.gthread import ThreadWorker

from app.jobs import finish_jobs
from app.kernels.execution import INTERRUPT_GRACE_SECONDS

WORKER_CLASS = "app.worker.JobFinishingThreadWorker"


class JobFinishingThreadWorker(ThreadWorker):
    """gunicorn's gthread worker that lets its jobs end before it exits."""

    def run(self) -> None:
        super().run()
        settings = self.wsgi.config["SETTINGS"]
        finish_jobs(self.notify, settings.max_execution_timeout + INTERRUPT_GRACE_SECONDS
                    + settings.kernel_start_timeout)
