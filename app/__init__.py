"""jupyter-kernel-proxy: start Jupyter kernels, run code on them and shut them down over HTTP.

`create_app()` builds the Flask app; `Settings`, `StructuredLogger`, `JupyterClient` and
`KernelManager` are the synchronous Python API.
"""

from __future__ import annotations

import atexit
import re
import time
import uuid
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request

from app.kernels import JupyterClient, KernelManager
from app import logs
from app.logs import StructuredLogger
from app.metrics import metrics
from app.settings import Settings, waiting_limit

__all__ = ["JupyterClient", "KernelManager", "Settings", "StructuredLogger", "create_app"]

try:
    __version__ = version("jupyter-kernel-proxy")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"


def create_app(config: Settings | Mapping[str, Any] | None = None) -> Flask:
    """Builds the app. `config` is a `Settings`, or overrides of settings fields (tests);
    without it, settings come from the `JUPYTER_*` environment.
    """
    from app.api import bp
    from app.errors import register_error_handlers
    from app.guards import register_guards
    from app.openapi import register_openapi

    if isinstance(config, Settings):
        settings = config
    else:
        settings = Settings.from_environment(**dict(config or {}))
    app = Flask(__name__, static_folder=None)  # an API: no /static route
    app.config.update(SETTINGS=settings, VERSION=__version__,
                      MAX_CONTENT_LENGTH=settings.max_request_bytes,
                      PROVIDE_AUTOMATIC_OPTIONS=False)  # OPTIONS gets the JSON 405 too
    app.json.sort_keys = False
    logger = StructuredLogger("app")
    client = JupyterClient(settings, logger.child("upstream"))
    manager = KernelManager(client, logger.child("kernels"),
                            max_waiting_total=waiting_limit(settings.proxy_threads))
    app.extensions["kernel_manager"] = manager
    app.extensions["jobs"] = _job_runner(settings, manager, logger.child("jobs"))
    if settings.pool_size:
        manager.warm_up()
        app.before_request(manager.warm_up)  # again in a forked worker (cheap when running)
        atexit.register(manager.close)  # pooled kernels go when the worker goes
    _log_requests(app, logger.child("requests"))  # first, so that refusals are timed too
    register_error_handlers(app)
    register_guards(app)
    app.register_blueprint(bp)
    register_openapi(app)
    return app


def _job_runner(settings: Settings, manager: KernelManager, logger: StructuredLogger) -> Any:
    """The runner of async jobs, with its store: `JUPYTER_JOB_STORE`, or a file in the
    private directory of this server's kernel locks (None if there is neither).
    """
    from app.errors import failure_body
    from app.jobs import JobRunner, SqliteJobStore
    from app.kernels.locks import private_directory

    if settings.job_store:
        path = Path(settings.job_store)
    else:
        directory = private_directory(settings.server_url)
        if directory is None:
            logger.warning("async jobs are off: no private directory for their store; set "
                           "JUPYTER_JOB_STORE")
            return None
        path = directory / "jobs.sqlite3"
    store = SqliteJobStore(path, settings.job_retention)
    return JobRunner(manager, store, settings.max_running_jobs, failure_body, logger)


REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _log_requests(app: Flask, logger: StructuredLogger) -> None:
    """One JSON line per request (method, path, status, duration, kernel id), and a request id
    (the client's `X-Request-ID` if it is a sane one, else a new one) on every log line written
    while serving it and on the answer.
    """

    @app.before_request
    def _start_clock() -> None:
        g.started = time.monotonic()
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        g.request_id_token = logs.request_id.set(g.request_id)

    @app.after_request
    def _log(response: Response) -> Response:
        started = g.get("started")
        elapsed = time.monotonic() - started if started else None
        logger.info("request", method=request.method, path=request.path,
                    status=response.status_code, kernel_id=g.get("kernel_id"),
                    duration_ms=round(elapsed * 1000, 2) if elapsed is not None else None)
        if elapsed is not None:
            endpoint = request.url_rule.rule if request.url_rule else "(no route)"
            metrics().request_seconds.labels(endpoint, str(response.status_code)) \
                .observe(elapsed)
        if g.get("request_id"):
            response.headers["X-Request-ID"] = g.request_id
        return response

    @app.teardown_request
    def _forget_request_id(_: BaseException | None) -> None:
        token = g.pop("request_id_token", None)
        if token is not None:
            logs.request_id.reset(token)
