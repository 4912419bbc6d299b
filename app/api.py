"""The HTTP endpoints: thin views that validate, make one call into the kernel layer, answer."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, g, request

from app import schemas
from app.errors import ApiError
from app.jobs import JobRunner
from app.kernels import KernelManager
from app.kernels.protocol import is_canonical_uuid
from app.metrics import render
from app.streaming import NDJSON, client_gone, ndjson_response

bp = Blueprint("api", __name__)

# Built once: a marshmallow schema is costly to build and safe to share between threads.
START_KERNEL = schemas.StartKernelSchema()
EXECUTE_CODE = schemas.ExecuteCodeSchema()
SHUTDOWN_KERNEL = schemas.ShutdownKernelSchema()
INTERRUPT_KERNEL = schemas.InterruptKernelSchema()
RESTART_KERNEL = schemas.RestartKernelSchema()


def kernels() -> KernelManager:
    """The worker's kernel manager, shared by its threads."""
    return current_app.extensions["kernel_manager"]


@bp.post("/start_kernel")
def start_kernel() -> dict[str, Any]:
    """Start a kernel and answer once it can execute code."""
    body = schemas.load_body(START_KERNEL, optional=True)
    kernel = kernels().start_kernel(body.get("name"), poll=client_gone(request.environ))
    g.kernel_id = kernel["id"]  # for the request's log line
    return kernel


def jobs() -> JobRunner:
    """The worker's job runner (async executions)."""
    runner = current_app.extensions.get("jobs")
    if runner is None:
        raise ApiError(503, "jobs_unavailable",
                       "async jobs need a private directory for their store; set "
                       "JUPYTER_JOB_STORE to a file path only this user can write")
    return runner


@bp.post("/execute_code")
def execute_code() -> Any:
    """Run code on a kernel and answer with its output, whatever the code did: all at once,
    streamed as NDJSON (`"stream": true`), or as a job to poll (`"mode": "async"`).
    """
    body = schemas.load_body(EXECUTE_CODE)
    kernel_id, code, timeout = body["id"], body["code"], body.get("timeout")
    if body.get("mode") == "async":
        job = jobs().submit(kernel_id, code, timeout)
        if job is None:
            raise ApiError(429, "too_many_jobs",
                           "this worker already runs as many jobs as JUPYTER_MAX_RUNNING_JOBS "
                           "allows; poll the running ones and try again later")
        url = f"/executions/{job['execution_id']}"
        return {**job, "url": url}, 202, {"Location": url}
    if body.get("stream", _prefers_ndjson()):
        execution = kernels().begin_execution(kernel_id, code, timeout,
                                              poll=client_gone(request.environ))
        try:
            return ndjson_response(execution, request.environ)
        except BaseException:
            execution.close()  # no response will close it
            raise
    # A client that hangs up before the answer gets its code stopped, as a stream's would.
    return kernels().execute_code(kernel_id, code, timeout, poll=client_gone(request.environ))


def _prefers_ndjson() -> bool:
    """`Accept: application/x-ndjson` (ranked above JSON) asks for a stream."""
    accept = request.accept_mimetypes
    return accept[NDJSON] > accept["application/json"]


@bp.get("/executions/<execution_id>")
def get_execution(execution_id: str) -> dict[str, Any]:
    """An async job: its status and output so far, then its full answer."""
    job = jobs().get(execution_id) if is_canonical_uuid(execution_id) else None
    if job is None:
        raise ApiError(404, "execution_not_found",
                       "no such execution: the id is wrong, or it finished more than "
                       "JUPYTER_JOB_RETENTION seconds ago")
    return job


@bp.post("/interrupt_kernel")
def interrupt_kernel() -> dict[str, Any]:
    """Interrupt what the kernel runs; it keeps its state."""
    body = schemas.load_body(INTERRUPT_KERNEL)
    return kernels().interrupt_kernel(body["id"])


@bp.post("/restart_kernel")
def restart_kernel() -> dict[str, Any]:
    """Restart the kernel and answer once it can execute again; its state is lost."""
    body = schemas.load_body(RESTART_KERNEL)
    return kernels().restart_kernel(body["id"])


@bp.get("/kernels")
def list_kernels() -> dict[str, Any]:
    """The kernels the Jupyter server runs, unless JUPYTER_LIST_KERNELS is off."""
    if not current_app.config["SETTINGS"].list_kernels:
        raise ApiError(403, "kernel_listing_disabled",
                       "listing kernels is turned off on this proxy (JUPYTER_LIST_KERNELS)")
    return {"kernels": kernels().list_kernels()}


@bp.get("/kernelspecs")
def kernel_specs() -> dict[str, Any]:
    """The kernel specs `start_kernel` accepts, and the server's default."""
    return kernels().kernel_specs()


@bp.post("/shutdown_kernel")
def shutdown_kernel() -> dict[str, Any]:
    """Shut a kernel down."""
    body = schemas.load_body(SHUTDOWN_KERNEL)
    return kernels().shutdown_kernel(body["id"])


@bp.get("/metrics")
def prometheus_metrics() -> Response:
    """Prometheus metrics of every worker; needs the API key when one is set."""
    body, content_type = render()
    return Response(body, content_type=content_type)


@bp.get("/health")
def health() -> dict[str, Any]:
    """Say that the proxy serves; cheap, no upstream call, no key needed."""
    return {"status": "ok", "version": current_app.config["VERSION"]}
