"""The kernel layer's exceptions: one hierarchy rooted at `KernelError`.

Foreign exceptions (`requests`, `websocket`, `OSError`) are converted into these at the boundary
with `raise ... from err`. Each message is written by us and is safe to show a client: it never
carries upstream text, URLs or tokens. `app/errors.py` maps them to HTTP statuses.
"""

from __future__ import annotations

from typing import Any


class KernelError(Exception):
    """Base of every error the kernel layer raises on purpose."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidRequest(KernelError):
    """The caller asked for something malformed (a bad kernel id, a timeout out of range)."""


class KernelNotFound(KernelError):
    """The Jupyter server has no kernel with this id."""

    def __init__(self, kernel_id: str) -> None:
        super().__init__(f"no kernel with id {kernel_id} on the Jupyter server",
                         kernel_id=kernel_id)


class KernelSpecNotFound(KernelError):
    """The Jupyter server has no kernel spec of this name."""


class UpstreamError(KernelError):
    """The Jupyter server answered with something unusable (502)."""


class UpstreamAuthError(UpstreamError):
    """The Jupyter server refused the proxy's credentials (a wrong or missing JUPYTER_TOKEN)."""


class ConnectionLost(UpstreamError):
    """The websocket to a kernel closed or broke while the proxy was using it."""


class UpstreamUnavailable(KernelError):
    """The Jupyter server cannot be reached (503)."""


class UpstreamTimeout(KernelError):
    """The Jupyter server, or a kernel starting on it, did not answer in time (504)."""


class CodeTooLarge(KernelError):
    """The code is longer than the proxy accepts (`max_code_bytes`)."""


class TooManyKernels(KernelError):
    """The Jupyter server already runs as many kernels as the proxy allows (`max_kernels`)."""


class ClientGone(KernelError):
    """The client went away before the answer; what it asked for was undone."""


class KernelBusy(KernelError):
    """Too many executions already wait for this kernel (`max_queued_executions`)."""
