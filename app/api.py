"""The HTTP endpoints: thin views that validate, make one call into the kernel layer, answer."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app

from app import schemas
from app.kernels import KernelManager
from app.metrics import render

bp = Blueprint("api", __name__)

# Built once: a marshmallow schema is costly to build and safe to share between threads.
START_KERNEL = schemas.StartKernelSchema()
EXECUTE_CODE = schemas.ExecuteCodeSchema()
SHUTDOWN_KERNEL = schemas.ShutdownKernelSchema()


def kernels() -> KernelManager:
    """The worker's kernel manager, shared by its threads."""
    return current_app.extensions["kernel_manager"]


@bp.post("/start_kernel")
def start_kernel() -> dict[str, Any]:
    """Start a kernel and answer once it can execute code."""
    body = schemas.load_body(START_KERNEL, optional=True)
    return kernels().start_kernel(body.get("name"))


@bp.post("/execute_code")
def execute_code() -> dict[str, Any]:
    """Run code on a kernel and answer with its output, whatever the code did."""
    body = schemas.load_body(EXECUTE_CODE)
    return kernels().execute_code(body["id"], body["code"], body.get("timeout"))


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
