"""Folding an execution's messages into the contract's answer. Pure: no I/O, no clock.

`ExecutionResult` takes the messages of one `execute_request` in arrival order and keeps the raw
messages (`results`) and their summary (`stdout`, `stderr`, `outputs`, `error`, ...). Past
`max_output_bytes` it stops keeping output (keeping what fits of the stream that crosses the
cap) but still reads the messages that end the execution, and says `truncated: true`; it says
so too when the Jupyter server's iopub rate limit dropped output. Memory stays bounded by the
cap: past it, only the few messages that end the execution are kept.

`outputs` is what a notebook would show: `clear_output` empties it (at once, or with `wait`
when the next output comes), `update_display_data` replaces the display it names; `stdout` and
`stderr` keep all the stream text, as the contract defines them. Images and other rich data
stay in `outputs` as the kernel sent them. `add()` also returns the updates a
streaming client sees for each message, so the stream and the full answer are one fold.
"""

from __future__ import annotations

import re
from typing import Any

# Messages that say how the execution ends (a few per execution): kept whatever the output cap.
_CONTROL_TYPES = frozenset({"execute_reply", "status", "execute_input"})
_OUTPUT_TYPES = frozenset({"execute_result", "display_data"})
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
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
        self.input_count: Any = None  # `execute_input`'s count: the code started under it
        self.idle = False
        self.truncated = False
        self._clear_pending = False  # clear_output(wait=True): clear when the next output comes

    @property
    def complete(self) -> bool:
        """Both the `execute_reply` and the `status: idle` for this request have arrived."""
        return self.reply is not None and self.idle

    def add(self, message: dict[str, Any], size: int) -> list[dict[str, Any]]:
        """Takes one message of this request; `size` is its encoded length in bytes.

        Returns the updates a streaming client is sent for it (none for control messages or
        for output dropped by the cap).
        """
        msg_type = message.get("msg_type")
        content = message.get("content") or {}
        if msg_type == "execute_reply":
            self.reply = content
        elif msg_type == "execute_input":
            self.input_count = content.get("execution_count")
        elif msg_type == "status" and content.get("execution_state") == "idle":
            self.idle = True
        if msg_type not in _CONTROL_TYPES:
            # Once anything was dropped, drop everything after it: no holes in the output.
            room = 0 if self.truncated else self.max_output_bytes - self.kept_bytes
            if size > room:
                self.truncated = True
                if msg_type == "clear_output":
                    # Not kept (a progress loop sends one per step, without end), but still
                    # applied: `outputs` shows what a notebook would.
                    return self._fold(msg_type, content)
                if msg_type in _OUTPUT_TYPES:
                    self._clear_if_pending()  # it came, even if it is not kept
                if msg_type != "stream" or room <= 0:
                    return []
                # Keep what fits of a stream that crosses the cap: the start of a big print,
                # cut at `room` bytes of UTF-8 (never inside a character).
                kept = str(content.get("text", "")).encode(errors="replace")[:room]
                content = {**content, "text": kept.decode(errors="ignore")}
                message = {**message, "content": content}
                size = room
            self.kept_bytes += size
        self.messages.append(message)
        return self._fold(msg_type, content)

    def _fold(self, msg_type: Any, content: dict[str, Any]) -> list[dict[str, Any]]:
        """Applies one kept message to the summary, as a notebook would show it."""
        if msg_type == "stream":
            text = str(content.get("text", ""))
            name = "stderr" if content.get("name") == "stderr" else "stdout"
            if name == "stderr":
                self.stderr.append(text)
                if text.startswith(_RATE_LIMIT_NOTICES):
                    self.truncated = True  # the Jupyter server dropped output
            else:
                self.stdout.append(text)
            return [{"type": name, "text": text}]
        if msg_type in _OUTPUT_TYPES:
            self._clear_if_pending()
            output = _output_of(msg_type, content)
            self.outputs.append(output)
            return [{"type": "output", "output": output}]
        if msg_type == "update_display_data":
            output = _output_of("display_data", content)
            display_id = output.get("display_id")
            for shown in self.outputs:
                if display_id is not None and shown.get("display_id") == display_id:
                    shown["data"], shown["metadata"] = output["data"], output["metadata"]
            return [{"type": "update_display", "output": output}]
        if msg_type == "clear_output":
            wait = bool(content.get("wait"))
            if wait:
                self._clear_pending = True
            else:
                self._clear()
            return [{"type": "clear_output", "wait": wait}]
        if msg_type == "error":
            self.error = _error_of(content)
            return [{"type": "error", "error": self.error}]
        return []

    def _clear_if_pending(self) -> None:
        if self._clear_pending:
            self._clear()

    def _clear(self) -> None:
        self._clear_pending = False
        self.outputs.clear()

    def answer(self, status: str | None = None,
               error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The contract's `execute_code` answer. `status`/`error` override the kernel's word."""
        reply = self.reply or {}
        kernel_status = reply.get("status")
        if kernel_status == "error" and self.error is None:
            self.error = _error_of(reply)
        count = reply.get("execution_count", self.input_count)  # no reply: killed, stopped
        return {
            "results": self.messages,
            "status": status or kernel_status or "error",
            "execution_count": count if isinstance(count, int) else None,
            "stdout": "".join(self.stdout),
            "stderr": "".join(self.stderr),
            "outputs": self.outputs,
            "error": _with_plain_traceback(error or self.error),
            "truncated": self.truncated,
        }


def _output_of(msg_type: str, content: dict[str, Any]) -> dict[str, Any]:
    """An `outputs` item: the data as sent (images base64, as in a notebook file)."""
    output = {"type": msg_type, "data": content.get("data", {}),
              "metadata": content.get("metadata", {})}
    transient = content.get("transient")
    if isinstance(transient, dict) and isinstance(transient.get("display_id"), str):
        output["display_id"] = transient["display_id"]
    return output


def _error_of(content: dict[str, Any]) -> dict[str, Any]:
    traceback = content.get("traceback")
    return _with_plain_traceback({
        "ename": str(content.get("ename", "")),
        "evalue": str(content.get("evalue", "")),
        "traceback": [str(line) for line in traceback] if isinstance(traceback, list) else [],
    })


def _with_plain_traceback(error: dict[str, Any] | None) -> dict[str, Any] | None:
    """Adds `traceback_text`: the traceback as one string, without ANSI colour codes."""
    if error is None or "traceback_text" in error:
        return error
    lines = error.get("traceback") or []
    return {**error, "traceback_text": strip_ansi("\n".join(lines))}


def strip_ansi(text: str) -> str:
    """`text` without ANSI escape sequences (IPython colours its tracebacks)."""
    return _ANSI_ESCAPE.sub("", text)
