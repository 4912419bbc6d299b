"""A real Jupyter Kernel Gateway (`jupyter-kernel-gateway`, its default `jupyter-websocket`
API) as a child process: a free loopback port, a random token, private directories, stopped
with its kernels; the second upstream the integration tests run against.

It is an `EmbeddedJupyterServer`'s sibling (`app.embedded.ServerProcess`): the same `url`,
`token`, `start()`, `stop()`, context manager and constructor's `port`, `token`, `limit_rate`.
"""

from __future__ import annotations

from app.embedded import ServerProcess

# The token travels in a config file read at start-up (then removed), never on a command line
# (visible to every user) nor in `KG_AUTH_TOKEN`: KG removes that from the environment it gives
# kernels, but they run as the same user and could read the gateway's /proc/<pid>/environ.
CONFIG_TEMPLATE = """\
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
"""


class GatewayError(RuntimeError):
    """The Kernel Gateway could not be started."""


class KernelGatewayServer(ServerProcess):
    """A `jupyter-kernel-gateway` child process on 127.0.0.1."""

    kind = "kernel_gateway"
    name = "Kernel Gateway"
    command = ("kernel_gateway",)
    requires = ("kernel_gateway",)
    install_hint = "pip install -e '.[test]'"
    ready_path = "/api/kernelspecs"  # KG has no /api/status; the kernel specs need the token
    error = GatewayError

    def __init__(self, startup_timeout: float = 60.0, *, port: int = 0,
                 token: str | None = None, limit_rate: bool = False, list_kernels: bool = True,
                 max_kernels: int | None = None) -> None:
        """`list_kernels` and `max_kernels` are KG's own settings (its defaults: False, None)."""
        super().__init__(startup_timeout, port=port, token=token, limit_rate=limit_rate)
        self.list_kernels = list_kernels
        self.max_kernels = max_kernels

    def config(self) -> str:
        return CONFIG_TEMPLATE.format(port=self.port, token=self.token,
                                      limit_rate=self.limit_rate,
                                      list_kernels=self.list_kernels,
                                      max_kernels=self.max_kernels)

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in super().environment().items() if not k.startswith("KG_")}
        env["JUPYTER_CONFIG_DIR"] = self.workdir  # no user configuration
        return env
