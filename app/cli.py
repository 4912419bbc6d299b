"""The `jupyter-kernel-proxy` command: the app served by gunicorn (gthread), optionally in
front of an embedded Jupyter server that lives and dies with the proxy.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from gunicorn.app.base import Application

from app import __version__, create_app
from app.embedded import EmbeddedJupyterServer, EmbeddedServerError, keep_environment_private
from app.kernels.execution import INTERRUPT_GRACE_SECONDS
from app.kernels.locks import lock_directory
from app.logs import StructuredLogger, configure_logging, register_secrets
from app.metrics import MULTIPROC_DIR, worker_exited
from app.settings import Settings, SettingsError, environment_with_dotenv, is_loopback
from app.worker import WORKER_CLASS

# An embedded server is ours alone: keep a ready kernel per worker unless told otherwise.
EMBEDDED_POOL_SIZE = 1

# The project's gunicorn.conf.py: next to the package in a source checkout (editable install),
# else where a wheel installs it.
GUNICORN_CONFIG_PLACES = (
    Path(__file__).resolve().parent.parent / "gunicorn.conf.py",
    Path(sys.prefix) / "share" / "jupyter-kernel-proxy" / "gunicorn.conf.py",
)


def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag left out falls back to the environment, then defaults."""
    parser = argparse.ArgumentParser(
        prog="jupyter-kernel-proxy",
        description="Serve an HTTP API that starts Jupyter kernels, runs code on them and "
                    "shuts them down.",
    )
    parser.add_argument("--server-url", help="Jupyter server URL (JUPYTER_SERVER_URL)")
    parser.add_argument("--token", help="Jupyter server token (JUPYTER_TOKEN; prefer the "
                        "environment: a command line is visible to other users)")
    parser.add_argument("--allow-unauthenticated", action="store_true", default=None,
                        help="listen on a network address without an API key (dangerous: "
                        "anyone who reaches the proxy runs code)")
    parser.add_argument("--embedded", action="store_true",
                        help="start a private Jupyter server on loopback and use it")
    parser.add_argument("--host", help="address to listen on (default: 127.0.0.1, or the "
                        "host of JUPYTER_PROXY_BIND)")
    parser.add_argument("--port", type=int, help="port to listen on (default: 8000, or the "
                        "port of JUPYTER_PROXY_BIND)")
    parser.add_argument("--workers", type=int, help="gunicorn worker processes "
                        "(default: JUPYTER_PROXY_WORKERS or 2)")
    parser.add_argument("--threads", type=int, help="threads per worker "
                        "(default: JUPYTER_PROXY_THREADS or 16)")
    parser.add_argument("--pool-size", type=int, help="ready kernels each worker keeps "
                        f"(JUPYTER_POOL_SIZE; default 0, or {EMBEDDED_POOL_SIZE} with --embedded)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARN or ERROR (JUPYTER_LOG_LEVEL)")
    parser.add_argument("--env-file", default=".env", help="dotenv file to read "
                        "(default: %(default)s, if present)")
    parser.add_argument("--gunicorn-config",
                        help="gunicorn config file (default: the project's gunicorn.conf.py)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line, checked for flags that contradict each other."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.embedded and args.server_url:
        parser.error("--embedded starts its own Jupyter server: leave out --server-url")
    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"--port must be between 1 and 65535 (got {args.port})")
    for name in ("workers", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.pool_size is not None and args.pool_size < 0:
        parser.error("--pool-size must be 0 or more")
    return args


class ProxyApplication(Application):
    """gunicorn serving `create_app(settings)`, configured by a file and then by the flags."""

    def __init__(self, settings: Settings, config_file: str | None,
                 options: dict[str, Any]) -> None:
        self.settings = settings
        self.config_file = config_file
        self.options = options
        super().__init__()

    def init(self, parser: Any, opts: Any, args: Any) -> None:
        return None

    def load_config(self) -> None:
        if self.config_file:
            self.load_config_from_file(self.config_file)
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return create_app(self.settings)


def main(argv: list[str] | None = None) -> int:
    """Runs the proxy until SIGINT or SIGTERM; returns the exit status."""
    args = parse_args(argv)
    environ = environment_with_dotenv(args.env_file)
    pool_size = args.pool_size
    if pool_size is None and args.embedded and "JUPYTER_POOL_SIZE" not in environ:
        pool_size = EMBEDDED_POOL_SIZE
    try:
        settings = Settings.from_environment(environ, server_url=args.server_url,
                                             token=args.token, log_level=args.log_level,
                                             proxy_workers=args.workers,
                                             proxy_threads=args.threads, pool_size=pool_size,
                                             allow_unauthenticated=args.allow_unauthenticated)
    except SettingsError as err:
        print(f"jupyter-kernel-proxy: {err}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.secrets)
    log = StructuredLogger("app.cli")
    keep_environment_private()
    config_file = args.gunicorn_config or next(
        (str(p) for p in GUNICORN_CONFIG_PLACES if p.is_file()), None)
    if config_file is None or not Path(config_file).is_file():
        log.warning("gunicorn config file not found; using the proxy's own defaults",
                    path=config_file)
        config_file = None
    default_host, _, default_port = settings.proxy_bind.rpartition(":")
    host, port = (args.host or default_host).strip("[]"), args.port or int(default_port)
    refusal = settings.unsafe_bind(host)
    if refusal:
        print(f"jupyter-kernel-proxy: {refusal}", file=sys.stderr)
        return 2
    if settings.allow_unauthenticated:
        os.environ["JUPYTER_ALLOW_UNAUTHENTICATED"] = "1"  # for gunicorn.conf.py's own check
    if not settings.api_keys and not is_loopback(host):
        log.warning("LISTENING ON A NETWORK ADDRESS WITHOUT AN API KEY: anyone who reaches "
                    "this proxy can run code on its kernels", bind=host)
    # The settings that matter are set here too, so that the proxy runs right without a file.
    options: dict[str, Any] = {
        "bind": [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"],
        "worker_class": WORKER_CLASS,  # gthread, finishing async jobs before it exits
        "workers": settings.proxy_workers,
        "threads": settings.proxy_threads,
        "logger_class": "app.logs.GunicornLogger",
        "control_socket_disable": True,
        "loglevel": settings.log_level.lower(),
        "proc_name": "jupyter-kernel-proxy",
        "on_starting": lambda server: None,  # the bind was checked above, with these settings
        "worker_tmp_dir": "/dev/shm" if os.path.isdir("/dev/shm") else None,
        # On SIGTERM, in-flight executions may run to their deadline and be interrupted.
        "graceful_timeout": math.ceil(settings.execution_timeout + INTERRUPT_GRACE_SECONDS) + 10,
    }
    metrics_dir = None
    if not os.environ.get(MULTIPROC_DIR):
        # Every worker counts into this directory; any of them answers GET /metrics.
        metrics_dir = tempfile.mkdtemp(prefix="jupyter-kernel-proxy-metrics-")
        os.environ[MULTIPROC_DIR] = metrics_dir
    options["child_exit"] = lambda server, worker: worker_exited(worker.pid)
    master_pid = os.getpid()
    embedded = None
    jobs_dir = None
    try:
        if args.embedded:
            embedded = EmbeddedJupyterServer(startup_timeout=settings.kernel_start_timeout)
            embedded.start()
            embedded.supervise()  # started again, same URL, if it dies under us
            register_secrets([embedded.token])
            settings = settings.replace(server_url=embedded.url, token=embedded.token)
            if not settings.job_store:
                # This run's jobs go with it (the embedded server's URL is new every time).
                jobs_dir = tempfile.mkdtemp(prefix="jupyter-kernel-proxy-jobs-")
                settings = settings.replace(job_store=str(Path(jobs_dir) / "jobs.sqlite3"))
        log.info("proxy starting", bind=options["bind"][0], upstream=settings.server_url,
                 embedded=args.embedded)
        ProxyApplication(settings, config_file, options).run()
    except EmbeddedServerError as err:
        log.error(str(err))
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        # gunicorn's workers are forks of this process and leave through here too: only the
        # process that started the embedded server may stop it.
        if os.getpid() == master_pid:
            if embedded is not None:
                embedded.stop()
                # Its URL is new every run: its kernels' lock files are of no further use.
                shutil.rmtree(lock_directory(embedded.url), ignore_errors=True)
            for directory in (metrics_dir, jobs_dir):
                if directory is not None:
                    shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
