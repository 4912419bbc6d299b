"""Real gateways as child processes, the integration tests' other upstreams: a Jupyter Kernel
Gateway (`jupyter-kernel-gateway`, its default `jupyter-websocket` API) and a Jupyter Enterprise
Gateway (its local process proxy: kernels on this host). Each on a free loopback port with a
random token and private directories, stopped with its kernels.

They are `EmbeddedJupyterServer`'s siblings (`app.embedded.ServerProcess`): the same `url`,
`token`, `start()`, `stop()`, context manager and constructor's `port`, `token`, `limit_rate`.

Enterprise Gateway 3 needs jupyter_server 1.x and jupyter_client 6, which cannot share an
environment with the proxy's test dependencies: it runs from a virtualenv of its own,
`.venv-enterprise-gateway` at the top of the repository, made by the first test that needs it
(about a minute, from the package index) and reused while its requirements stay the same.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
from pathlib import Path

from app.embedded import ServerProcess

REPO = Path(__file__).resolve().parent.parent

# The token travels in a config file read at start-up (then removed), never on a command line
# (visible to every user) nor in `KG_AUTH_TOKEN`/`EG_AUTH_TOKEN`: the gateways remove those from
# the environment they give kernels, but kernels run as the same user and could read the
# gateway's /proc/<pid>/environ.
KG_CONFIG = """\
c = get_config()  # noqa: F821
c.KernelGatewayApp.ip = "127.0.0.1"
c.KernelGatewayApp.port = {port}
c.KernelGatewayApp.port_retries = 0
c.KernelGatewayApp.auth_token = {token!r}
# KG refuses GET /api/kernels (403) unless told otherwise; JUPYTER_MAX_KERNELS counts kernels
# with it, and tests list kernels.
c.JupyterWebsocketPersonality.list_kernels = {list_kernels}
c.KernelGatewayApp.max_kernels = {max_kernels}
# As for the embedded jupyter_server: ordinary output must reach the proxy whole (KG relays
# kernels through jupyter_server's own websocket connection class, rate limit included).
c.ZMQChannelsWebsocketConnection.limit_rate = {limit_rate}
# A start request that carries an `env` gives the kernel PATH, KERNEL_* and only these of the
# gateway's own variables: the test run's IPython directory (see conftest) must reach it too.
c.KernelGatewayApp.env_process_whitelist = ["IPYTHONDIR"]
"""

EG_CONFIG = """\
c = get_config()  # noqa: F821
c.EnterpriseGatewayApp.ip = "127.0.0.1"
c.EnterpriseGatewayApp.port = {port}
c.EnterpriseGatewayApp.port_retries = 0
c.EnterpriseGatewayApp.auth_token = {token!r}
c.EnterpriseGatewayApp.list_kernels = {list_kernels}
c.EnterpriseGatewayApp.max_kernels = {max_kernels}
# EG refuses to start kernels for root (its default `unauthorized_users`); CI runs as root.
c.EnterpriseGatewayApp.unauthorized_users = set()
# As for Kernel Gateway: a start request's `env` replaces the kernel's environment, but for
# these of the gateway's own variables (the test run's IPython directory, see conftest).
c.EnterpriseGatewayApp.inherited_envs = ["IPYTHONDIR"]
"""

# Pinned whole, so that what the README says of it holds from one build to the next.
EG_REQUIREMENTS = ("jupyter-enterprise-gateway==3.3.0", "jupyter-server==1.24.0",
                   "jupyter-client==6.1.12", "pyzmq==24.0.1", "ipykernel==6.29.5")
EG_VENV = REPO / ".venv-enterprise-gateway"


class GatewayError(RuntimeError):
    """A gateway could not be started."""


class _Gateway(ServerProcess):
    """What both gateways share: their own listing and kernel-limit settings."""

    ready_path = "/api/kernelspecs"  # no /api/status; the kernel specs need the token
    error = GatewayError
    config_template = ""
    variable_prefix = ""  # the gateway's own environment variables, which we never pass on

    def __init__(self, startup_timeout: float = 60.0, *, port: int = 0,
                 token: str | None = None, limit_rate: bool = False, list_kernels: bool = True,
                 max_kernels: int | None = None) -> None:
        """`list_kernels` and `max_kernels` are the gateway's own settings (its defaults:
        False, None)."""
        super().__init__(startup_timeout, port=port, token=token, limit_rate=limit_rate)
        self.list_kernels = list_kernels
        self.max_kernels = max_kernels

    def config(self) -> str:
        return self.config_template.format(port=self.port, token=self.token,
                                           limit_rate=self.limit_rate,
                                           list_kernels=self.list_kernels,
                                           max_kernels=self.max_kernels)

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in super().environment().items()
               if not k.startswith(self.variable_prefix)}
        env["JUPYTER_CONFIG_DIR"] = self.workdir  # no user configuration
        return env


class KernelGatewayServer(_Gateway):
    """A `jupyter-kernel-gateway` child process on 127.0.0.1."""

    kind = "kernel_gateway"
    name = "Kernel Gateway"
    command = ("kernel_gateway",)
    requires = ("kernel_gateway",)
    install_hint = "pip install -e '.[test]'"
    config_template = KG_CONFIG
    variable_prefix = "KG_"


class EnterpriseGatewayServer(_Gateway):
    """A `jupyter-enterprisegateway` child process on 127.0.0.1, from its own virtualenv.

    It has no iopub rate limit (`limit_rate` changes nothing): jupyter_server 1.x reads the
    limits from web app settings that Enterprise Gateway never sets.
    """

    kind = "enterprise_gateway"
    name = "Enterprise Gateway"
    command = ("enterprise_gateway",)
    requires = ()
    config_template = EG_CONFIG
    variable_prefix = "EG_"

    def python(self) -> str:
        return str(enterprise_gateway_python())


def enterprise_gateway_python() -> Path:
    """The Python of `EG_VENV`, made first if it is missing or has other requirements."""
    python = EG_VENV / "bin" / "python"
    stamp = EG_VENV / "requirements.json"
    with open(REPO / ".venv-enterprise-gateway.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once make it once
        if stamp.exists() and json.loads(stamp.read_text()) == list(EG_REQUIREMENTS) \
                and python.exists():
            return python
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(EG_VENV)], check=True)
        installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                                    *EG_REQUIREMENTS], capture_output=True, text=True)
        if installed.returncode != 0:
            raise GatewayError("cannot install Enterprise Gateway into "
                               f"{EG_VENV}:\n{installed.stdout}\n{installed.stderr}")
        stamp.write_text(json.dumps(list(EG_REQUIREMENTS)))
        return python
