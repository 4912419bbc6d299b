"""marshmallow schemas for request bodies, and `load_body()` which applies one to a request."""

from __future__ import annotations

import json
from typing import Any

from flask import current_app, g, request
from marshmallow import Schema, ValidationError, fields, validate, validates, validates_schema
from werkzeug.exceptions import RequestEntityTooLarge

from app.kernels.errors import InvalidRequest
from app.kernels.manager import check_kernel_id


class StrictFloat(fields.Float):
    """A JSON number, never a string or a boolean that happens to convert."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValidationError("Not a valid number.")
        return super()._deserialize(value, attr, data, **kwargs)


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
    stream = fields.Boolean(truthy={True}, falsy={False})  # JSON true/false only
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
    raw = request.get_data(cache=True)
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is None and limit is not None and len(raw) >= limit:
        # A chunked body is cut at the limit without an error: treat reaching it as too large.
        raise RequestEntityTooLarge()
    if not raw.strip() and optional:
        return schema.load({})
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    data = schema.load(body)
    g.kernel_id = data.get("id")
    return data
