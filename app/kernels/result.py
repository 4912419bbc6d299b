"""Folding an execution's messages into the contract's answer. Pure: no I/O, no clock.

`ExecutionResult` takes the messages of one `execute_request` in arrival order and keeps the raw
messages (`results`) and their summary (`stdout`, `stderr`, `outputs`, `error`, ...). Past
`max_output_bytes` it stops keeping output (keeping what fits of the stream that crosses the
cap) but still reads the messages that end the execution, and says `truncated: true`; it says
so too when the Jupyter server's iopub rate limit dropped output.
"""

from __future__ import annotations

from typing import Any

# Messages that say how the execution ends: always kept, whatever the output cap.
_CONTROL_TYPES = frozenset({"execute_reply", "status", "execute_input"})
_OUTPUT_TYPES = frozenset({"execute_result", "display_data"})
# What jupyter_server writes to stderr when its iopub rate limit drops output.
_RATE_LIMIT_NOTICES = ("IOPub data rate exceeded", "IOPub message rate exceeded")


class ExecutionResult:
    """The answer to one execution, built message by message."""

    def __init__(self, max_output_bytes: int) -> None:
        self.max_output_bytes = max_output_bytes
        self.kept_bytes = 0
        self.messages: list[dict[str, Any]] = []
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.outputs: list[dict[str, Any]] = []
        self.error: dict[str, Any] | None = None
        self.reply: dict[str, Any] | None = None
        self.idle = False
        self.truncated = False

    @property
    def complete(self) -> bool:
        """Both the `execute_reply` and the `status: idle` for this request have arrived."""
        return self.reply is not None and self.idle

    def add(self, message: dict[str, Any], size: int) -> None:
        """Takes one message of this request; `size` is its encoded length in bytes."""
        msg_type = message.get("msg_type")
        content = message.get("content") or {}
        if msg_type == "execute_reply":
            self.reply = content
        elif msg_type == "status" and content.get("execution_state") == "idle":
            self.idle = True
        if msg_type not in _CONTROL_TYPES:
            # Once anything was dropped, drop everything after it: no holes in the output.
            room = 0 if self.truncated else self.max_output_bytes - self.kept_bytes
            if size > room:
                self.truncated = True
                if msg_type != "stream" or room <= 0:
                    return
                # Keep what fits of a stream that crosses the cap: the start of a big print.
                content = {**content, "text": str(content.get("text", ""))[:room]}
                message = {**message, "content": content}
                size = room
            self.kept_bytes += size
        self.messages.append(message)
        if msg_type == "stream":
            text = str(content.get("text", ""))
            if content.get("name") == "stderr":
                self.stderr.append(text)
                if text.startswith(_RATE_LIMIT_NOTICES):
                    self.truncated = True  # the Jupyter server dropped output
            else:
                self.stdout.append(text)
        elif msg_type in _OUTPUT_TYPES:
            self.outputs.append({
                "type": msg_type,
                "data": content.get("data", {}),
                "metadata": content.get("metadata", {}),
            })
        elif msg_type == "error":
            self.error = _error_of(content)

    def answer(self, status: str | None = None,
               error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The contract's `execute_code` answer. `status`/`error` override the kernel's word."""
        reply = self.reply or {}
        kernel_status = reply.get("status")
        if kernel_status == "error" and self.error is None:
            self.error = _error_of(reply)
        count = reply.get("execution_count")
        return {
            "results": self.messages,
            "status": status or kernel_status or "error",
            "execution_count": count if isinstance(count, int) else None,
            "stdout": "".join(self.stdout),
            "stderr": "".join(self.stderr),
            "outputs": self.outputs,
            "error": error or self.error,
            "truncated": self.truncated,
        }


def _error_of(content: dict[str, Any]) -> dict[str, Any]:
    traceback = content.get("traceback")
    return {
        "ename": str(content.get("ename", "")),
        "evalue": str(content.get("evalue", "")),
        "traceback": [str(line) for line in traceback] if isinstance(traceback, list) else [],
    }
