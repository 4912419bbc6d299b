"""The blocking kernel layer: REST client, kernel websockets, execution loop, message folding.

No Flask here: this package is also the proxy's Python API.
"""

from app.kernels.client import JupyterClient
from app.kernels.errors import (
    ClientGone,
    CodeTooLarge,
    ConnectionLost,
    InvalidRequest,
    KernelBusy,
    KernelError,
    KernelNotFound,
    KernelSpecNotFound,
    TooManyKernels,
    UpstreamAuthError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.kernels.manager import KernelManager

__all__ = [
    "ClientGone",
    "CodeTooLarge",
    "ConnectionLost",
    "InvalidRequest",
    "JupyterClient",
    "KernelBusy",
    "KernelError",
    "KernelManager",
    "KernelNotFound",
    "KernelSpecNotFound",
    "TooManyKernels",
    "UpstreamAuthError",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]
