"""Structured logs: JSON lines with timezone-aware timestamps and context, never a secret."""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime

import pytest

from app import StructuredLogger, create_app
from app.logs import JsonFormatter, configure_logging, register_secrets


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_structured_logger_writes_one_json_object_with_context(log_stream):
    StructuredLogger("app.test").info("kernel started", kernel_id="abc", duration_ms=12.5)
    [entry] = lines(log_stream)
    assert entry["message"] == "kernel started"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "app.test"
    assert entry["kernel_id"] == "abc" and entry["duration_ms"] == 12.5
    timestamp = datetime.fromisoformat(entry["timestamp"])
    assert timestamp.tzinfo is not None and timestamp.utcoffset().total_seconds() == 0


def test_exceptions_are_logged_as_one_line(log_stream):
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        StructuredLogger("app.test").exception("failed")
    [entry] = lines(log_stream)
    assert "RuntimeError: boom" in entry["exception"]


def test_registered_secrets_never_reach_a_log_line(log_stream):
    register_secrets(["s3cret-token-value"])
    logging.getLogger("anything").warning("url http://h/?token=s3cret-token-value failed")
    StructuredLogger("app.test").info("x", header="token s3cret-token-value")
    output = log_stream.getvalue()
    assert "s3cret-token-value" not in output
    assert output.count("[redacted]") == 2


@pytest.mark.parametrize("shown", [
    lambda key: key,                                        # as it is
    repr,                                                   # a repr(): its backslash doubled
    lambda key: "token=k3y%22with%5Codd%20chars%2B/%26%3D",  # URL-encoded, "/" kept
    lambda key: "token=k3y%22with%5codd+chars%2b%2f%26%3d",  # form-encoded, lower-case hex
], ids=["raw", "repr", "quoted", "form-lower"])
def test_secrets_are_redacted_however_a_log_line_escapes_them(log_stream, shown):
    odd = 'k3y"with\\odd chars+/&='
    register_secrets([odd])
    StructuredLogger("app.test").warning("refused", value=shown(odd))
    output = log_stream.getvalue()
    assert "k3y" not in output, output
    assert "[redacted]" in json.loads(output)["value"]


def test_formatter_renders_plain_records_too():
    record = logging.LogRecord("gunicorn.error", logging.INFO, __file__, 1, "Booting %s",
                               ("worker",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "Booting worker" and entry["logger"] == "gunicorn.error"


def test_each_request_is_logged_with_method_path_status_duration(settings, log_stream):
    http = create_app(settings).test_client()
    http.post("/shutdown_kernel", json={"id": "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"})
    http.get("/health")
    requests_logged = [e for e in lines(log_stream) if e["message"] == "request"]
    assert [(e["method"], e["path"], e["status"]) for e in requests_logged] == [
        ("POST", "/shutdown_kernel", 404), ("GET", "/health", 200)]
    assert requests_logged[0]["kernel_id"] == "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"
    assert all(e["duration_ms"] >= 0 for e in requests_logged)


def test_upstream_page_with_token_never_reaches_logs_or_answers(settings, log_stream):
    # jupyter_server answers a websocket to an unknown kernel with a 404 page that embeds its
    # token; neither the log nor the client may see it.
    configure_logging("DEBUG", stream=log_stream)  # no secrets registered: the code must not leak
    http = create_app(settings).test_client()
    response = http.post("/execute_code",
                         json={"id": "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b", "code": "1"})
    assert response.status_code == 404
    assert settings.token not in response.get_data(as_text=True)
    assert settings.token not in log_stream.getvalue()
