"""Async jobs (`"mode": "async"`): submitted, polled across workers, lost with their worker."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
import requests

from app import create_app
from tests.conftest import ProxyProcess, proxy_for, post

pytestmark = pytest.mark.integration

UNKNOWN = "0b0c4f8e-7d41-4d5c-9a53-2f8a1c6b9e10"


@pytest.fixture(scope="module")
def proxy(jupyter_server, tmp_path_factory) -> Iterator[ProxyProcess]:
    """The real command with two workers sharing one job store."""
    store = str(tmp_path_factory.mktemp("jobs") / "jobs.sqlite3")
    with proxy_for(jupyter_server, "--workers", "2", env={"JUPYTER_JOB_STORE": store}) as process:
        yield process


@pytest.fixture
def kernel_id(proxy_kernel: str) -> str:
    return proxy_kernel


def submit(proxy: ProxyProcess, kernel: str, code: str, again_if_recycling: bool = False,
           **fields) -> dict:
    """Submits a job; `again_if_recycling`: as a 503 `jobs_unavailable` tells clients to, submit
    again (to the next worker) if the worker that took it is about to be recycled."""
    for _ in range(40):
        response = requests.post(f"{proxy.url}/execute_code", timeout=60,
                                 json={"id": kernel, "code": code, "mode": "async", **fields})
        if not (again_if_recycling and response.status_code == 503
                and response.json()["error"] == "jobs_unavailable"):
            break
        time.sleep(0.25)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["Location"] == job["url"] == f"/executions/{job['execution_id']}"
    return job


def poll(proxy: ProxyProcess, job: dict) -> dict:
    """GET the job on a new connection each time (so that either worker may answer)."""
    response = requests.get(f"{proxy.url}{job['url']}", timeout=30,
                            headers={"Connection": "close"})
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(proxy: ProxyProcess, job: dict, until, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = poll(proxy, job)
        if until(state):
            return state
        time.sleep(0.1)
    raise AssertionError(f"the job never reached the expected state: {state}")


def test_job_answers_at_once_and_is_polled_to_completion_by_any_worker(proxy, kernel_id):
    code = ("import time\n"
            "for i in range(3):\n"
            "    print(f'step {i}', flush=True)\n"
            "    time.sleep(1)\n"
            "'finished'")
    started = time.monotonic()
    job = submit(proxy, kernel_id, code)
    assert time.monotonic() - started < 2, "202 comes before the code finishes"
    assert job["status"] == "running" and job["kernel_id"] == kernel_id
    assert job["finished_at"] is None
    # While it runs: the output so far, not yet the end.
    running = wait_for(proxy, job, lambda s: "step 0" in s["stdout"])
    assert running["status"] == "running" and "step 2" not in running["stdout"]
    done = wait_for(proxy, job, lambda s: s["status"] != "running")
    assert done["status"] == "ok"
    assert done["stdout"] == "step 0\nstep 1\nstep 2\n"
    assert done["outputs"][0]["data"]["text/plain"] == "'finished'"
    assert done["execution_count"] and done["finished_at"] and done["failure"] is None
    assert any(m["msg_type"] == "execute_reply" for m in done["results"])
    # Both workers answer for it: the state is in the shared store, not in one worker.
    for _ in range(60):
        assert poll(proxy, job)["status"] == "ok"
    pids = {line["pid"] for line in proxy.log_lines()
            if line.get("message") == "request" and line.get("path") == job["url"]
            and line.get("status") == 200}
    assert len(pids) == 2, f"expected both workers to answer, got {pids}"


def test_job_keeps_running_after_its_client_went_away_and_respects_its_deadline(
        proxy, kernel_id):
    job = submit(proxy, kernel_id, "import time\nwhile True: time.sleep(0.05)", timeout=2)
    done = wait_for(proxy, job, lambda s: s["status"] != "running")
    assert done["status"] == "timeout"
    assert done["error"]["ename"] == "ExecutionTimeout"
    sync = requests.post(f"{proxy.url}/execute_code", timeout=60,
                         json={"id": kernel_id, "code": "1 + 1"}).json()
    assert sync["status"] == "ok"


def test_job_of_a_dead_worker_says_lost_instead_of_running(proxy, kernel_id):
    job = submit(proxy, kernel_id, "import time; time.sleep(120)")
    [owner] = [line["pid"] for line in proxy.log_lines()
               if line.get("message") == "job submitted"
               and line.get("execution_id") == job["execution_id"]]
    os.kill(owner, signal.SIGKILL)
    lost = wait_for(proxy, job, lambda s: s["status"] != "running", timeout=40)
    assert lost["status"] == "lost"
    assert lost["failure"]["error"] == "job_lost"
    assert lost["finished_at"] is not None
    # The service keeps working: gunicorn replaces the worker, the kernel can be stopped.
    interrupted = requests.post(f"{proxy.url}/interrupt_kernel", json={"id": kernel_id},
                                timeout=60)
    assert interrupted.status_code == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answer = requests.post(f"{proxy.url}/execute_code", timeout=60,
                               json={"id": kernel_id, "code": "1 + 1", "timeout": 10}).json()
        if answer["status"] == "ok":
            break
    assert answer["status"] == "ok"


def test_unknown_and_malformed_execution_ids_are_404(proxy):
    for execution_id in (UNKNOWN, "not-a-uuid", "1' OR '1'='1"):
        response = requests.get(f"{proxy.url}/executions/{execution_id}", timeout=30)
        assert response.status_code == 404
        assert response.json()["error"] == "execution_not_found"


def test_bad_job_requests_are_refused_before_anything_runs(proxy, kernel_id):
    for body, status, code in (
            ({"id": UNKNOWN, "code": "1"}, 404, "kernel_not_found"),
            ({"id": kernel_id, "code": "1", "timeout": -1}, 400, "invalid_request"),
            ({"id": kernel_id, "code": "1", "mode": "later"}, 400, "invalid_request")):
        response = requests.post(f"{proxy.url}/execute_code", timeout=30,
                                 json={**body, "mode": body.get("mode", "async")})
        assert (response.status_code, response.json()["error"]) == (status, code), body


def test_finished_jobs_are_forgotten_after_the_retention_time(settings, kernel, tmp_path):
    http = create_app(settings.replace(job_store=str(tmp_path / "jobs.sqlite3"),
                                       job_retention=1.0)).test_client()
    status, job = post(http, "/execute_code", {"id": kernel, "code": "1", "mode": "async"})
    assert status == 202
    deadline = time.monotonic() + 30
    while http.get(job["url"]).get_json()["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert http.get(job["url"]).status_code == 200
    time.sleep(1.5)
    assert http.get(job["url"]).status_code == 404


def test_jobs_past_the_running_limit_are_429(settings, kernel, tmp_path):
    http = create_app(settings.replace(job_store=str(tmp_path / "jobs.sqlite3"),
                                       max_running_jobs=1)).test_client()
    status, first = post(http, "/execute_code",
                         {"id": kernel, "code": "import time; time.sleep(2)", "mode": "async"})
    assert status == 202
    status, body = post(http, "/execute_code", {"id": kernel, "code": "1", "mode": "async"})
    assert status == 429 and body["error"] == "too_many_jobs"
    assert "JUPYTER_MAX_RUNNING_JOBS" in body["message"]
    deadline = time.monotonic() + 30
    while http.get(first["url"]).get_json()["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert post(http, "/execute_code", {"id": kernel, "code": "1", "mode": "async"})[0] == 202


def test_jobs_queue_on_a_kernel_past_the_limit_of_waiting_executions(settings, kernel, tmp_path):
    """JUPYTER_MAX_QUEUED_EXECUTIONS refuses waiting requests, not jobs: a job that got its 202
    runs (jobs have their own limit)."""
    http = create_app(settings.replace(job_store=str(tmp_path / "jobs.sqlite3"),
                                       max_queued_executions=1)).test_client()
    jobs = []
    for index in range(4):
        status, job = post(http, "/execute_code", {
            "id": kernel, "code": f"import time; time.sleep(0.3); print({index})",
            "mode": "async"})
        assert status == 202, job
        jobs.append(job)
    deadline = time.monotonic() + 30
    while any(http.get(job["url"]).get_json()["status"] == "running" for job in jobs):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    states = [http.get(job["url"]).get_json() for job in jobs]
    assert [(s["status"], s["stdout"]) for s in states] == [
        ("ok", f"{index}\n") for index in range(4)], states


def test_the_job_store_file_is_private_and_made_only_when_needed(settings, kernel, tmp_path):
    path = tmp_path / "jobs.sqlite3"
    http = create_app(settings.replace(job_store=str(path))).test_client()
    assert not path.exists(), "no job, no store file"
    assert post(http, "/execute_code", {"id": kernel, "code": "1", "mode": "async"})[0] == 202
    assert path.stat().st_mode & 0o077 == 0
    shared = tmp_path / "shared.sqlite3"
    shared.touch(mode=0o644)
    shared.chmod(0o644)
    http = create_app(settings.replace(job_store=str(shared))).test_client()
    assert post(http, "/execute_code", {"id": kernel, "code": "1", "mode": "async"})[0] == 202
    assert shared.stat().st_mode & 0o077 == 0, "an existing store is made private"


def test_a_job_store_planted_as_a_symlink_is_refused(settings, kernel, tmp_path):
    target = tmp_path / "elsewhere.sqlite3"
    target.touch()
    link = tmp_path / "jobs.sqlite3"
    link.symlink_to(target)
    http = create_app(settings.replace(job_store=str(link))).test_client()
    status, body = post(http, "/execute_code", {"id": kernel, "code": "1", "mode": "async"})
    assert status == 503 and body["error"] == "jobs_unavailable"
    assert "symbolic links" in body["message"]


def test_a_job_store_in_a_directory_others_can_write_is_refused(settings, kernel, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp: anyone could plant its -wal and -shm files
    http = create_app(settings.replace(job_store=str(shared / "jobs.sqlite3"))).test_client()
    status, body = post(http, "/execute_code", {"id": kernel, "code": "1", "mode": "async"})
    assert status == 503 and body["error"] == "jobs_unavailable"
    assert "other users can write" in body["message"]
    assert not (shared / "jobs.sqlite3").exists()


def test_a_stopping_worker_refuses_new_jobs(settings, kernel, tmp_path, monkeypatch):
    """A job would keep a stopping worker (which serves no one) alive: another worker takes
    it."""
    import threading

    from app import jobs

    monkeypatch.setattr(jobs, "_stopping", threading.Event())
    http = create_app(settings.replace(job_store=str(tmp_path / "jobs.sqlite3"))).test_client()
    assert post(http, "/execute_code", {"id": kernel, "code": "1", "mode": "async"})[0] == 202
    jobs.stop_taking_jobs()
    status, body = post(http, "/execute_code", {"id": kernel, "code": "1", "mode": "async"})
    assert status == 503 and body["error"] == "jobs_unavailable"
    assert "submit it again" in body["message"]
    assert post(http, "/execute_code", {"id": kernel, "code": "1"})[0] == 200


def test_a_job_store_that_fails_answers_503_not_500(settings, kernel, tmp_path):
    broken = tmp_path / "jobs.sqlite3"
    broken.write_bytes(b"this is not a database " * 100)
    broken.chmod(0o600)
    http = create_app(settings.replace(job_store=str(broken))).test_client()
    status, body = post(http, "/execute_code", {"id": kernel, "code": "1", "mode": "async"})
    assert status == 503 and body["error"] == "jobs_unavailable", body
    assert "try again later" in body["message"]
    status, answer = post(http, "/execute_code", {"id": kernel, "code": "2 + 2"})
    assert status == 200 and answer["status"] == "ok"  # plain executions are still served


@pytest.mark.parametrize("where", ["missing-dir/jobs.sqlite3", "."])
def test_a_job_store_path_that_cannot_be_a_file_is_a_settings_error(settings, tmp_path, where):
    from app.settings import SettingsError

    with pytest.raises(SettingsError, match="JUPYTER_JOB_STORE"):
        settings.replace(job_store=str(tmp_path / where))


def test_output_printed_before_a_silent_stretch_is_visible_while_it_runs(proxy, kernel_id):
    job = submit(proxy, kernel_id, "import time\nprint('loaded data', flush=True)\n"
                                   "time.sleep(5)\n'done'")
    running = wait_for(proxy, job, lambda s: s["stdout"] == "loaded data\n", timeout=4)
    assert running["status"] == "running"
    done = wait_for(proxy, job, lambda s: s["status"] != "running")
    assert done["status"] == "ok" and done["stdout"] == "loaded data\n"


def test_a_worker_due_for_recycling_finishes_its_jobs_and_keeps_serving(jupyter_server,
                                                                        tmp_path):
    """gunicorn recycles workers (max_requests): a job must end, not read lost, and the proxy
    must keep answering meanwhile (a replacement starts only once the old worker exits).
    """
    config = tmp_path / "gunicorn.conf.py"
    # Every request reaches max_requests, the submission too.
    config.write_text("max_requests = 1\nmax_requests_jitter = 0\n")
    store = str(tmp_path / "jobs.sqlite3")
    with proxy_for(jupyter_server, "--workers", "1", "--gunicorn-config", str(config),
                   env={"JUPYTER_JOB_STORE": store}) as proxy:
        kernel = requests.post(f"{proxy.url}/start_kernel", timeout=120).json()["id"]
        # The worker may recycle right after the start (nothing runs then): that one refuses
        # the job, and the next takes it.
        job = submit(proxy, kernel, "import time\nprint('start', flush=True)\n"
                                    "time.sleep(6)\nprint('end')", again_if_recycling=True)
        worker = [line["pid"] for line in proxy.log_lines()
                  if line.get("message") == "job submitted"][0]
        for _ in range(6):  # past max_requests while the job runs
            started = time.monotonic()
            health = requests.get(f"{proxy.url}/health", timeout=30,
                                  headers={"Connection": "close"})
            assert health.ok and time.monotonic() - started < 2, \
                "the proxy keeps answering while a worker with a job is due for recycling"
        assert poll(proxy, job)["status"] == "running"
        done = wait_for(proxy, job, lambda s: s["status"] != "running", timeout=60)
        assert done["status"] == "ok", done
        assert done["stdout"] == "start\nend\n"
        for _ in range(3):  # the job is over: now the worker is recycled
            requests.get(f"{proxy.url}/health", timeout=30, headers={"Connection": "close"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            served = {line["pid"] for line in proxy.log_lines()
                      if line.get("message") == "request"}
            if served - {worker}:
                break
            requests.get(f"{proxy.url}/health", timeout=30, headers={"Connection": "close"})
            time.sleep(0.2)
        assert served - {worker}, "the worker was recycled once its job was done"
        requests.post(f"{proxy.url}/shutdown_kernel", json={"id": kernel}, timeout=60)


def test_a_progress_save_gives_up_quickly_on_a_busy_store(tmp_path):
    """Progress saves run in the job's thread: a store locked by another writer must delay the
    execution by a moment, not by the 10 s an end or a submission may wait."""
    import sqlite3

    from app.jobs import PROGRESS_BUSY_SECONDS, SqliteJobStore

    store = SqliteJobStore(tmp_path / "jobs.sqlite3", retention=60)
    store.create("j", "k", "here:1", {"stdout": ""})
    writer = sqlite3.connect(tmp_path / "jobs.sqlite3", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another worker's long write
    try:
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            store.save_progress("j", {"stdout": "so far"})
        assert time.monotonic() - started < PROGRESS_BUSY_SECONDS + 1
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    store.save_progress("j", {"stdout": "so far"})
    assert store.get("j")["answer"]["stdout"] == "so far"


def test_a_job_marked_lost_never_turns_running_again_but_its_real_end_wins(tmp_path):
    from app.jobs import LOST, SqliteJobStore

    store = SqliteJobStore(tmp_path / "jobs.sqlite3", retention=60)
    store.create("j", "k", "elsewhere:1", {"stdout": ""})
    heartbeat = store.get("j")["heartbeat"]
    assert store.mark_lost("j", heartbeat, {"error": "job_lost", "message": "gone"})
    store.save_progress("j", {"stdout": "late"})
    assert store.get("j")["status"] == LOST
    assert store.get("j")["answer"] == {"stdout": ""}
    assert not store.mark_lost("j", heartbeat, {"error": "job_lost", "message": "again"})
    store.finish("j", "ok", {"stdout": "all"})
    assert store.get("j")["status"] == "ok" and store.get("j")["answer"] == {"stdout": "all"}


def test_a_job_is_not_marked_lost_over_a_fresh_heartbeat(tmp_path):
    from app.jobs import SqliteJobStore

    store = SqliteJobStore(tmp_path / "jobs.sqlite3", retention=60)
    store.create("j", "k", "elsewhere:1", {})
    stale = store.get("j")["heartbeat"]
    time.sleep(0.01)
    store.beat(["j"])
    assert not store.mark_lost("j", stale, {"error": "job_lost", "message": "gone"})
    assert store.get("j")["status"] == "running"


class _BreakingExecution:
    """An execution whose upstream breaks after some output."""

    answer = None
    output_bytes = 8

    def updates(self):
        yield {"type": "stdout", "text": "partial\n"}
        from app.kernels.errors import ConnectionLost

        raise ConnectionLost("the websocket to the kernel broke")

    def partial_answer(self):
        return {"status": "running", "results": [], "stdout": "partial\n", "stderr": "",
                "outputs": [], "error": None, "execution_count": None, "truncated": False}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class _BreakingManager:
    def check_request(self, kernel_id, code, timeout):
        return 10.0

    def describe_kernel(self, kernel_id):
        return {"id": kernel_id}

    def begin_execution(self, kernel_id, code, timeout, poll=None, queue_limited=True):
        return _BreakingExecution()


def test_a_job_whose_upstream_fails_ends_failed_with_the_error_and_its_output(tmp_path):
    from app.errors import failure_body
    from app.jobs import JobRunner, SqliteJobStore

    runner = JobRunner(_BreakingManager(), SqliteJobStore(tmp_path / "jobs.sqlite3", 60),
                       max_running=4, describe_failure=failure_body)
    job = runner.submit(UNKNOWN, "1", None)
    deadline = time.monotonic() + 10
    while (state := runner.get(job["execution_id"]))["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert state["status"] == "failed"
    assert state["failure"]["error"] == "upstream_connection_lost"
    assert state["stdout"] == "partial\n", "what came before the failure is kept"
    assert state["finished_at"] is not None
