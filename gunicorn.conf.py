"""gunicorn settings for jupyter-kernel-proxy.

Read by `jupyter-kernel-proxy` (its flags override these) and by a plain
`gunicorn -c gunicorn.conf.py wsgi:app`. Values come from the environment where an operator
is likely to tune them.
"""

import os

# The app: `wsgi.py` builds it with `create_app()` from the JUPYTER_* environment.
wsgi_app = "wsgi:app"

# Loopback by default: this service runs arbitrary code for whoever reaches it.
bind = os.environ.get("JUPYTER_PROXY_BIND", "127.0.0.1:8000")

# gthread: each worker serves `threads` requests at once; an execution blocks one thread for
# as long as the code runs, so threads bound how many executions a worker runs in parallel.
worker_class = "gthread"
workers = int(os.environ.get("JUPYTER_PROXY_WORKERS", "2"))
threads = int(os.environ.get("JUPYTER_PROXY_THREADS", "8"))

# gthread workers heartbeat from their main loop, so `timeout` does not limit how long a
# request may run; it only catches a worker whose main loop is stuck.
timeout = 30

# On SIGTERM let in-flight executions finish: their deadline plus a margin.
graceful_timeout = int(float(os.environ.get("JUPYTER_EXECUTION_TIMEOUT", "300"))) + 15

# Longer than nginx's upstream keepalive_timeout (60 s by default), so that gunicorn never
# closes a kept-alive connection that nginx is about to reuse.
keepalive = 75

# JSON lines, like the app's own logs. gunicorn's access log is off: the app logs every
# request itself, with its duration and kernel id.
logger_class = "app.logs.GunicornLogger"
errorlog = "-"
_level = os.environ.get("JUPYTER_LOG_LEVEL", "info").lower()
loglevel = "warning" if _level == "warn" else _level

# gunicorn 25+ opens a control socket shared by every gunicorn of the user
# (~/.gunicorn/gunicorn.ctl); two proxies on one machine would collide on it.
control_socket_disable = True
