"""Long-running executions ("jobs"): submitted with `"mode": "async"`, polled by id.

A job runs in a thread of the worker that accepted it, as an ordinary `Execution`; its state
lives in a `JobStore` that every worker reads, so that any worker can answer
`GET /executions/<id>`. The default store is one SQLite file per Jupyter server on this host
(standard library, WAL mode: readers never wait for the writer). A store shared by several
hosts only has to implement `JobStore`.

What keeps a job honest:
- its output so far is saved at most every `SAVE_SECONDS`, and in full when it ends;
- the worker running it writes a heartbeat every `HEARTBEAT_SECONDS`; a running job whose
  worker is gone (its process no longer exists, or no heartbeat for `LOST_AFTER_SECONDS`) is
  reported `lost`, never `running` forever;
- a finished job is kept `retention` seconds, then forgotten (404);
- job threads are not daemons: a worker stopping gracefully finishes its jobs first (within
  gunicorn's graceful timeout).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from app.kernels.manager import KernelManager
from app.logs import StructuredLogger

SAVE_SECONDS = 0.5
HEARTBEAT_SECONDS = 2.0
LOST_AFTER_SECONDS = 15.0
RUNNING = "running"
LOST = "lost"
FAILED = "failed"


class JobStore(Protocol):
    """Where jobs live. Times are epoch seconds; `answer` is the execute_code answer so far."""

    def create(self, job_id: str, kernel_id: str, owner: str, answer: dict[str, Any]) -> None:
        """Records a new running job."""

    def save(self, job_id: str, status: str, answer: dict[str, Any],
             failure: dict[str, Any] | None = None, finished: bool = False) -> None:
        """Updates a job's status and output (`finished`: it is over)."""

    def beat(self, job_ids: list[str]) -> None:
        """Says that the jobs' worker is alive."""

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's record, or None if unknown or expired."""


class SqliteJobStore:
    """Jobs in one SQLite file shared by this host's workers (a connection per call: cheap,
    and safe across threads and forks).
    """

    def __init__(self, path: Path, retention: float) -> None:
        self.path = path
        self.retention = retention
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # private: outputs can be secret
        os.close(fd)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("""CREATE TABLE IF NOT EXISTS jobs (
                id TEXT PRIMARY KEY, kernel_id TEXT NOT NULL, owner TEXT NOT NULL,
                status TEXT NOT NULL, submitted_at REAL NOT NULL, finished_at REAL,
                heartbeat REAL NOT NULL, answer TEXT NOT NULL, failure TEXT)""")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in autocommit mode, closed after use."""
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    def create(self, job_id: str, kernel_id: str, owner: str, answer: dict[str, Any]) -> None:
        now = time.time()
        with self._connect() as db:
            db.execute("DELETE FROM jobs WHERE finished_at < ?", (now - self.retention,))
            db.execute("INSERT INTO jobs (id, kernel_id, owner, status, submitted_at, heartbeat,"
                       " answer) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (job_id, kernel_id, owner, RUNNING, now, now, json.dumps(answer)))

    def save(self, job_id: str, status: str, answer: dict[str, Any],
             failure: dict[str, Any] | None = None, finished: bool = False) -> None:
        now = time.time()
        with self._connect() as db:
            db.execute("UPDATE jobs SET status = ?, answer = ?, failure = ?, heartbeat = ?, "
                       "finished_at = ? WHERE id = ?",
                       (status, json.dumps(answer), json.dumps(failure) if failure else None,
                        now, now if finished else None, job_id))

    def beat(self, job_ids: list[str]) -> None:
        if not job_ids:
            return
        with self._connect() as db:
            db.executemany("UPDATE jobs SET heartbeat = ? WHERE id = ? AND status = ?",
                           [(time.time(), job_id, RUNNING) for job_id in job_ids])

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        job = dict(row)
        if job["finished_at"] is not None and job["finished_at"] < time.time() - self.retention:
            return None
        job["answer"] = json.loads(job["answer"])
        job["failure"] = json.loads(job["failure"]) if job["failure"] else None
        return job


class JobRunner:
    """Runs jobs in threads of this worker and answers for any job in the store."""

    def __init__(self, manager: KernelManager, store: JobStore, max_running: int,
                 describe_failure: Callable[[Exception], dict[str, Any]],
                 logger: StructuredLogger | None = None) -> None:
        self.manager = manager
        self.store = store
        self.max_running = max_running
        self.describe_failure = describe_failure
        self.logger = logger or StructuredLogger(__name__)
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._heart: threading.Thread | None = None

    def submit(self, kernel_id: str, code: str, timeout: float | None) -> dict[str, Any] | None:
        """Starts a job and returns its record; None if this worker runs `max_running` jobs.

        The request is checked first (the same errors as a synchronous execution, and 404 for
        a kernel the server does not have), so that a job that is accepted can run.
        """
        timeout = self.manager.check_request(kernel_id, code, timeout)
        self.manager.client.get_kernel(kernel_id)  # KernelNotFound now, not later
        job_id = str(uuid.uuid4())
        with self._lock:
            if self.max_running and len(self._running) >= self.max_running:
                return None
            self._running.add(job_id)
            self._start_heart()
        try:
            self.store.create(job_id, kernel_id, _owner(), _empty_answer())
            thread = threading.Thread(target=self._run, args=(job_id, kernel_id, code, timeout),
                                      name=f"job-{job_id[:8]}")  # not a daemon: see above
            thread.start()
        except BaseException:
            with self._lock:
                self._running.discard(job_id)
            raise
        self.logger.info("job submitted", kernel_id=kernel_id, execution_id=job_id)
        return self.get(job_id)

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job as the API shows it, or None if unknown or expired."""
        job = self.store.get(job_id)
        if job is None:
            return None
        if job["status"] == RUNNING and _worker_gone(job["owner"], job["heartbeat"]):
            job["status"] = LOST
            job["failure"] = {"error": "job_lost",
                              "message": "the proxy worker running this job stopped before it "
                                         "finished; the kernel may have run some or all of "
                                         "the code"}
            self.store.save(job_id, LOST, job["answer"], job["failure"], finished=True)
            job["finished_at"] = time.time()
        record = {
            "execution_id": job["id"],
            "kernel_id": job["kernel_id"],
            "status": job["status"],
            "submitted_at": _iso(job["submitted_at"]),
            "finished_at": _iso(job["finished_at"]),
            "failure": job["failure"],
        }
        record.update((k, v) for k, v in job["answer"].items() if k != "status")
        return record

    def _run(self, job_id: str, kernel_id: str, code: str, timeout: float) -> None:
        answer = _empty_answer()
        try:
            with self.manager.begin_execution(kernel_id, code, timeout) as execution:
                saved = time.monotonic()
                for update in execution.updates():
                    if update["type"] != "result" and time.monotonic() - saved >= SAVE_SECONDS:
                        answer = execution.partial_answer()
                        self.store.save(job_id, RUNNING, answer)
                        saved = time.monotonic()
                answer = execution.answer or answer
            self.store.save(job_id, answer["status"], answer, finished=True)
        except Exception as err:  # noqa: BLE001 - a job must end with a status, whatever fails
            self.store.save(job_id, FAILED, answer, self.describe_failure(err), finished=True)
        finally:
            with self._lock:
                self._running.discard(job_id)

    def _start_heart(self) -> None:
        if self._heart is None or not self._heart.is_alive():
            self._heart = threading.Thread(target=self._beat, name="job-heartbeat", daemon=True)
            self._heart.start()

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_SECONDS)
            with self._lock:
                running = list(self._running)
            try:
                self.store.beat(running)
            except sqlite3.Error as err:
                self.logger.warning("could not record the job heartbeat", reason=str(err))


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _worker_gone(owner: str, heartbeat: float) -> bool:
    if time.time() - heartbeat > LOST_AFTER_SECONDS:
        return True
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host's worker: only its heartbeat tells
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _empty_answer() -> dict[str, Any]:
    return {"results": [], "execution_count": None, "stdout": "", "stderr": "", "outputs": [],
            "error": None, "truncated": False}


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat()
