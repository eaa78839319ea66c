"""Token endpoint plumbing against answers real servers give and the local fixture does not."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from webapp.providers import DEFAULTS, Provider
from webapp.services.provider_http import (
    ProviderFailure,
    classify,
    client_auth,
    new_session,
    parse_body,
    parse_scope,
    token_request,
)


def _response(status: int, body: str, content_type: str, **headers: str) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = body.encode()
    response.headers.update({"Content-Type": content_type, **headers})
    return response


def _provider(**fields: Any) -> Provider:
    values = {"name": "google", **DEFAULTS["google"], "client_id": "cid", "client_secret": "sec"}
    return replace(Provider(**values), **fields)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a b  c", ["a", "b", "c"]),
        ("a,b,c", ["a", "b", "c"]),
        ("a, b", ["a", "b"]),
        (["a", "b", 3], ["a", "b"]),
        ("", None),
        (None, None),
        (42, None),
    ],
)
def test_parse_scope(value, expected):
    assert parse_scope(value) == expected


def test_form_encoded_error_is_classified_like_json():
    response = _response(
        400, "error=invalid_grant&error_description=gone", "application/x-www-form-urlencoded"
    )
    failure = classify(response, parse_body(response))
    assert failure is not None and failure.kind == "permanent"
    assert failure.error_code == "invalid_grant" and failure.description == "gone"


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (400, "<html><body>Bad Request</body></html>", "text/html"),
        (200, "not json at all", "text/plain"),
        (400, "oops", "application/x-www-form-urlencoded"),
        (400, '<html><a href="/retry?x=1&error=server_error">retry</a></html>', "text/html"),
        (502, "Bad gateway: error=upstream", "text/plain"),
    ],
)
def test_garbage_stays_transient(status, body, content_type):
    response = _response(status, body, content_type)
    failure = classify(response, parse_body(response))
    assert failure is not None and failure.kind == "transient"
    assert failure.error_code == "invalid_response"


def test_retry_after_http_date():
    response = _response(
        503, "busy", "text/plain", **{"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}
    )
    failure = classify(response, parse_body(response))
    assert failure is not None and failure.retry_after == 0.0  # in the past: retry now


def test_client_secret_basic_credentials_are_form_encoded():
    form: dict[str, str] = {}
    auth = client_auth(
        _provider(
            client_id="a:b", client_secret="x+y/z= %", token_auth_method="client_secret_basic"
        ),
        form,
    )
    assert auth == ("a%3Ab", "x%2By%2Fz%3D%20%25") and form == {}
    form = {}
    assert client_auth(_provider(), form) is None
    assert form == {"client_id": "cid", "client_secret": "sec"}


@pytest.fixture
def cookie_server() -> Iterator[tuple[str, list[str | None], list[str | None], list[str]]]:
    """A token endpoint that sets a cookie on every answer and records what it is sent
    (cookies, Authorization headers, request targets: absolute when used as a proxy)."""
    cookies: list[str | None] = []
    auths: list[str | None] = []
    paths: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            paths.append(self.path)
            cookies.append(self.headers.get("Cookie"))
            auths.append(self.headers.get("Authorization"))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"access_token": "at", "token_type": "bearer"}).encode()
            self.send_response(200)
            self.send_header("Set-Cookie", "fpc=per-user-state; Path=/")
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/token", cookies, auths, paths
    server.shutdown()
    server.server_close()


def test_token_requests_carry_no_cookies_and_basic_auth(cookie_server):
    url, cookies, auths, _paths = cookie_server
    provider = _provider(
        token_url=url, client_secret="s+c:r", token_auth_method="client_secret_basic"
    )
    for _ in range(3):
        answer = token_request(provider, {"grant_type": "refresh_token"}, timeout=5)
        assert answer["access_token"] == "at"
    assert cookies == [None, None, None]
    expected = base64.b64encode(b"cid:s%2Bc%3Ar").decode()
    assert auths == [f"Basic {expected}"] * 3


@pytest.mark.parametrize(
    ("environ", "trust_env", "verify"),
    [
        ({}, False, True),
        ({"REQUESTS_CA_BUNDLE": "/etc/ca.pem", "PATH": "/bin"}, False, "/etc/ca.pem"),
        ({"CURL_CA_BUNDLE": "/etc/curl.pem"}, False, "/etc/curl.pem"),
        ({"https_proxy": "http://proxy:3128"}, True, True),
        ({"NO_PROXY": "example.com"}, True, True),
    ],
)
def test_the_environment_is_read_once_unless_a_proxy_is_set(environ, trust_env, verify):
    session = new_session(environ)
    assert (session.trust_env, session.verify) == (trust_env, verify)


def test_a_proxy_in_the_environment_is_still_used(cookie_server, monkeypatch):
    proxy, _cookies, _auths, paths = cookie_server
    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.removesuffix("/token"))  # requests reads it itself
    provider = _provider(token_url="http://oauth.provider.test/token")
    session = new_session({"HTTP_PROXY": "set"})
    answer = token_request(provider, {"grant_type": "refresh_token"}, 5, session)
    assert answer["access_token"] == "at"
    assert paths == ["http://oauth.provider.test/token"]  # sent to the proxy


def test_unreachable_token_endpoint_is_transient():
    with pytest.raises(ProviderFailure) as caught:
        token_request(_provider(token_url="http://127.0.0.1:9/token"), {}, timeout=2)
    assert caught.value.kind == "transient" and caught.value.error_code == "connection_error"
