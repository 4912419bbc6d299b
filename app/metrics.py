"""Prometheus metrics, counted in every gunicorn worker and read from any of them.

With `PROMETHEUS_MULTIPROC_DIR` set (the CLI and gunicorn.conf.py set it), prometheus_client
keeps each process's values in files there and `render()` adds them up, so `GET /metrics`
shows the whole service whichever worker answers. Without it (flask run, the Python API),
the values are this process's.

prometheus_client picks its mode when it is first imported, and the CLI sets the directory
after importing this module: so prometheus_client is imported, and the metrics made, on first
use (in the workers), never at import.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


@dataclass(frozen=True)
class Metrics:
    """Every metric the proxy keeps."""

    executions: Any  # prometheus_client.Counter, and so on
    execution_seconds: Any
    request_seconds: Any
    kernels_started: Any
    kernels_shut_down: Any
    upstream_errors: Any
    open_websockets: Any


_made: list[Metrics] = []
_making = threading.Lock()


def metrics() -> Metrics:
    """The process's metrics, made on first use (once, whichever thread comes first)."""
    if _made:
        return _made[0]
    with _making:
        if not _made:
            _made.append(_make())
    return _made[0]


def _make() -> Metrics:
    from prometheus_client import Counter, Gauge, Histogram

    return Metrics(
        executions=Counter("jupyter_proxy_executions", "Executions, by how they ended.",
                           ["status"]),
        execution_seconds=Histogram("jupyter_proxy_execution_seconds",
                                    "Time from an execution request to its answer.",
                                    buckets=SECONDS),
        request_seconds=Histogram("jupyter_proxy_request_seconds",
                                  "Time to answer an HTTP request, by endpoint and status.",
                                  ["endpoint", "status"], buckets=SECONDS),
        kernels_started=Counter("jupyter_proxy_kernels_started", "Kernels started.",
                                ["source"]),
        kernels_shut_down=Counter("jupyter_proxy_kernels_shut_down", "Kernels shut down."),
        upstream_errors=Counter("jupyter_proxy_upstream_errors",
                                "Failures talking to the Jupyter server, by kind.", ["kind"]),
        open_websockets=Gauge("jupyter_proxy_open_websockets",
                              "Websockets to kernels kept open (warm) by the workers.",
                              multiprocess_mode="livesum"),
    )


def render() -> tuple[bytes, str]:
    """The metrics in Prometheus' text format, and its content type."""
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        REGISTRY,
        CollectorRegistry,
        generate_latest,
        multiprocess,
    )

    metrics()  # so that a worker that has counted nothing yet still lists every metric
    if os.environ.get(MULTIPROC_DIR):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST


def worker_exited(pid: int) -> None:
    """gunicorn's child_exit hook: a dead worker's live gauges no longer count."""
    if os.environ.get(MULTIPROC_DIR):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
