"""Malformed requests of every kind get JSON errors, never a 500 or an HTML page."""

from __future__ import annotations

import re

import pytest

BAD_BODIES = [
    (b"{not json", "application/json"),
    (b"[]", "application/json"),
    (b'{"to": "not-a-list", "limit": -1}', "application/json"),
    (b"\xff\xfe\x00garbage", "application/json"),
    (b"a=b&c=d", "application/x-www-form-urlencoded"),
    (b'{"email_address": 5, "imap_port": "x"}', "application/json"),
]
BAD_QUERIES = [
    "limit=abc",
    "limit=-5",
    "cursor=%ff%fe",
    "since=yesterday",
    "status=" + "x" * 5000,
    "within_hours=1e99",
    "async=maybe",
    "response=xml",
]


def _paths(client) -> list[tuple[str, str]]:
    spec = client.get("/api/v1/openapi.json").json
    result = []
    for path, operations in spec["paths"].items():
        concrete = re.sub(r"\{provider\}", "google", path)
        concrete = re.sub(r"\{[a-z_]+\}", "1", concrete)
        for method in operations:
            if method in {"get", "post", "patch", "delete", "put"}:
                result.append((method, concrete))
    return result


def _check(response) -> None:
    assert response.status_code < 500, response.get_data(as_text=True)[:300]
    if response.status_code != 204 and response.status_code != 302:
        assert response.is_json, response.get_data(as_text=True)[:300]
        if response.status_code >= 400:
            assert set(response.json) == {"error"}
            assert {"code", "message"} <= set(response.json["error"])


@pytest.mark.parametrize("admin", [False, True])
def test_every_endpoint_survives_garbage(client, auth_headers, admin):
    headers = auth_headers(admin=admin)
    paths = _paths(client)
    assert len(paths) >= 15
    for method, path in paths:
        call = getattr(client, method)
        for query in BAD_QUERIES:
            _check(call(f"{path}?{query}", headers=headers))
        if method in {"post", "patch", "put"}:
            for body, content_type in BAD_BODIES:
                _check(call(path, data=body, headers={**headers, "Content-Type": content_type}))
        _check(call(path))  # no token at all
        _check(call(path, headers={"Authorization": "Bearer \x00\x01"}))


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/oauth/tokens/99999999999999999999999",
        "/api/v1/oauth/tokens/-1",
        "/api/v1/oauth/tokens/abc",
        "/api/v1/accounts/1%00",
        "/api/v1/%2e%2e/%2e%2e/etc/passwd",
        "/api/v1/oauth/login/" + "g" * 3000,
        "/api/v1/oauth/callback/google?state=" + "s" * 10000,
    ],
)
def test_odd_paths_are_json(client, auth_headers, path):
    _check(client.get(path, headers=auth_headers()))


def test_malformed_json_body_is_400_bad_request(client, auth_headers):
    response = client.post(
        "/api/v1/accounts",
        data=b"{oops",
        headers={**auth_headers(), "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json["error"]["code"] == "bad_request"


def test_validation_errors_are_422_with_fields(client, auth_headers):
    response = client.post("/api/v1/accounts", json={"imap_port": "x"}, headers=auth_headers())
    assert response.status_code == 422
    fields = response.json["error"]["fields"]
    assert {"email_address", "imap_host", "password", "imap_port"} <= set(fields)
