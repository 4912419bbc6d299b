"""The blocking kernel layer: REST client, kernel websockets, execution loop, message folding.

No Flask here: this package is also the proxy's Python API.
"""

from app.kernels.client import JupyterClient
from app.kernels.errors import (
    ConnectionLost,
    InvalidRequest,
    KernelError,
    KernelNotFound,
    KernelSpecNotFound,
    UpstreamAuthError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.kernels.manager import KernelManager

__all__ = [
    "ConnectionLost",
    "InvalidRequest",
    "JupyterClient",
    "KernelError",
    "KernelManager",
    "KernelNotFound",
    "KernelSpecNotFound",
    "UpstreamAuthError",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]
