"""gunicorn settings for jupyter-kernel-proxy.

Read by `jupyter-kernel-proxy` (its flags win over these) and by a plain
`gunicorn -c gunicorn.conf.py`. Values come from the proxy's settings: `JUPYTER_*` variables in
the environment or in `.env`, validated with a clear message.
"""

import os
import shutil
import sys
import tempfile

from app.embedded import keep_environment_private
from app.kernels.execution import INTERRUPT_GRACE_SECONDS
from app.metrics import MULTIPROC_DIR, worker_exited
from app.settings import Settings, SettingsError, environment_with_dotenv
from app.worker import WORKER_CLASS

keep_environment_private()  # the key and token stay out of /proc/<pid>/environ (workers too)

try:
    _settings = Settings.from_environment(environment_with_dotenv(".env"))
except SettingsError as err:
    sys.exit(f"jupyter-kernel-proxy: {err}")

# The app: `wsgi.py` builds it with `create_app()` from the same settings.
wsgi_app = "wsgi:app"

# Loopback by default: this service runs arbitrary code for whoever reaches it. A network
# address needs an API key (or JUPYTER_ALLOW_UNAUTHENTICATED=1).
bind = _settings.proxy_bind


def on_starting(server):
    """Checks the final addresses (`-b` and GUNICORN_CMD_ARGS included) before listening."""
    for address in server.cfg.bind:
        refusal = _settings.unsafe_bind(address.rpartition(":")[0] if ":" in address else "")
        if refusal and not address.startswith("unix:"):
            sys.exit(f"jupyter-kernel-proxy: {refusal}")

# gthread: each worker serves `threads` requests at once; an execution blocks one thread for
# as long as the code runs, so threads bound how many executions a worker runs in parallel.
# This subclass of gthread also lets a stopping worker finish its async jobs (app/worker.py).
worker_class = WORKER_CLASS
workers = _settings.proxy_workers
threads = _settings.proxy_threads

# Workers heartbeat by touching a file on every turn of their loop: keep it in memory (tmpfs)
# where there is one, not on a disk.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None

# gthread workers heartbeat from their main loop, so `timeout` does not limit how long a
# request may run; it only catches a worker whose main loop is stuck.
timeout = 30

# On SIGTERM let in-flight executions run to their deadline, be interrupted and answer.
graceful_timeout = int(_settings.execution_timeout + INTERRUPT_GRACE_SECONDS) + 10

# Recycle each worker after about this many requests (jittered, so that workers don't restart
# together): a bound on slow leaks. The worker class recycles only when no request or job runs
# in it (app/worker.py). A recycled worker's pooled kernels are shut down and its replacement
# refills the pool.
max_requests = 10000
max_requests_jitter = 1000

# Trust X-Forwarded-* headers only from a reverse proxy on this host (nginx in deploy/).
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")

# Longer than nginx's upstream keepalive_timeout (60 s by default), so that gunicorn never
# closes a kept-alive connection that nginx is about to reuse.
keepalive = 75

# JSON lines, like the app's own logs. gunicorn's access log is off: the app logs every
# request itself, with its duration, kernel id and request id (accesslog = "-" adds gunicorn's
# own lines, in JSON too).
logger_class = "app.logs.GunicornLogger"
errorlog = "-"
accesslog = None
loglevel = _settings.log_level.lower()

# Metrics: every worker counts into one directory (prometheus_client's multiprocess mode), so
# any worker answers GET /metrics for all; a worker that exits stops counting in live gauges.
_metrics_dir = None
if not os.environ.get(MULTIPROC_DIR):
    _metrics_dir = os.environ[MULTIPROC_DIR] = tempfile.mkdtemp(
        prefix="jupyter-kernel-proxy-metrics-")


def child_exit(server, worker):
    worker_exited(worker.pid)


def on_exit(server):
    if _metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)


# gunicorn 25+ opens a control socket shared by every gunicorn of the user
# (~/.gunicorn/gunicorn.ctl); two proxies on one machine would collide on it.
control_socket_disable = True
