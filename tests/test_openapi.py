"""The OpenAPI document: a valid OpenAPI 3.1 document that lists every route of the app, and
a live service that keeps to it, as schemathesis finds it (with and without an API key).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from openapi_spec_validator import validate as validate_openapi

from app import Settings, create_app
from app.kernels import KernelNotFound
from app.openapi import NDJSON
from tests import schemathesis_hooks
from tests.conftest import REPO, ProxyProcess

API_KEY = "openapi-test-key"
# Cases per operation and phase: small enough for this file to run in a minute or two on 2
# cores. tests/schemathesis.toml makes the generation deterministic, so CI runs the same cases
# every time.
MAX_EXAMPLES = 10


# The document needs no upstream: these settings point at none.
OFFLINE = Settings(server_url="http://127.0.0.1:9")


@pytest.mark.parametrize("key", [None, API_KEY])
def test_the_document_is_valid_openapi(key):
    http = create_app(OFFLINE.replace(proxy_api_key=key)).test_client()
    response = http.get("/openapi.json",  # behind the key when there is one, like the rest
                        headers={"Authorization": f"Bearer {key}"} if key else {})
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    document = response.get_json()
    validate_openapi(document)
    assert document["openapi"] == "3.1.0"
    assert document["info"]["version"] == http.application.config["VERSION"]
    assert document["servers"] == [{"url": "/"}]
    assert ("security" in document) == bool(key)


def test_every_route_is_documented_and_nothing_else():
    """A forgotten endpoint (or a documented one that is gone) fails here."""
    app = create_app(OFFLINE)
    routes = {(method.lower(), re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule))
              for rule in app.url_map.iter_rules()
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    document = app.test_client().get("/openapi.json").get_json()
    documented = {(method, path) for path, item in document["paths"].items()
                  for method in item}
    assert routes == documented


def test_the_document_describes_the_apps_settings():
    keyed = create_app(OFFLINE.replace(proxy_api_key=API_KEY, max_execution_timeout=42,
                                        execution_timeout=10)).test_client()
    document = keyed.get("/openapi.json",
                         headers={"Authorization": f"Bearer {API_KEY}"}).get_json()
    assert document["components"]["schemas"]["ExecuteCode"]["properties"]["timeout"] == {
        "type": "number", "exclusiveMinimum": 0, "maximum": 42,
        "description": document["components"]["schemas"]["ExecuteCode"]["properties"]
        ["timeout"]["description"]}
    operations = {(path, method): op for path, item in document["paths"].items()
                  for method, op in item.items()}
    assert operations["/health", "get"]["security"] == []
    assert "security" not in operations["/openapi.json", "get"]  # the key, like the rest
    assert keyed.get("/openapi.json").status_code == 401
    assert "401" in operations["/execute_code", "post"]["responses"]
    assert "401" not in operations["/health", "get"]["responses"]
    assert keyed.get("/kernels").status_code == 401  # the rest still needs the key


# -- the real service -----------------------------------------------------------------------

def _start_proxy(jupyter_server, manager, key: str | None) -> ProxyProcess:
    running = len(manager.client.list_kernels())
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_")}
    env.update(JUPYTER_SERVER_URL=jupyter_server.url, JUPYTER_TOKEN=jupyter_server.token,
               # A fuzzer must not start hundreds of kernels, nor run code for long.
               JUPYTER_MAX_KERNELS=str(running + 2), JUPYTER_EXECUTION_TIMEOUT="5",
               JUPYTER_MAX_EXECUTION_TIMEOUT="10", JUPYTER_KERNEL_START_TIMEOUT="30")
    if key:
        env["JUPYTER_PROXY_API_KEY"] = key
    proxy = ProxyProcess(["--workers", "1", "--threads", "4"], env)
    proxy.wait_until_serving()
    return proxy


@pytest.fixture(scope="module")
def proxies(jupyter_server, manager) -> Iterator[dict[str, ProxyProcess]]:
    """A keyed and a keyless `jupyter-kernel-proxy`."""
    started: dict[str, ProxyProcess] = {}
    try:
        started["keyed"] = _start_proxy(jupyter_server, manager, API_KEY)
        started["keyless"] = _start_proxy(jupyter_server, manager, None)
        yield started
    finally:
        for proxy in started.values():
            proxy.stop()


@pytest.fixture
def live_proxies(proxies, manager) -> Iterator[dict[str, ProxyProcess]]:
    """The proxies; every kernel a test started through them is shut down after it, so that
    the next one has JUPYTER_MAX_KERNELS room again."""
    before = {kernel["id"] for kernel in manager.client.list_kernels()}
    yield proxies
    for kernel in manager.client.list_kernels():
        if kernel["id"] not in before:
            try:
                manager.shutdown_kernel(kernel["id"])
            except KernelNotFound:  # gone already
                pass


@pytest.mark.parametrize("kind", ["keyed", "keyless"])
def test_schemathesis_finds_nothing(live_proxies, kind):
    """`schemathesis run` with every check, every phase, as the README shows: no 5xx, no
    answer that breaks the document."""
    proxy = live_proxies[kind]
    command = [str(Path(sys.executable).parent / "schemathesis"),
               "--config-file", str(REPO / "tests" / "schemathesis.toml"),
               "run", f"{proxy.url}/openapi.json", "--checks", "all",
               "--max-examples", str(MAX_EXAMPLES), "--workers", "1", "--no-color",
               "--generation-database", "none"]
    if kind == "keyed":
        command += ["--header", f"Authorization: Bearer {API_KEY}"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert " passed" in done.stdout and "failed" not in done.stdout, done.stdout


# Output of every kind: streams, a display updated in place, a cleared output, a result.
RICH_CODE = """
import sys
from IPython.display import clear_output, display
print("to stdout")
print("to stderr", file=sys.stderr)
handle = display("first", display_id=True)
handle.update("second")
clear_output(wait=True)
display("after the clear")
6 * 7
"""
CHECKS = [schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
          schemathesis.checks.content_type_conformance,
          schemathesis.checks.response_headers_conformance,
          schemathesis.checks.response_schema_conformance,
          schemathesis_hooks.stream_ends_with_its_answer]


def test_real_answers_keep_to_the_document(live_proxies):
    """Every endpoint's answers to real work (which a fuzzer with made-up kernel ids seldom
    gets) are what the document says, streamed and async executions included."""
    proxy = live_proxies["keyed"]
    auth = {"Authorization": f"Bearer {API_KEY}"}
    schema = schemathesis.openapi.from_url(f"{proxy.url}/openapi.json", headers=auth)

    def call(method: str, path: str, body: dict | None = None, *, status: int = 200,
             path_parameters: dict | None = None, headers: dict | None = None):
        case = schema[path][method].Case(
            **({"body": body, "media_type": "application/json"} if body is not None else {}),
            path_parameters=path_parameters)
        response = case.call_and_validate(headers={**auth, **(headers or {})}, checks=CHECKS)
        assert response.status_code == status, response.text
        return response

    kernel = call("POST", "/start_kernel").json()["id"]
    try:
        assert call("POST", "/execute_code", {"id": kernel, "code": RICH_CODE}) \
            .json()["status"] == "ok"
        assert call("POST", "/execute_code", {"id": kernel, "code": "1/0"}) \
            .json()["status"] == "error"
        assert call("POST", "/execute_code", {"id": kernel, "timeout": 0.5,
                                              "code": "import time; time.sleep(5)"}) \
            .json()["status"] == "timeout"
        for body, headers in [({"code": RICH_CODE, "stream": True}, {}),
                              ({"code": "1/0", "stream": True}, {}),
                              ({"code": "print(1)"}, {"Accept": NDJSON})]:
            streamed = call("POST", "/execute_code", {"id": kernel, **body}, headers=headers)
            assert streamed.headers["content-type"][0].startswith(NDJSON)
        accepted = call("POST", "/execute_code", {"id": kernel, "mode": "async",
                                                  "code": "import time; time.sleep(1); 1"},
                        status=202).json()
        job = {"status": "running"}
        deadline = time.monotonic() + 30
        while job["status"] == "running" and time.monotonic() < deadline:
            job = call("GET", "/executions/{execution_id}",
                       path_parameters={"execution_id": accepted["execution_id"]}).json()
            time.sleep(0.2)
        assert job["status"] == "ok"
        call("POST", "/interrupt_kernel", {"id": kernel})
        assert call("POST", "/restart_kernel", {"id": kernel}).json()["state_lost"] is True
        for path in ("/kernels", "/kernelspecs", "/metrics", "/health", "/openapi.json"):
            call("GET", path)
        unknown = str(uuid.uuid4())
        call("POST", "/execute_code", {"id": unknown, "code": "1"}, status=404)
        call("GET", "/executions/{execution_id}", path_parameters={"execution_id": unknown},
             status=404)
    finally:
        call("POST", "/shutdown_kernel", {"id": kernel})
