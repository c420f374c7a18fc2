"""The client's translation of error responses into typed exceptions, and its requests as
built (no server: parsing and request building only; behaviour is tested against the
real API in tests/e2e/test_cli_user.py)."""

from __future__ import annotations

import json
import socket
import uuid

import httpx
import pytest

from ember import __version__
from ember.cli.exits import Exit, exit_code_for
from ember.client import (
    UNREACHABLE_HINT,
    ApiConflict,
    ApiError,
    ApiForbidden,
    ApiInternal,
    ApiInvalid,
    ApiNotFound,
    ApiTimeout,
    ApiUnauthorized,
    ApiUnavailable,
    Client,
    InvalidRequest,
    Unreachable,
    error_from_response,
)
from ember.client.api import path
from ember.core.errors import Conflict, Kind, NotFound, Unavailable, ValidationFailed
from ember.core.tenancy import Forbidden, Unauthorized


def envelope(code: str, message: str = "m", hint: str | None = None, **detail: object) -> bytes:
    body: dict[str, object] = {"code": code, "message": message, "detail": detail}
    if hint:
        body["hint"] = hint
    return json.dumps({"error": body}).encode()


@pytest.mark.parametrize(
    ("status", "cls", "core", "exit_code"),
    [
        (400, ApiInvalid, ValidationFailed, Exit.USAGE),
        (401, ApiUnauthorized, Unauthorized, Exit.AUTH),
        (403, ApiForbidden, Forbidden, Exit.AUTH),
        (404, ApiNotFound, NotFound, Exit.NOT_FOUND),
        (405, ApiInvalid, ValidationFailed, Exit.USAGE),
        (409, ApiConflict, Conflict, Exit.CONFLICT),
        (413, ApiInvalid, ValidationFailed, Exit.USAGE),
        (422, ApiInvalid, ValidationFailed, Exit.USAGE),
        (429, ApiInvalid, ValidationFailed, Exit.USAGE),
        (503, ApiUnavailable, Unavailable, Exit.UNREACHABLE),
        (504, ApiTimeout, ApiError, Exit.TIMEOUT),
        (500, ApiInternal, ApiError, Exit.UNEXPECTED),
        (502, ApiInternal, ApiError, Exit.UNEXPECTED),
    ],
)
def test_status_maps_to_the_core_kind_and_exit_code(
    status: int, cls: type[ApiError], core: type[Exception], exit_code: Exit
) -> None:
    error = error_from_response(status, {}, envelope("some.code"))
    assert type(error) is cls
    assert isinstance(error, core) and isinstance(error, ApiError)
    assert exit_code_for(error) == exit_code
    assert error.status == status


def test_the_servers_code_message_hint_and_detail_are_kept() -> None:
    error = error_from_response(
        404,
        {"X-Request-Id": "req-1", "content-type": "application/json"},
        envelope("app.not_found", "no app 'x' in org 'acme'", "'ember apps list'", app="x"),
    )
    assert isinstance(error, NotFound) and error.kind is Kind.NOT_FOUND
    assert error.code == "app.not_found"  # the instance's code, not the class's
    assert ApiNotFound.code == "api.not_found"
    assert (error.message, error.hint, error.detail) == (
        "no app 'x' in org 'acme'",
        "'ember apps list'",
        {"app": "x"},
    )
    assert error.request_id == "req-1"
    assert error.to_dict() == {
        "code": "app.not_found",
        "message": "no app 'x' in org 'acme'",
        "detail": {"app": "x"},
        "hint": "'ember apps list'",
        "request_id": "req-1",
    }


def test_a_missing_hint_gets_the_kinds_default() -> None:
    error = error_from_response(401, {}, envelope("auth.unauthorized"))
    assert error.hint is not None and "ember login" in error.hint
    conflict = error_from_response(409, {}, envelope("name.taken", hint="pick another name"))
    assert conflict.hint == "pick another name"


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>502 Bad Gateway</body></html>",
        b"",
        None,
        b'{"detail": "Not Found"}',  # FastAPI's default shape, not our envelope
        b'{"error": "flat string"}',
        b"[1, 2]",
    ],
)
def test_a_body_that_is_not_the_envelope_still_maps_by_status(body: bytes | None) -> None:
    error = error_from_response(502, {}, body)
    assert isinstance(error, ApiInternal)
    assert error.code == "api.internal"
    assert error.message.startswith("the API answered HTTP 502")
    assert error.hint  # always something to do next
    not_found = error_from_response(404, {}, body)
    assert isinstance(not_found, ApiNotFound) and not_found.code == "api.not_found"


def test_html_is_quoted_in_the_message_but_shortened() -> None:
    error = error_from_response(502, {}, b"<h1>" + b"x" * 1000 + b"</h1>")
    assert error.message.startswith("the API answered HTTP 502: <h1>xxx")
    assert error.message.endswith("...") and len(error.message) < 260


def test_a_transport_maps_envelopes_through_the_client() -> None:
    """httpx.MockTransport only feeds a canned envelope through the client's parsing."""
    canned = envelope("org.not_found", "no org 'x'", "'ember orgs' lists yours", org="x")

    def answer(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, content=canned, headers={"x-request-id": "r"})

    client = Client("http://api.test", "tok", transport=httpx.MockTransport(answer))
    with client, pytest.raises(ApiNotFound) as caught:
        client.get_app("x", "y")
    assert caught.value.code == "org.not_found" and caught.value.detail == {"org": "x"}
    assert caught.value.hint == "'ember orgs' lists yours"


def test_an_answer_that_is_not_the_model_is_an_internal_error() -> None:
    def answer(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"unexpected": True})

    client = Client("http://api.test", "tok", transport=httpx.MockTransport(answer))
    with client, pytest.raises(ApiInternal, match="not a valid App") as caught:
        client.get_app("o", "a")
    assert exit_code_for(caught.value) == Exit.UNEXPECTED


def test_requests_carry_auth_user_agent_and_a_fresh_idempotency_key_on_post() -> None:
    with Client("http://api.test/", "secret") as client:
        post = client.build_request("POST", "/v1/orgs", json={"name": "acme"})
        again = client.build_request("POST", "/v1/orgs", json={"name": "acme"})
        get = client.build_request("GET", "/v1/orgs")
    assert post.headers["authorization"] == "Bearer secret"
    assert post.headers["user-agent"] == f"ember-cli/{__version__}"
    key = post.headers["idempotency-key"]
    assert uuid.UUID(key).version == 4
    assert again.headers["idempotency-key"] != key
    assert "idempotency-key" not in get.headers
    assert str(get.url) == "http://api.test/v1/orgs"
    with Client("http://api.test", None) as anonymous:
        assert "authorization" not in anonymous.build_request("GET", "/readyz").headers


def test_names_are_single_path_segments() -> None:
    assert path("v1", "orgs", "a/b", "apps", "..") == "/v1/orgs/a%2Fb/apps/.."
    assert path("v1", "tokens", "tok_1 2") == "/v1/tokens/tok_1%202"


@pytest.mark.parametrize("url", ["localhost:7070", "ftp://x", "http://", "not a url"])
def test_a_bad_api_url_is_a_validation_error(url: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        Client(url, "t")
    assert caught.value.detail == {"field": "api_url"}
    assert exit_code_for(caught.value) == Exit.USAGE


def test_request_bodies_are_checked_before_sending() -> None:
    def never(_request: httpx.Request) -> httpx.Response:
        raise AssertionError("sent")

    with Client("http://api.test", "t", transport=httpx.MockTransport(never)) as client:
        with pytest.raises(InvalidRequest) as caught:
            client.create_token("x" * 101)
        assert caught.value.detail == {"field": "name"}
        with pytest.raises(InvalidRequest, match="capabilities"):
            client.create_token("ok", capabilities=["root"])


def test_no_answer_is_unreachable_with_a_hint_and_the_cause() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        client = Client(f"http://127.0.0.1:{port}", "t", retries=1)
        with client, pytest.raises(Unreachable) as caught:
            client.whoami()
    error = caught.value
    assert isinstance(error, Unavailable) and exit_code_for(error) == Exit.UNREACHABLE
    assert error.hint == UNREACHABLE_HINT
    assert error.code == "api.unreachable"
    assert isinstance(error.__cause__, httpx.ConnectError)
    assert error.detail == {"api_url": f"http://127.0.0.1:{port}"}


def test_a_silent_server_times_out_as_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)  # accepts into the backlog, never answers
        port = sock.getsockname()[1]
        client = Client(f"http://127.0.0.1:{port}", "t", timeout=0.2)
        with client, pytest.raises(Unreachable, match="no answer") as caught:
            client.whoami()
    assert isinstance(caught.value.__cause__, httpx.TimeoutException)
