"""marshmallow schemas for request bodies, and `load_body()` which applies one to a request;
schemas of the answers, for the OpenAPI document.
"""

from __future__ import annotations

import json
from typing import Any

from flask import current_app, g, request
from marshmallow import (
    INCLUDE,
    Schema,
    ValidationError,
    fields,
    validate,
    validates,
    validates_schema,
)
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import RequestEntityTooLarge

from app.errors import ApiError
from app.kernels.errors import InvalidRequest
from app.kernels.manager import check_kernel_id


class StrictFloat(fields.Float):
    """A JSON number, never a string or a boolean that happens to convert."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValidationError("Not a valid number.")
        return super()._deserialize(value, attr, data, **kwargs)


class StrictBoolean(fields.Boolean):
    """JSON `true` or `false`, never a number (Python's `1 == True` would let 1 and 1.0 in)."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise ValidationError("Not a valid boolean: true or false.")
        return value


class Text(fields.String):
    """A string that can be sent on: lone surrogates (JSON `\\ud800`) are not text."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError("Not valid Unicode text (it holds a lone surrogate).") \
                from None
        return text


class KernelIdSchema(Schema):
    """`{"id": "<kernel uuid>"}`."""

    id = Text(required=True)

    @validates("id")
    def _canonical_uuid(self, value: str, **_: Any) -> None:
        try:
            check_kernel_id(value)
        except InvalidRequest as err:
            raise ValidationError(err.message) from None


class StartKernelSchema(Schema):
    """`{"name": "<kernel spec>"}`, every field optional."""

    name = Text(validate=validate.Length(min=1, max=255))


class ExecuteCodeSchema(KernelIdSchema):
    """`{"id", "code", "timeout"?, "stream"?, "mode"?}`."""

    code = Text(required=True)
    timeout = StrictFloat(allow_nan=False, validate=validate.Range(min=0, min_inclusive=False))
    stream = StrictBoolean()
    mode = fields.String(validate=validate.OneOf(["sync", "async"]))

    @validates_schema
    def _one_delivery(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("stream") and data.get("mode") == "async":
            raise ValidationError("choose one: stream the output, or run as a job (async)",
                                  field_name="mode")


class ShutdownKernelSchema(KernelIdSchema):
    """`{"id"}`."""


class InterruptKernelSchema(KernelIdSchema):
    """`{"id"}`."""


class RestartKernelSchema(KernelIdSchema):
    """`{"id"}`."""


def load_body(schema: Schema, *, optional: bool = False) -> dict[str, Any]:
    """The request's JSON body, validated by `schema`; `optional` allows an empty body.

    Raises `InvalidRequest` or `ValidationError` (both 400). The `Content-Type` was checked
    before the view ran (415).
    """
    raw = read_body()
    if not raw.strip() and optional:
        return schema.load({})
    try:
        body = json.loads(raw, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not UTF-8 text, which JSON must be") from None
    except (ValueError, RecursionError):
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    data = schema.load(body)
    g.kernel_id = data.get("id")
    return data


def read_body() -> bytes:
    """The request's body, at most `MAX_CONTENT_LENGTH` bytes of it.

    Raises `RequestEntityTooLarge` (413) for a longer body, and `ApiError` 400 `bad_request`
    for one that breaks its framing (ends early, or malformed chunks: gunicorn's
    `ParseException` or an `OSError` from the socket).
    """
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    try:
        if (request.content_length is not None or limit is None
                or not request.environ.get("wsgi.input_terminated")):
            # werkzeug refuses a length over the limit; without a length, from a server that
            # does not end the input for us, it reads nothing rather than wait for a close.
            return request.get_data(cache=True)
        # A chunked body (the server ends it): werkzeug would cut it at the limit without a
        # word, so that a body of exactly the limit and a longer one would look alike. One
        # byte more tells them apart.
        stream = request.environ["wsgi.input"]
        raw = b""
        while len(raw) <= limit and (chunk := stream.read(limit + 1 - len(raw))):
            raw += chunk
    except (ParseException, OSError):
        raise ApiError(400, "bad_request", "the request body could not be read (it ended "
                       "early, or its chunked transfer encoding is malformed)") from None
    if len(raw) > limit:
        raise RequestEntityTooLarge()
    return raw


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: parsers differ on which of two equal keys wins,
    so such a body is refused rather than read one way here and another way elsewhere."""
    body = dict(pairs)
    if len(body) < len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise InvalidRequest(f"the request body has the key {twice!r} more than once")
    return body


# -- Response schemas -----------------------------------------------------------------------
# They describe the answers in the OpenAPI document (app/openapi.py); the views build their
# answers as plain dicts and never dump them through these. Fields may be added to answers in
# later versions, never removed (CONTRACT.md), so every answer object admits more properties
# (`unknown = INCLUDE` becomes `additionalProperties: true`).

# `cancelled`: the client went away (or half-closed its connection) before the answer; only a
# stream's reader or the log ever see it.
EXECUTION_STATUSES = ("ok", "error", "aborted", "timeout", "crashed", "cancelled")
JOB_STATUSES = ("running", *EXECUTION_STATUSES, "failed", "lost")


def _doc(text: str = "", **more: Any) -> dict[str, Any]:
    """A field's `metadata`: its description and other OpenAPI keywords."""
    return ({"description": text} if text else {}) | more


class Answer(Schema):
    """An answer object: open to fields added later."""

    class Meta:
        unknown = INCLUDE


class ErrorAnswer(Answer):
    """Every non-2xx answer: `{"error", "message", "details"?}`."""

    error = fields.String(required=True, metadata=_doc(
        "a short, stable code such as `kernel_not_found`; see the README's Errors table"))
    message = fields.String(required=True, metadata=_doc(
        "what went wrong and how to fix it, for people"))
    details = fields.Dict(metadata=_doc(
        "more about the error, when there is something to add (`fields` for invalid bodies, "
        "`available` kernel specs, `kernel_id` ...)"))


class KernelAnswer(Answer):
    """A kernel that `start_kernel` started."""

    id = fields.String(required=True, metadata=_doc("the kernel id", format="uuid"))
    name = fields.String(required=True, metadata=_doc("its kernel spec"))
    execution_state = fields.String(metadata=_doc("`idle` once it can execute code"))
    last_activity = fields.String(allow_none=True, metadata=_doc(
        "when the Jupyter server last saw it busy, ISO 8601", format="date-time"))


class JupyterMessage(Answer):
    """One raw Jupyter message of an execution, as the kernel sent it (binary buffers
    dropped)."""

    header = fields.Dict(required=True)
    parent_header = fields.Dict(required=True)
    metadata = fields.Dict(required=True)
    content = fields.Dict(required=True)
    msg_type = fields.String(required=True)
    channel = fields.String(metadata=_doc("`iopub` or `shell`"))


class Output(Answer):
    """An `execute_result` or `display_data`, the data as the kernel sent it."""

    type = fields.String(required=True,
                         validate=validate.OneOf(["execute_result", "display_data"]))
    data = fields.Dict(required=True, metadata=_doc("MIME type -> data (images base64)"))
    metadata = fields.Dict(required=True)
    display_id = fields.String(metadata=_doc("the display it shows, when it has one"))


class CodeError(Answer):
    """The exception the code raised, or what went wrong around it."""

    ename = fields.String(required=True)
    evalue = fields.String(required=True)
    traceback = fields.List(fields.String(), required=True,
                            metadata=_doc("the kernel's traceback lines, ANSI colours kept"))
    traceback_text = fields.String(metadata=_doc("the traceback as plain text"))


class ExecutionAnswer(Answer):
    """What `execute_code` answers whenever the code ran, whatever the code did."""

    results = fields.List(fields.Nested(JupyterMessage), required=True, metadata=_doc(
        "the raw messages answering this request, in arrival order, `execute_reply` included"))
    status = fields.String(required=True, validate=validate.OneOf(EXECUTION_STATUSES))
    execution_count = fields.Integer(required=True, allow_none=True)
    stdout = fields.String(required=True)
    stderr = fields.String(required=True)
    outputs = fields.List(fields.Nested(Output), required=True)
    error = fields.Nested(CodeError, required=True, allow_none=True)
    truncated = fields.Boolean(required=True, metadata=_doc(
        "output may be incomplete: it went past JUPYTER_MAX_OUTPUT_BYTES, the server dropped "
        "some (its iopub rate limit), some may have been lost with a broken connection, or a "
        "frame that was no Jupyter message was skipped"))


class ExecutionJob(ExecutionAnswer):
    """An execution run with `"mode": "async"`: the answer so far, and when it ran."""

    execution_id = fields.String(required=True)
    kernel_id = fields.String(required=True, metadata=_doc(format="uuid"))
    status = fields.String(required=True, validate=validate.OneOf(JOB_STATUSES), metadata=_doc(
        "`running` until it ends, then the execution's status; `failed` if the Jupyter server "
        "failed; `lost` if the proxy worker running it stopped before it ended"))
    submitted_at = fields.String(required=True, metadata=_doc(format="date-time"))
    finished_at = fields.String(required=True, allow_none=True,
                                metadata=_doc("`null` while running", format="date-time"))
    failure = fields.Nested(ErrorAnswer, required=True, allow_none=True, metadata=_doc(
        "why a `failed` or `lost` job ended, in the error shape; `null` otherwise"))


class ExecutionAccepted(Answer):
    """The 202 answer to `"mode": "async"`: where to read the execution."""

    execution_id = fields.String(required=True)
    kernel_id = fields.String(required=True, metadata=_doc(format="uuid"))
    status = fields.String(required=True, validate=validate.OneOf(["running"]))
    url = fields.String(required=True, metadata=_doc("`/executions/<execution_id>`"))


class ShutdownAnswer(Answer):
    """`{"message": "Kernel <id> shutdown"}`."""

    message = fields.String(required=True)


class InterruptAnswer(Answer):
    """The kernel was interrupted."""

    id = fields.String(required=True, metadata=_doc(format="uuid"))
    message = fields.String(required=True)


class RestartAnswer(InterruptAnswer):
    """The kernel was restarted under the same id: its state is gone."""

    state_lost = fields.Boolean(required=True, metadata=_doc("always true", enum=[True]))


class KernelInfo(Answer):
    """A kernel the Jupyter server runs."""

    id = fields.String(required=True, metadata=_doc(format="uuid"))
    name = fields.String(required=True)
    execution_state = fields.String(required=True)
    last_activity = fields.String(required=True, allow_none=True,
                                  metadata=_doc(format="date-time"))
    connections = fields.Integer(required=True)


class KernelList(Answer):
    """Every kernel the Jupyter server runs."""

    kernels = fields.List(fields.Nested(KernelInfo), required=True)


class KernelSpec(Answer):
    """A kernel spec: what `start_kernel` may be asked for by `name`."""

    name = fields.String(required=True)
    display_name = fields.String(required=True)
    language = fields.String(required=True)


class KernelSpecs(Answer):
    """The kernel specs of the Jupyter server, by name."""

    default = fields.String(required=True, metadata=_doc("the spec used when none is named"))
    kernelspecs = fields.Dict(keys=fields.String(), values=fields.Nested(KernelSpec),
                              required=True)


class HealthAnswer(Answer):
    """The proxy serves."""

    status = fields.String(required=True, validate=validate.OneOf(["ok"]))
    version = fields.String(required=True)


# Lines of a streamed execution (`application/x-ndjson`): one JSON object per line.

class StreamText(Answer):
    """Output written to stdout or stderr."""

    type = fields.String(required=True, validate=validate.OneOf(["stdout", "stderr"]))
    text = fields.String(required=True)


class StreamOutput(Answer):
    """A rich output (`execute_result`, `display_data`), or an update of a shown display."""

    type = fields.String(required=True, validate=validate.OneOf(["output", "update_display"]))
    output = fields.Nested(Output, required=True)


class StreamClearOutput(Answer):
    """The code cleared its output (`wait`: when the next output comes)."""

    type = fields.String(required=True, validate=validate.OneOf(["clear_output"]))
    wait = fields.Boolean(required=True)


class StreamError(Answer):
    """The code raised."""

    type = fields.String(required=True, validate=validate.OneOf(["error"]))
    error = fields.Nested(CodeError, required=True)


class StreamResult(ExecutionAnswer):
    """The last line: the whole `execute_code` answer."""

    type = fields.String(required=True, validate=validate.OneOf(["result"]))


class StreamFailure(Answer):
    """The last line when the upstream failed mid-stream: what an error answer would say."""

    type = fields.String(required=True, validate=validate.OneOf(["failure"]))
    error = fields.String(required=True)
    message = fields.String(required=True)


STREAM_LINES: dict[str, type[Schema]] = {
    "stdout": StreamText, "stderr": StreamText, "output": StreamOutput,
    "update_display": StreamOutput, "clear_output": StreamClearOutput, "error": StreamError,
    "result": StreamResult, "failure": StreamFailure,
}
