"""The foundation: auth, error envelope, OpenAPI, docs, probes."""

from __future__ import annotations

import time

import jwt
import pytest
from openapi_spec_validator import validate

from tests.conftest import JWT_SECRET


def test_healthz_answers_without_token(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"status": "ok"}


def test_readyz_checks_database_and_redis(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json["checks"] == {"database": "ok", "redis": "ok"}


def test_readyz_names_redis_when_it_is_down(base_env):
    from tests.conftest import make_app

    app = make_app(base_env, REDIS_URL="redis://127.0.0.1:1/0")
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.json["error"]["code"] == "not_ready"
    assert "redis" in response.json["error"]["message"]


def test_me_without_token_is_json_401_with_bearer_challenge(client):
    response = client.get("/api/v1/me")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json["error"]["code"] == "unauthorized"


def test_me_answers_the_callers_ids_and_roles(client, auth_headers):
    response = client.get("/api/v1/me", headers=auth_headers(7, 3, admin=True))
    assert response.status_code == 200
    assert response.json == {"user_id": 7, "organization_id": 3, "roles": ["admin"]}


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        jwt.encode({"sub": "1", "org": "1", "exp": time.time() + 60}, "y" * 40, "HS256"),
        jwt.encode({"sub": "1", "org": "1", "exp": time.time() - 60}, JWT_SECRET, "HS256"),
        jwt.encode({"sub": "1", "org": "1"}, JWT_SECRET, "HS256"),
        jwt.encode({"sub": "abc", "org": "1", "exp": time.time() + 60}, JWT_SECRET, "HS256"),
        jwt.encode({"sub": "1", "exp": time.time() + 60}, JWT_SECRET, "HS256"),
        jwt.encode({"sub": "1", "org": "1", "exp": time.time() + 60}, JWT_SECRET, "HS512"),
        jwt.encode({"sub": "1", "org": "1", "exp": time.time() + 60}, None, "none"),
    ],
    ids=["garbage", "wrong-key", "expired", "no-exp", "bad-sub", "no-org", "hs512", "alg-none"],
)
def test_bad_tokens_are_401(client, token):
    response = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert response.json["error"]["code"] == "unauthorized"


def test_unknown_route_is_json_404(client):
    response = client.get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert response.json["error"]["code"] == "not_found"


def test_wrong_method_is_405_with_allow(client, auth_headers):
    response = client.delete("/api/v1/me", headers=auth_headers())
    assert response.status_code == 405
    assert response.json["error"]["code"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]


def test_oversized_body_is_413(client, auth_headers):
    response = client.post(
        "/api/v1/accounts",
        data=b"x" * (2 * 1024 * 1024),
        headers={**auth_headers(), "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json["error"]["code"] == "payload_too_large"


def test_unhandled_exception_is_500_with_request_id_and_no_trace(base_env):
    from tests.conftest import make_app

    app = make_app(base_env)

    @app.get("/boom-for-test")
    def boom():
        raise RuntimeError("secret detail that must not leak")

    client = app.test_client()
    response = client.get("/boom-for-test", headers={"X-Request-ID": "req-123"})
    assert response.status_code == 500
    body = response.json["error"]
    assert body["code"] == "internal_error"
    assert body["request_id"] == "req-123"
    assert "secret detail" not in response.get_data(as_text=True)
    assert "Traceback" not in response.get_data(as_text=True)


def test_openapi_document_has_bearer_scheme_and_error_envelope(client):
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    spec = response.json
    validate(spec)  # raises on any OpenAPI 3 schema violation
    assert spec["openapi"].startswith("3.")
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert "/api/v1/me" in spec["paths"]
    assert "Error" in spec["components"]["schemas"]


def test_docs_page_uses_local_assets_only(client):
    page = client.get("/api/v1/docs")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "https://" not in html and "http://" not in html
    assert "<script>" not in html  # no inline script
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert client.get("/api/v1/docs/assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/api/v1/docs/swagger-initializer.js").status_code == 200


def test_security_headers_on_api_answers(client):
    response = client.get("/healthz")
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Request-ID"]
