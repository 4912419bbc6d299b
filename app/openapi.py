"""The OpenAPI 3.1 document of the API, built with apispec from the marshmallow schemas in
`app/schemas.py`, and served at `GET /openapi.json` (without the API key, like `/health`: it
holds nothing secret).

`ENDPOINTS` is the API in one table: to document a new endpoint, add one entry (method, path,
operation id, summary, request schema, answers, error statuses); `tests/test_openapi.py` fails
while a Flask route is missing from it, or it lists one that does not exist. Every operation
also gets the errors every request can meet (see `_common_errors`), the `X-Request-ID` header
and, when the app has an API key, the bearer security requirement.

The document describes the app it is served by: its API key (401 and `security` only when one
is set), its largest `timeout`. It is built once per app, on first request.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask, Response, current_app
from marshmallow import Schema, fields, validate

from app import schemas
from app.settings import Settings

JSON = "application/json"
NDJSON = "application/x-ndjson"
UUID_PATTERN = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


@dataclass(frozen=True)
class Reply:
    """A documented answer: its description, a schema per media type, its headers."""

    description: str
    content: Mapping[str, Any]  # media type -> a marshmallow schema class, or a JSON schema
    headers: Mapping[str, Any] = field(default_factory=dict)


def reply(schema: type[Schema], description: str | None = None) -> Reply:
    """A JSON answer described by `schema` (and by its docstring, unless told otherwise)."""
    first_line = (schema.__doc__ or "").strip().splitlines()[0].rstrip(".")
    return Reply(description or first_line, {JSON: schema})


@dataclass(frozen=True)
class Endpoint:
    """One operation of the API."""

    method: str
    path: str  # OpenAPI style: /executions/{execution_id}
    operation_id: str
    summary: str
    answers: Mapping[int, Reply]
    body: type[Schema] | None = None  # the JSON request body
    body_required: bool = True
    errors: Mapping[int, str] = field(default_factory=dict)  # status -> when, beyond the common
    upstream: bool = True  # asks the Jupyter server: 502, 503, 504 can happen
    public: bool = False  # needs no API key
    description: str = ""
    links: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)  # OpenAPI links


def _kernel_links(*operation_ids: str) -> dict[int, dict[str, Any]]:
    """Links from an answer with a kernel `id` to operations that take it in their body."""
    return {200: {op: {"operationId": op, "requestBody": {"id": "$response.body#/id"},
                       "description": "the kernel just started"} for op in operation_ids}}


# A streamed answer read as an array, one item per line (OpenAPI 3.2's reading of the
# `schema` of a sequential media type; 3.1 has no `itemSchema` for one line).
STREAM = {"type": "array", "items": {"$ref": "#/components/schemas/StreamLine"},
          "description": "one JSON object per line; the last is `result` or `failure`"}
KERNEL_NOT_FOUND = "`kernel_not_found`: the Jupyter server has no kernel with this id"
JOBS_UNAVAILABLE = ("`jobs_unavailable`: async executions have no usable store (set "
                    "JUPYTER_JOB_STORE), or this worker is stopping (submit again); the "
                    "message says which")

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "POST", "/start_kernel", "start_kernel",
        "Start a kernel; answers once it can execute code",
        body=schemas.StartKernelSchema, body_required=False,
        answers={200: reply(schemas.KernelAnswer)},
        errors={400: "`unknown_kernel_spec`: no kernel spec of this name (`details.available` "
                     "lists them)",
                429: "`too_many_kernels`: the server runs JUPYTER_MAX_KERNELS kernels"},
        links=_kernel_links("execute_code", "interrupt_kernel", "restart_kernel",
                            "shutdown_kernel")),
    Endpoint(
        "POST", "/execute_code", "execute_code",
        "Run code on a kernel; answers whenever the code ran, whatever the code did",
        description="With `\"stream\": true` (or `Accept: application/x-ndjson`) the answer "
                    "is streamed, one JSON object per line as the output comes, the last one "
                    "of type `result` (the whole answer) or `failure`. With `\"mode\": "
                    "\"async\"` it answers 202 at once; `GET /executions/{execution_id}` "
                    "tells how the execution goes.",
        body=schemas.ExecuteCodeSchema,
        answers={
            200: Reply("the code ran (`status` says how it ended)", {
                JSON: schemas.ExecutionAnswer,
                NDJSON: STREAM}),
            202: Reply("`\"mode\": \"async\"`: the execution runs; read it at `url`",
                       {JSON: schemas.ExecutionAccepted},
                       {"Location": {"description": "the execution's URL",
                                     "required": True, "schema": {"type": "string"}}}),
        },
        errors={404: KERNEL_NOT_FOUND,
                413: "`code_too_large`: `code` is over JUPYTER_MAX_CODE_BYTES",
                429: "`too_many_kernels`: the server runs JUPYTER_MAX_KERNELS kernels; "
                     "`kernel_busy`: JUPYTER_MAX_QUEUED_EXECUTIONS executions already wait for "
                     "this kernel, or all of the worker's threads but two wait for busy "
                     "kernels; `too_many_jobs`: JUPYTER_MAX_RUNNING_JOBS async executions "
                     "run in this worker",
                503: JOBS_UNAVAILABLE},
        links={202: {"get_execution": {
            "operationId": "get_execution",
            "parameters": {"execution_id": "$response.body#/execution_id"},
            "description": "the execution just submitted"}}}),
    Endpoint(
        "GET", "/executions/{execution_id}", "get_execution",
        "An execution submitted with `\"mode\": \"async\"`: its answer so far",
        answers={200: reply(schemas.ExecutionJob)},
        errors={404: "`execution_not_found`: no such execution, or it finished more than "
                     "JUPYTER_JOB_RETENTION seconds ago", 503: JOBS_UNAVAILABLE},
        upstream=False),
    Endpoint(
        "POST", "/interrupt_kernel", "interrupt_kernel",
        "Interrupt the code a kernel runs (its state is kept)",
        body=schemas.InterruptKernelSchema,
        answers={200: reply(schemas.InterruptAnswer)}, errors={404: KERNEL_NOT_FOUND}),
    Endpoint(
        "POST", "/restart_kernel", "restart_kernel",
        "Restart a kernel under the same id (its state is lost)",
        body=schemas.RestartKernelSchema,
        answers={200: reply(schemas.RestartAnswer)}, errors={404: KERNEL_NOT_FOUND}),
    Endpoint(
        "POST", "/shutdown_kernel", "shutdown_kernel", "Shut a kernel down",
        body=schemas.ShutdownKernelSchema,
        answers={200: reply(schemas.ShutdownAnswer)}, errors={404: KERNEL_NOT_FOUND}),
    Endpoint(
        "GET", "/kernels", "list_kernels", "The kernels the Jupyter server runs",
        answers={200: reply(schemas.KernelList)},
        errors={403: "`kernel_listing_disabled`: JUPYTER_LIST_KERNELS is false"}),
    Endpoint(
        "GET", "/kernelspecs", "list_kernelspecs", "The kernel specs `start_kernel` can start",
        answers={200: reply(schemas.KernelSpecs)}),
    Endpoint(
        "GET", "/health", "health", "The proxy serves (cheap: no upstream call)",
        answers={200: reply(schemas.HealthAnswer)}, upstream=False, public=True),
    Endpoint(
        "GET", "/metrics", "metrics",
        "Prometheus metrics, summed over every worker (text exposition format)",
        answers={200: Reply("the metrics", {"text/plain": {"type": "string"}})},
        upstream=False),
    Endpoint(
        "GET", "/openapi.json", "openapi", "This document",
        answers={200: Reply("the OpenAPI document", {JSON: {"type": "object"}})},
        upstream=False),  # behind the key, as every endpoint but /health (CONTRACT.md)
)

# Errors any request can meet (see app/guards.py, app/errors.py), by status: when.
GUARD_403 = ("no API key is set and the request is not from a local client talking to the "
             "proxy directly: `host_not_allowed`, `api_key_required`, `cross_site_request`")
BODY_ERRORS = {
    400: "`invalid_request`: the body is not a JSON object (in UTF-8), has a key twice, or "
         "has a missing, ill-typed or unknown field (`details.fields` says which)",
    413: "`request_too_large`: the body is over JUPYTER_MAX_REQUEST_BYTES",
    415: "`unsupported_media_type`: a body that is not `application/json`",
}
UPSTREAM_ERRORS = {
    502: "the Jupyter server answered with something unusable (`bad_upstream_response`, "
         "`upstream_auth_failed`, `upstream_connection_lost`, `kernel_error`)",
    503: "`upstream_unavailable`: the Jupyter server cannot be reached",
    504: "`upstream_timeout`: the Jupyter server did not answer in time",
}

# Request fields, documented here since the request schemas are the validators themselves.
FIELD_DOCS: dict[tuple[type[Schema], str], dict[str, Any]] = {
    (schemas.KernelIdSchema, "id"): {
        "description": "the kernel id: a canonical (lower-case) UUID",
        "format": "uuid", "pattern": UUID_PATTERN},
    (schemas.StartKernelSchema, "name"): {
        "description": "the kernel spec (default JUPYTER_KERNEL_NAME); `GET /kernelspecs` "
                       "lists them", "examples": ["python3"]},
    (schemas.ExecuteCodeSchema, "code"): {
        "description": "the source to run, at most JUPYTER_MAX_CODE_BYTES bytes as UTF-8"},
    (schemas.ExecuteCodeSchema, "timeout"): {
        "description": "seconds the whole call may take, waiting for the kernel included "
                       "(default JUPYTER_EXECUTION_TIMEOUT)"},
    (schemas.ExecuteCodeSchema, "stream"): {
        "description": "stream the output as it comes (`application/x-ndjson`)"},
    (schemas.ExecuteCodeSchema, "mode"): {
        "description": "`async`: answer 202 at once and run the code as a job"},
}
# Whole-object constraints a field cannot say.
SCHEMA_EXTRAS: dict[type[Schema], dict[str, Any]] = {
    schemas.ExecuteCodeSchema: {
        "not": {"required": ["stream", "mode"],
                "properties": {"stream": {"const": True}, "mode": {"const": "async"}}},
        "description": "`stream` and `\"mode\": \"async\"` cannot go together",
    },
}

_built: dict[int, bytes] = {}
_building = threading.Lock()


def register_openapi(app: Flask) -> None:
    """Serves the app's document at `GET /openapi.json`."""
    app.add_url_rule("/openapi.json", "openapi", _serve_document, methods=["GET"])


def _serve_document() -> Response:
    """The OpenAPI document of this app."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    with _building:  # built once per app, whichever thread asks first
        document = app.extensions.get("openapi")
        if document is None:
            document = json.dumps(build_document(app.config["SETTINGS"],
                                                 app.config["VERSION"])).encode()
            app.extensions["openapi"] = document
    return Response(document, mimetype=JSON)


def build_document(settings: Settings, version: str) -> dict[str, Any]:
    """The OpenAPI document of an app with these settings."""
    keyed = bool(settings.api_keys)
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="jupyter-kernel-proxy", version=version, openapi_version="3.1.0",
        plugins=[plugin], servers=[{"url": "/"}],
        info={"description": "Start Jupyter kernels, run code on them and shut them down. "
                             "Every non-2xx answer is `{\"error\", \"message\", "
                             "\"details\"?}`; answers may gain fields, never lose them.",
              "license": {"name": "MIT", "identifier": "MIT"}},
        **({"security": [{"bearerAuth": []}]} if keyed else {}))
    plugin.converter.add_attribute_function(_request_field_docs)
    plugin.converter.add_attribute_function(_exclusive_range)
    plugin.converter.add_attribute_function(
        lambda _, field, **__: {"maximum": settings.max_execution_timeout}
        if _is_field(field, schemas.ExecuteCodeSchema, "timeout") else {})
    spec.components.security_scheme("bearerAuth", {
        "type": "http", "scheme": "bearer",
        "description": "JUPYTER_PROXY_API_KEY, when the proxy has one"})
    spec.components.header("X-Request-ID", {
        "description": "the request's id: the client's own `X-Request-ID` if it is a sane "
                       "one, else a new one", "required": True, "schema": {"type": "string"}})
    spec.components.parameter("X-Request-ID", "header", {
        "description": "an id for this request (up to 128 letters, digits and `._:-`; "
                       "another value is replaced), returned and written on its log lines",
        "schema": {"type": "string"}})
    for schema_class, extras in SCHEMA_EXTRAS.items():
        spec.components.schema(_component_name(schema_class), extras, schema=schema_class)
    spec.components.schema("Error", schema=schemas.ErrorAnswer)
    _add_stream_line(spec)
    for endpoint in ENDPOINTS:
        spec.path(path=endpoint.path,
                  operations={endpoint.method.lower(): _operation(endpoint, keyed)})
    return spec.to_dict()


def _operation(endpoint: Endpoint, keyed: bool) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, answer in endpoint.answers.items():
        responses[str(status)] = {
            "description": answer.description,
            "content": {media: {"schema": schema} for media, schema in answer.content.items()},
            "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"},
                        **answer.headers},
        }
        if status in endpoint.links:
            responses[str(status)]["links"] = dict(endpoint.links[status])
    errors = _common_errors(endpoint, keyed)
    for status, when in endpoint.errors.items():
        errors[status] = f"{errors[status]}; {when}" if status in errors else when
    for status in sorted(errors):
        responses[str(status)] = {
            "description": errors[status],
            "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
            "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
        }
    operation: dict[str, Any] = {
        "operationId": endpoint.operation_id, "summary": endpoint.summary,
        "parameters": ["X-Request-ID"]
        + [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
           for name in re.findall(r"{(\w+)}", endpoint.path)],
        "responses": responses,
    }
    if endpoint.description:
        operation["description"] = endpoint.description
    if endpoint.body is not None:
        operation["requestBody"] = {"required": endpoint.body_required,
                                    "content": {JSON: {"schema": endpoint.body}}}
    if endpoint.public and keyed:
        operation["security"] = []
    return operation


def _common_errors(endpoint: Endpoint, keyed: bool) -> dict[int, str]:
    errors = {500: "`internal_error`: the proxy failed unexpectedly (the error is logged)"}
    if keyed and not endpoint.public:
        errors[401] = "`unauthorized`: send `Authorization: Bearer <key>`"
    if not keyed:
        errors[403] = GUARD_403
    if endpoint.body is not None:
        errors.update(BODY_ERRORS)
    if endpoint.upstream:
        errors.update(UPSTREAM_ERRORS)
    return errors


def _add_stream_line(spec: APISpec) -> None:
    """`StreamLine`: one line of a streamed execution, told apart by its `type`."""
    names = {schema: _component_name(schema) for schema in schemas.STREAM_LINES.values()}
    for schema, name in names.items():
        spec.components.schema(name, schema=schema)
    spec.components.schema("StreamLine", {
        "description": "one line of a streamed execution (`application/x-ndjson`); the last "
                       "is `result` or `failure`",
        "oneOf": [{"$ref": f"#/components/schemas/{name}"} for name in names.values()],
        "discriminator": {"propertyName": "type", "mapping": {
            kind: f"#/components/schemas/{names[schema]}"
            for kind, schema in schemas.STREAM_LINES.items()}},
    })


def _component_name(schema: type[Schema]) -> str:
    name = schema.__name__
    return name[:-len("Schema")] if name.endswith("Schema") and name != "Schema" else name


def _is_field(field_obj: fields.Field, schema: type[Schema], name: str) -> bool:
    return field_obj.name == name and isinstance(field_obj.parent, schema)


def _request_field_docs(_: Any, field_obj: fields.Field, **__: Any) -> dict[str, Any]:
    """The documentation of a request field (`FIELD_DOCS`), found along its schema's MRO."""
    parent = field_obj.parent
    for cls in type(parent).__mro__ if isinstance(parent, Schema) else ():
        docs = FIELD_DOCS.get((cls, field_obj.name or ""))
        if docs is not None:
            return dict(docs)
    return {}


def _exclusive_range(_: Any, field_obj: fields.Field, ret: dict[str, Any],
                     **__: Any) -> dict[str, Any]:
    """apispec writes every `Range` as inclusive: say `exclusiveMinimum`/`exclusiveMaximum`
    where the validator excludes its ends."""
    extra: dict[str, Any] = {}
    for validator in field_obj.validators:
        if not isinstance(validator, validate.Range):
            continue
        if validator.min is not None and not validator.min_inclusive:
            ret.pop("minimum", None)
            extra["exclusiveMinimum"] = validator.min
        if validator.max is not None and not validator.max_inclusive:
            ret.pop("maximum", None)
            extra["exclusiveMaximum"] = validator.max
    return extra
