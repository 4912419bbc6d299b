"""Long-running executions ("jobs"): submitted with `"mode": "async"`, polled by id.

A job runs in a thread of the worker that accepted it, as an ordinary `Execution`; its state
lives in a `JobStore` that every worker reads, so that any worker can answer
`GET /executions/<id>`. The default store is one SQLite file per Jupyter server on this host
(standard library, WAL mode: readers never wait for the writer). A store shared by several
hosts only has to implement `JobStore`.

What keeps a job honest:
- its output so far (`stdout`, `stderr`, `outputs`, `error`; the raw `results` only at the
  end) is saved within `SAVE_SECONDS` of arriving (more for a big answer), also while the
  kernel is silent, and in full when it ends. Progress saves are best effort: a busy store
  delays them, never the job;
- the worker running it writes a heartbeat every `HEARTBEAT_SECONDS`. A running job whose
  worker is gone (on this host: its process is gone; anywhere: no heartbeat for
  `LOST_AFTER_SECONDS`) is reported `lost`, never `running` forever. Writes are conditional,
  so a job marked `lost` never turns `running` again, and its real end, if it comes, wins;
- a worker that stops gracefully (SIGTERM, or gunicorn's `max_requests` recycling) first
  finishes its jobs (the worker class in `app/worker.py` waits while `jobs_running()`);
- a finished job is kept `retention` seconds, then forgotten (404).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import os
import socket
import sqlite3
import stat
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from app.kernels.manager import Execution, KernelManager
from app.logs import StructuredLogger

SAVE_SECONDS = 0.5
SAVE_BYTES_PER_SECOND = 1024 * 1024  # store writes per running job, about (a save is whole)
BUSY_SECONDS = 10.0  # how long a store write waits for another worker's write, at most
PROGRESS_BUSY_SECONDS = 0.5  # the same for a progress save (best effort, in the job's thread)
HEARTBEAT_SECONDS = 2.0
LOST_AFTER_SECONDS = 30.0  # no heartbeat for this long: the worker is gone (any host)
RUNNING = "running"
LOST = "lost"
FAILED = "failed"

_RUNNERS: weakref.WeakSet[JobRunner] = weakref.WeakSet()  # for jobs_running()


class JobStoreError(Exception):
    """The job store cannot be used (its path, its permissions)."""


class WorkerStopping(Exception):
    """This worker is stopping (recycled or shut down) and takes no new job."""


_stopping = threading.Event()


def stop_taking_jobs() -> None:
    """From now on this process refuses new jobs (its worker is stopping)."""
    _stopping.set()


class JobStore(Protocol):
    """Where jobs live. Times are epoch seconds; `answer` is the execute_code answer so far."""

    def create(self, job_id: str, kernel_id: str, owner: str, answer: dict[str, Any]) -> float:
        """Records a new running job; returns when it was submitted."""

    def save_progress(self, job_id: str, answer: dict[str, Any]) -> None:
        """Updates a running job's output (not one that ended or was marked lost)."""

    def finish(self, job_id: str, status: str, answer: dict[str, Any],
               failure: dict[str, Any] | None = None) -> None:
        """Records how a job ended (this wins over a `lost` mark)."""

    def mark_lost(self, job_id: str, heartbeat: float, failure: dict[str, Any]) -> bool:
        """Marks a job lost if it is still running with this heartbeat; True if it did."""

    def beat(self, job_ids: list[str]) -> None:
        """Says that the jobs' worker is alive."""

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's record, or None if unknown or expired."""


class SqliteJobStore:
    """Jobs in one SQLite file shared by this host's workers (a connection per call: cheap,
    and safe across threads and forks). The file is created on first use, readable by this
    user only.
    """

    def __init__(self, path: Path, retention: float) -> None:
        self.path = path
        self.retention = retention
        self._ready = False
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _connect(self, busy_timeout: float = BUSY_SECONDS) -> Iterator[sqlite3.Connection]:
        """A connection in autocommit mode, closed after use."""
        if not self._ready:
            self._create()
        db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    def _create(self) -> None:
        with self._lock:
            if self._ready:
                return
            _check_private_file(self.path)
            db = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("""CREATE TABLE IF NOT EXISTS jobs (
                    id TEXT PRIMARY KEY, kernel_id TEXT NOT NULL, owner TEXT NOT NULL,
                    status TEXT NOT NULL, submitted_at REAL NOT NULL, finished_at REAL,
                    heartbeat REAL NOT NULL, answer TEXT NOT NULL, failure TEXT)""")
            finally:
                db.close()
            self._ready = True

    def create(self, job_id: str, kernel_id: str, owner: str, answer: dict[str, Any]) -> float:
        now = time.time()
        with self._connect() as db:
            # Forget what ended long ago, and what no worker has owned for as long.
            db.execute("DELETE FROM jobs WHERE finished_at < ? OR (finished_at IS NULL AND "
                       "heartbeat < ?)", (now - self.retention, now - self.retention))
            db.execute("INSERT INTO jobs (id, kernel_id, owner, status, submitted_at, heartbeat,"
                       " answer) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (job_id, kernel_id, owner, RUNNING, now, now, json.dumps(answer)))
        return now

    def save_progress(self, job_id: str, answer: dict[str, Any]) -> None:
        # Best effort, in the job's own thread: a busy store must not hold the execution.
        with self._connect(busy_timeout=PROGRESS_BUSY_SECONDS) as db:
            db.execute("UPDATE jobs SET answer = ?, heartbeat = ? WHERE id = ? AND status = ?",
                       (json.dumps(answer), time.time(), job_id, RUNNING))

    def finish(self, job_id: str, status: str, answer: dict[str, Any],
               failure: dict[str, Any] | None = None) -> None:
        now = time.time()
        with self._connect() as db:
            db.execute("UPDATE jobs SET status = ?, answer = ?, failure = ?, heartbeat = ?, "
                       "finished_at = ? WHERE id = ?",
                       (status, json.dumps(answer), json.dumps(failure) if failure else None,
                        now, now, job_id))

    def mark_lost(self, job_id: str, heartbeat: float, failure: dict[str, Any]) -> bool:
        with self._connect() as db:
            changed = db.execute(
                "UPDATE jobs SET status = ?, failure = ?, finished_at = ? "
                "WHERE id = ? AND status = ? AND heartbeat = ?",
                (LOST, json.dumps(failure), time.time(), job_id, RUNNING, heartbeat)).rowcount
        return changed == 1

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
        _RUNNERS.add(self)

    def submit(self, kernel_id: str, code: str, timeout: float | None) -> dict[str, Any] | None:
        """Starts a job and returns its record; None if this worker runs `max_running` jobs.

        The request is checked first (the same errors as a synchronous execution, and 404 for
        a kernel the server does not have), so that a job that is accepted can run.
        """
        timeout = self.manager.check_request(kernel_id, code, timeout)
        if _stopping.is_set():
            raise WorkerStopping("this worker is restarting and takes no new job; submit it "
                                 "again")
        self.manager.describe_kernel(kernel_id)  # KernelNotFound now, not later
        job_id = str(uuid.uuid4())
        with self._lock:
            if self.max_running and len(self._running) >= self.max_running:
                return None
            self._running.add(job_id)
        try:
            submitted = self.store.create(job_id, kernel_id, _owner(), _empty_answer())
            context = contextvars.copy_context()  # log lines keep the submitting request's id
            # A daemon: a stopping worker waits for its jobs (app/worker.py), not at exit.
            threading.Thread(target=context.run, daemon=True, name=f"job-{job_id[:8]}",
                             args=(self._run, job_id, kernel_id, code, timeout)).start()
            self._start_heart()
        except BaseException:
            with self._lock:
                self._running.discard(job_id)
            raise
        self.logger.info("job submitted", kernel_id=kernel_id, execution_id=job_id)
        # As created: a job that already ended is for the GET to tell.
        return self._record({"id": job_id, "kernel_id": kernel_id, "status": RUNNING,
                             "submitted_at": submitted, "finished_at": None, "failure": None,
                             "answer": _empty_answer()})

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job as the API shows it, or None if unknown or expired."""
        job = self.store.get(job_id)
        if job is None:
            return None
        if job["status"] == RUNNING and _worker_gone(job["owner"], job["heartbeat"]):
            failure = {"error": "job_lost",
                       "message": "the proxy worker running this job stopped before it "
                                  "finished; the kernel may still be running the code: "
                                  "POST /interrupt_kernel or /restart_kernel to stop it",
                       "details": {"kernel_id": job["kernel_id"]}}
            self.store.mark_lost(job_id, job["heartbeat"], failure)
            job = self.store.get(job_id) or job
        return self._record(job)

    @staticmethod
    def _record(job: dict[str, Any]) -> dict[str, Any]:
        """A stored job as the API shows it."""
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

    def running(self) -> int:
        """How many jobs this worker runs now."""
        with self._lock:
            return len(self._running)

    def _run(self, job_id: str, kernel_id: str, code: str, timeout: float) -> None:
        progress = _Progress(self, job_id)
        answer = _empty_answer()
        try:
            # Not refused for the kernel's queue: JUPYTER_MAX_RUNNING_JOBS bounds jobs.
            with self.manager.begin_execution(kernel_id, code, timeout, queue_limited=False,
                                              poll=progress.save_if_due) as execution:
                progress.execution = execution
                for update in execution.updates():
                    progress.changed |= update["type"] != "result"
                    progress.save_if_due()
                answer = execution.answer or answer
            self._finish(job_id, answer["status"], answer)
        except Exception as err:  # noqa: BLE001 - a job must end with a status, whatever fails
            if progress.execution is not None:
                answer = progress.execution.partial_answer()
            self._finish(job_id, FAILED, answer, self.describe_failure(err))
        finally:
            with self._lock:
                self._running.discard(job_id)

    def _finish(self, job_id: str, status: str, answer: dict[str, Any],
                failure: dict[str, Any] | None = None) -> None:
        for attempt in range(3):
            try:
                self.store.finish(job_id, status, answer, failure)
                with self._lock:  # over once recorded: a client that saw it end may submit
                    self._running.discard(job_id)
                self.logger.info("job finished", execution_id=job_id, status=status)
                return
            except sqlite3.Error as err:
                self.logger.warning("could not record the end of a job", execution_id=job_id,
                                    reason=str(err), attempt=attempt + 1)
                time.sleep(1.0)
        self.logger.error("the end of a job was not recorded; it will read as lost",
                          execution_id=job_id, status=status)

    def _start_heart(self) -> None:
        with self._lock:
            if self._heart is None or not self._heart.is_alive():
                self._heart = threading.Thread(target=self._beat, name="job-heartbeat",
                                               daemon=True)
                self._heart.start()

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_SECONDS)
            with self._lock:
                running = list(self._running)
            try:
                self.store.beat(running)
            except Exception as err:  # noqa: BLE001 - the heartbeat must outlive a bad write
                self.logger.warning("could not record the job heartbeat", reason=str(err))


class _Progress:
    """Saves a running job's output when it changed, at most every `SAVE_SECONDS`; called
    for each update and, through `poll`, while the kernel is silent (in the job's thread).
    """

    def __init__(self, runner: JobRunner, job_id: str) -> None:
        self.runner = runner
        self.job_id = job_id
        self.execution: Execution | None = None
        self.changed = False
        self.saved = time.monotonic()

    def save_if_due(self) -> bool:
        if self.changed and self.execution is not None \
                and time.monotonic() - self.saved >= self._interval():
            answer = {**self.execution.partial_answer(), "results": []}  # raw ones at the end
            try:
                self.runner.store.save_progress(self.job_id, answer)
                self.changed = False
            except sqlite3.Error as err:
                self.runner.logger.warning("could not save a job's progress",
                                           execution_id=self.job_id, reason=str(err))
            self.saved = time.monotonic()
        return False  # never cancels

    def _interval(self) -> float:
        """`SAVE_SECONDS`, longer for a big answer: each save writes all of it again."""
        return SAVE_SECONDS + self.execution.output_bytes / SAVE_BYTES_PER_SECOND


def jobs_running() -> bool:
    """True while this process runs a job."""
    return any(runner.running() for runner in list(_RUNNERS))


def _check_private_file(path: Path) -> None:
    """Creates `path` (0600) or checks that the existing file is this user's and private."""
    if not path.parent.is_dir():
        raise JobStoreError(f"JUPYTER_JOB_STORE: the directory {path.parent} does not exist")
    directory = path.parent.stat()
    if directory.st_uid not in (os.getuid(), 0) or directory.st_mode & 0o022:
        # SQLite opens `<store>-wal` and `<store>-shm` there: files someone else could plant.
        raise JobStoreError(f"JUPYTER_JOB_STORE: other users can write to {path.parent}; put "
                            "the store in a directory only this user can write")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except IsADirectoryError:
        raise JobStoreError(f"JUPYTER_JOB_STORE: {path} is a directory; name a file") from None
    except OSError as err:
        raise JobStoreError(f"JUPYTER_JOB_STORE: cannot open {path} ({err.strerror}; "
                            "symbolic links are refused)") from None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or not stat.S_ISREG(info.st_mode):
            raise JobStoreError(f"JUPYTER_JOB_STORE: {path} is not a file of this user")
        if info.st_mode & 0o077:
            os.fchmod(fd, 0o600)  # job outputs can hold secrets
    finally:
        os.close(fd)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _worker_gone(owner: str, heartbeat: float) -> bool:
    """On this host the process tells; elsewhere, only the heartbeat."""
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        # Alive (or a reused pid): a long silence still means gone.
        return time.time() - heartbeat > 4 * LOST_AFTER_SECONDS
    return time.time() - heartbeat > LOST_AFTER_SECONDS


def _empty_answer() -> dict[str, Any]:
    return {"results": [], "execution_count": None, "stdout": "", "stderr": "", "outputs": [],
            "error": None, "truncated": False}


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat()
