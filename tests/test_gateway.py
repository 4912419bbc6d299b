"""What Kernel Gateway and Enterprise Gateway do that jupyter_server does not, and what the
proxy makes of it. (Everything they share is tested against both upstreams through the
`jupyter_server` fixture.)

- A gateway refuses a wrong token with 401 and answers 403 to other refusals: a kernel start
  past its own kernel limit, and any listing of kernels unless listing is turned on. These
  must not read "check JUPYTER_TOKEN" (jupyter_server answers a wrong token with 403).
- Their answers are scripted here for the Python API, and met for real through the proxy.
"""

from __future__ import annotations

import traceback

import pytest
import responses

from app import create_app
from app.kernels.client import JupyterClient
from app.kernels.errors import (
    KernelError,
    TooManyKernels,
    UpstreamAuthError,
    UpstreamError,
)
from app.settings import Settings
from tests.gateway import EnterpriseGatewayServer, KernelGatewayServer

TOKEN = "s3cret-upstream-token-0123456789"
BASE = "http://gateway.test:8888"
SPECS = {"default": "python3", "kernelspecs": {"python3": {"name": "python3"}}}


def forbidden(message: str) -> dict:
    """A gateway's JSON error body (KG's and EG's `JSONErrorsMixin`), carrying the token as an
    upstream text might.
    """
    return {"reason": "Forbidden", "message": f"{message} (token {TOKEN})"}


def assert_no_upstream_text(err: KernelError) -> None:
    for text in (str(err), repr(err.details), "".join(traceback.format_exception(err))):
        assert TOKEN not in text
        assert "has been set to" not in text


@pytest.fixture
def client():
    with JupyterClient(Settings(server_url=BASE, token=TOKEN)) as jupyter:
        yield jupyter


@pytest.fixture
def upstream():
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


# -- scripted answers: Kernel Gateway's and Enterprise Gateway's words ------------------------

@pytest.mark.parametrize("message", [
    "Resource Limit",  # KG (and EG 2) at max_kernels
    "A max kernels limit has been set to 4 and there are currently 4 active and pending "
    "kernels.",  # EG 3 at max_kernels
    "A max kernels per user limit has been set to 1 and user 'alice' currently has 1 active "
    "and pending kernel.",  # EG 3 at max_kernels_per_user
], ids=["kg-max-kernels", "eg-max-kernels", "eg-max-kernels-per-user"])
def test_a_gateways_own_kernel_limit_is_too_many_kernels(client, upstream, message):
    upstream.get(f"{BASE}/api/kernelspecs", json=SPECS)
    upstream.post(f"{BASE}/api/kernels", status=403, json=forbidden(message))
    with pytest.raises(TooManyKernels) as caught:
        client.start_kernel("python3")
    assert "KG_MAX_KERNELS" in caught.value.message
    assert "JUPYTER_TOKEN" not in caught.value.message
    assert_no_upstream_text(caught.value)


def test_another_refused_start_names_enterprise_gateways_user_checks(client, upstream):
    upstream.get(f"{BASE}/api/kernelspecs", json=SPECS)
    upstream.post(f"{BASE}/api/kernels", status=403, json=forbidden(
        "User 'root' is not authorized to start kernel 'Python 3'. Ensure KERNEL_USERNAME is "
        "set to an appropriate value and retry the request."))
    with pytest.raises(UpstreamError) as caught:
        client.start_kernel("python3")
    assert not isinstance(caught.value, UpstreamAuthError)
    assert "KERNEL_USERNAME" in caught.value.message
    assert caught.value.details["upstream_status"] == 403
    assert_no_upstream_text(caught.value)


def test_a_refused_listing_with_a_good_token_says_how_to_turn_listing_on(client, upstream):
    upstream.get(f"{BASE}/api/kernels", status=403, json=forbidden("Forbidden"))
    upstream.get(f"{BASE}/api/kernelspecs", json=SPECS)
    with pytest.raises(UpstreamError) as caught:
        client.list_kernels()
    assert not isinstance(caught.value, UpstreamAuthError)
    assert "KG_LIST_KERNELS=True" in caught.value.message
    assert_no_upstream_text(caught.value)


def test_a_refused_listing_with_a_refused_token_is_still_the_token(client, upstream):
    # jupyter_server answers a wrong token with 403 everywhere.
    upstream.get(f"{BASE}/api/kernels", status=403, json=forbidden("Forbidden"))
    upstream.get(f"{BASE}/api/kernelspecs", status=403, json=forbidden("Forbidden"))
    with pytest.raises(UpstreamAuthError) as caught:
        client.list_kernels()
    assert "JUPYTER_TOKEN" in caught.value.message


# -- real gateways with their defaults for listing, and a kernel limit -----------------------

@pytest.fixture(scope="module", params=[KernelGatewayServer, EnterpriseGatewayServer],
                ids=["kernel_gateway", "enterprise_gateway"])
def strict_gateway(request):
    """A gateway as it comes (no listing) with a limit of one kernel."""
    with request.param(startup_timeout=120, list_kernels=False, max_kernels=1) as server:
        yield server


@pytest.fixture
def strict_settings(strict_gateway):
    return Settings(server_url=strict_gateway.url, token=strict_gateway.token,
                    timeout_connect=5, timeout_total=30)


def test_gateway_kernel_limit_is_429_and_listing_off_is_a_clear_502(strict_settings):
    http = create_app(strict_settings).test_client()
    first = http.post("/start_kernel")
    assert first.status_code == 200, first.get_json()
    try:
        refused = http.post("/start_kernel")
        assert refused.status_code == 429, refused.get_json()
        assert refused.get_json()["error"] == "too_many_kernels"
        assert "KG_MAX_KERNELS" in refused.get_json()["message"]

        listing = http.get("/kernels")
        assert listing.status_code == 502, listing.get_json()
        assert listing.get_json()["error"] == "bad_upstream_response"
        assert "KG_LIST_KERNELS=True" in listing.get_json()["message"]

        # JUPYTER_MAX_KERNELS counts with the listing: the start says why it cannot.
        counted = create_app(strict_settings.replace(max_kernels=5)).test_client()
        refused = counted.post("/start_kernel")
        assert refused.status_code == 502, refused.get_json()
        assert "KG_LIST_KERNELS=True" in refused.get_json()["message"]
    finally:
        http.post("/shutdown_kernel", json={"id": first.get_json()["id"]})


def test_gateway_refuses_a_wrong_token_with_401_which_is_the_token(strict_settings):
    http = create_app(strict_settings.replace(token="wrong-token-123")).test_client()
    for response in (http.post("/start_kernel"), http.get("/kernels")):
        assert response.status_code == 502, response.get_json()
        assert response.get_json()["error"] == "upstream_auth_failed"
        assert "wrong-token-123" not in response.get_data(as_text=True)


class RefusingEnterpriseGateway(EnterpriseGatewayServer):
    """Enterprise Gateway authorizing another user than the one its kernels would run as."""

    def config(self) -> str:
        return super().config() + 'c.EnterpriseGatewayApp.authorized_users = {"someone-else"}\n'


def test_a_user_enterprise_gateway_does_not_authorize_is_a_502_that_names_the_setting():
    with RefusingEnterpriseGateway(startup_timeout=120) as server:
        http = create_app(Settings(server_url=server.url, token=server.token)).test_client()
        refused = http.post("/start_kernel")
        assert refused.status_code == 502, refused.get_json()
        assert refused.get_json()["error"] == "bad_upstream_response"
        assert "KERNEL_USERNAME" in refused.get_json()["message"]
        assert "JUPYTER_TOKEN" not in refused.get_json()["message"]
        assert server.token not in refused.get_data(as_text=True)


# -- KERNEL_ variables in the start request --------------------------------------------------

def test_kernel_env_in_a_start_request_reaches_only_a_gateways_kernel(
        jupyter_server, settings, manager):
    env = {"KERNEL_USERNAME": "alice", "NOT_A_KERNEL_VARIABLE": "x"}
    with JupyterClient(settings) as client:
        kernel_id = client.start_kernel("python3", env=env)["id"]
    try:
        answer = manager.execute_code(kernel_id, "import os\nprint(os.environ.get("
                                      "'KERNEL_USERNAME'), os.environ.get('NOT_A_KERNEL_VARIABLE'),"
                                      " 'HOME' in os.environ,"
                                      " get_ipython().history_manager.enabled)")
    finally:
        manager.shutdown_kernel(kernel_id)
    # (History is off in every test kernel: see conftest; a gateway passes IPYTHONDIR on.)
    if jupyter_server.kind != "jupyter_server":
        # KERNEL_* passes; anything else only if whitelisted; the gateway's own environment
        # (HOME, ...) is no longer inherited once a request carries an env.
        assert answer["stdout"] == "alice None False False\n"
    else:
        assert answer["stdout"] == "None None True False\n"
