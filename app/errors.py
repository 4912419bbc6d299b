"""Every non-2xx answer in one JSON shape: `{"error", "message", "details"?}`.

Exceptions of the kernel layer, marshmallow's `ValidationError` and werkzeug's HTTP errors
(404/405/413/415 ...) are mapped here, in one place. Bodies never carry upstream text, tokens
or stack traces.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from flask import Flask, Response, g, jsonify
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from app.jobs import JobStoreError, WorkerStopping
from app.kernels import errors as kernel_errors
from app.logs import StructuredLogger
from app.metrics import metrics

# Most specific first: the first matching class decides.
KERNEL_ERROR_STATUS: list[tuple[type[kernel_errors.KernelError], int, str]] = [
    (kernel_errors.InvalidRequest, 400, "invalid_request"),
    (kernel_errors.ClientGone, 400, "client_gone"),
    (kernel_errors.KernelSpecNotFound, 400, "unknown_kernel_spec"),
    (kernel_errors.KernelNotFound, 404, "kernel_not_found"),
    (kernel_errors.CodeTooLarge, 413, "code_too_large"),
    (kernel_errors.TooManyKernels, 429, "too_many_kernels"),
    (kernel_errors.KernelBusy, 429, "kernel_busy"),
    (kernel_errors.UpstreamAuthError, 502, "upstream_auth_failed"),
    (kernel_errors.ConnectionLost, 502, "upstream_connection_lost"),
    (kernel_errors.UpstreamError, 502, "bad_upstream_response"),
    (kernel_errors.UpstreamUnavailable, 503, "upstream_unavailable"),
    (kernel_errors.UpstreamTimeout, 504, "upstream_timeout"),
    (kernel_errors.KernelError, 502, "kernel_error"),
]

HTTP_ERROR_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 429: "too_many_requests",
    413: "request_too_large", 414: "uri_too_long", 415: "unsupported_media_type",
    417: "expectation_failed", 431: "headers_too_large", 500: "internal_error",
    501: "not_implemented",
}

log = StructuredLogger(__name__)


class ApiError(Exception):
    """An error raised by the web layer itself (auth, content type)."""

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


def status_of(err: kernel_errors.KernelError) -> tuple[int, str]:
    """The HTTP status and error code of a kernel-layer error (5xx ones are logged here)."""
    status, code = next((s, c) for cls, s, c in KERNEL_ERROR_STATUS if isinstance(err, cls))
    if status >= 500:
        log.warning("upstream failure", error=code, reason=err.message)
        metrics().upstream_errors.labels(code).inc()
    return status, code


def failure_body(err: Exception) -> dict[str, Any]:
    """The error shape for a failure that cannot be an HTTP status any more (a stream already
    answering 200, a job running in the background).
    """
    if isinstance(err, kernel_errors.KernelError):
        _, code = status_of(err)
        body: dict[str, Any] = {"error": code, "message": err.message}
        if err.details:
            body["details"] = err.details
        return body
    log.exception("unexpected error", error_type=type(err).__name__)
    return {"error": "internal_error",
            "message": "the proxy failed unexpectedly; the error has been logged"}


def error_response(status: int, code: str, message: str,
                   details: dict[str, Any] | None = None) -> tuple[Response, int]:
    """The one error shape of the API."""
    body: dict[str, Any] = {"error": code, "message": message}
    if details:
        body["details"] = details
    return jsonify(body), status


def register_error_handlers(app: Flask) -> None:
    """Routes every exception a request can raise to `error_response`."""

    @app.errorhandler(ApiError)
    def _api_error(err: ApiError) -> tuple[Response, int]:
        response, status = error_response(err.status, err.code, err.message, err.details)
        if status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"  # how to authenticate (RFC 9110)
        return response, status

    @app.errorhandler(kernel_errors.KernelError)
    def _kernel_error(err: kernel_errors.KernelError) -> tuple[Response, int]:
        status, code = status_of(err)
        details = err.details
        if not g.get("kernel_id") and details.get("kernel_id"):
            g.kernel_id = details["kernel_id"]  # for the request's log line (a start's)
        if isinstance(err, kernel_errors.InvalidRequest) and "field" in details:
            details = {"fields": {details["field"]: [err.message]}}  # as the schemas say it
        return error_response(status, code, err.message, details)

    @app.errorhandler(JobStoreError)
    def _job_store_error(err: JobStoreError) -> tuple[Response, int]:
        log.error("the job store cannot be used", reason=str(err))
        return error_response(503, "jobs_unavailable", f"async jobs are unavailable: {err}")

    @app.errorhandler(WorkerStopping)
    def _worker_stopping(err: WorkerStopping) -> tuple[Response, int]:
        return error_response(503, "jobs_unavailable", str(err))

    @app.errorhandler(sqlite3.Error)
    def _job_store_failure(err: sqlite3.Error) -> tuple[Response, int]:
        # The only database is the job store: locked past its busy timeout, disk full, ...
        log.error("the job store failed", reason=str(err), error_class=type(err).__name__)
        return error_response(503, "jobs_unavailable",
                              f"the job store failed ({err}); try again later")

    @app.errorhandler(ValidationError)
    def _validation_error(err: ValidationError) -> tuple[Response, int]:
        fields = err.messages if isinstance(err.messages, dict) else {"_body": err.messages}
        return error_response(400, "invalid_request",
                              "the request body has missing or invalid fields; see details",
                              {"fields": fields})

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> tuple[Response, int]:
        status = err.code or 500
        response, status = error_response(status, HTTP_ERROR_CODES.get(status, "http_error"),
                                          _http_message(err))
        if status == 405 and err.valid_methods:
            response.headers["Allow"] = ", ".join(err.valid_methods)
        return response, status

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> tuple[Response, int]:
        log.exception("unexpected error", error_type=type(err).__name__)
        return error_response(500, "internal_error",
                              "the proxy failed unexpectedly; the error has been logged")


def _http_message(err: HTTPException) -> str:
    if err.code == 404:
        return "no such endpoint; see the README for the API"
    if err.code == 405:
        return f"method not allowed; use {', '.join(sorted(err.valid_methods or []))}"
    if err.code == 413:
        return "the request body is larger than JUPYTER_MAX_REQUEST_BYTES allows"
    return err.description or "bad request"
