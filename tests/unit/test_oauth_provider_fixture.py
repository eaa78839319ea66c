"""Tests of the local OAuth2/OIDC provider used by the rest of the test suite."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import requests
from authlib.integrations.requests_client import OAuth2Session

from tests.support.oauth_provider import OAuthProvider, ScriptedResponse

REDIRECT_URI = "http://localhost:5000/oauth/callback"
LONG_SECRET = "s" * 40  # >= 32 bytes so PyJWT verifies HS256 without InsecureKeyLengthWarning


@pytest.fixture
def provider() -> Iterator[OAuthProvider]:
    with OAuthProvider() as p:
        yield p


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorize(p: OAuthProvider, challenge: str | None, **extra: str) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": p.client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": "openid email",
        "state": "st-1",
        **extra,
    }
    if challenge is not None:
        params |= {"code_challenge": challenge, "code_challenge_method": "S256"}
    resp = requests.get(p.url("authorize"), params=params, allow_redirects=False, timeout=5)
    assert resp.status_code == 302
    location = resp.headers["Location"]
    assert location.startswith(REDIRECT_URI + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def redeem(p: OAuthProvider, code: str, verifier: str) -> requests.Response:
    return requests.post(
        p.url("token"),
        timeout=5,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
            "client_id": p.client_id,
            "client_secret": p.client_secret,
        },
    )


def refresh(p: OAuthProvider, token: str, session: requests.Session | None = None):
    return (session or requests).post(
        p.url("token"),
        timeout=5,
        data={
            "grant_type": "refresh_token",
            "refresh_token": token,
            "client_id": p.client_id,
            "client_secret": p.client_secret,
        },
    )


@pytest.mark.parametrize("method", ["client_secret_post", "client_secret_basic"])
def test_full_pkce_flow_with_authlib(method: str) -> None:
    with OAuthProvider(client_secret=LONG_SECRET, token_auth_method=method) as p:
        client = OAuth2Session(
            p.client_id,
            p.client_secret,
            scope="openid email",
            redirect_uri=REDIRECT_URI,
            code_challenge_method="S256",
            token_endpoint_auth_method=method,
        )
        verifier = secrets.token_urlsafe(48)
        url, state = client.create_authorization_url(
            p.url("authorize"),
            code_verifier=verifier,
            login_hint="alice@example.com",
            access_type="offline",
            prompt="consent",
            nonce="n-123",
        )
        resp = requests.get(url, allow_redirects=False, timeout=5)
        assert resp.status_code == 302
        assert parse_qs(urlsplit(resp.headers["Location"]).query)["state"] == [state]
        assert p.authorize_requests[-1]["access_type"] == "offline"

        token = client.fetch_token(
            p.url("token"),
            authorization_response=resp.headers["Location"],
            code_verifier=verifier,
        )
        assert token["token_type"] == "Bearer"
        assert token["scope"] == "openid email"
        assert token["expires_in"] == 3600
        assert token["refresh_token"]
        claims = jwt.decode(
            token["id_token"],
            LONG_SECRET,
            algorithms=["HS256"],
            audience=p.client_id,
            issuer=p.base_url,
        )
        assert claims["email"] == claims["preferred_username"] == "alice@example.com"
        assert claims["sub"] == p.sub_for("alice@example.com")
        assert claims["nonce"] == "n-123"

        info = client.get(p.url("userinfo"), timeout=5).json()
        assert info == {"sub": claims["sub"], "email": "alice@example.com", "email_verified": True}
        assert p.calls["token"] == 1 and p.calls["authorize"] == 1


def test_id_token_audience_with_default_secret(provider: OAuthProvider) -> None:
    tokens = provider.issue_tokens_for("bob@example.com")
    claims = jwt.decode(tokens["id_token"], options={"verify_signature": False})
    assert claims["aud"] == "test-client"
    assert claims["iss"] == provider.base_url
    assert claims["exp"] - claims["iat"] == 3600


def test_pkce_is_enforced(provider: OAuthProvider) -> None:
    assert authorize(provider, None) == {
        "error": "invalid_request",
        "error_description": "PKCE required",
        "state": "st-1",
    }
    verifier, challenge = pkce_pair()
    code = authorize(provider, challenge)["code"]
    resp = redeem(provider, code, verifier + "x")
    assert resp.status_code == 400
    assert resp.json()["error"] == "invalid_grant"


def test_code_is_single_use_and_redirect_uri_checked(provider: OAuthProvider) -> None:
    verifier, challenge = pkce_pair()
    code = authorize(provider, challenge)["code"]
    first = redeem(provider, code, verifier)
    assert first.status_code == 200
    assert first.headers["Cache-Control"] == "no-store"
    second = redeem(provider, code, verifier)
    assert second.status_code == 400
    assert second.json() == {
        "error": "invalid_grant",
        "error_description": "authorization code already used",
    }
    code = authorize(provider, challenge)["code"]
    resp = requests.post(
        provider.url("token"),
        timeout=5,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": verifier,
            "redirect_uri": "http://evil.example/cb",
            "client_id": "test-client",
            "client_secret": "test-secret",
        },
    )
    assert resp.json()["error"] == "invalid_grant"


def test_client_authentication() -> None:
    with OAuthProvider(token_auth_method="client_secret_basic") as p:
        rt = p.issue_tokens_for("a@example.com")["refresh_token"]
        as_post = refresh(p, rt)  # right secret, wrong method
        assert as_post.status_code == 401
        assert as_post.json()["error"] == "invalid_client"
        data = {"grant_type": "refresh_token", "refresh_token": rt}
        wrong = requests.post(p.url("token"), data=data, auth=("test-client", "nope"), timeout=5)
        assert wrong.status_code == 401
        creds = ("test-client", "test-secret")
        ok = requests.post(p.url("token"), data=data, auth=creds, timeout=5)
        assert ok.status_code == 200


@pytest.mark.parametrize("rotation", ["none", "rotate", "strict"])
def test_refresh_rotation(rotation: str) -> None:
    with OAuthProvider(rotation=rotation) as p:
        old = p.issue_tokens_for("a@example.com", scope="mail")["refresh_token"]
        first = refresh(p, old).json()
        assert first["scope"] == "mail"
        if rotation == "none":
            assert "refresh_token" not in first
        else:
            assert first["refresh_token"] not in (None, old)
            assert refresh(p, first["refresh_token"]).status_code == 200
        again = refresh(p, old)
        if rotation == "strict":
            assert again.status_code == 400
            assert again.json()["error"] == "invalid_grant"
            assert not p.refresh_token_alive(old)
        else:
            assert again.status_code == 200


def test_concurrent_strict_refresh_only_one_wins() -> None:
    with OAuthProvider(rotation="strict") as p:
        rt = p.issue_tokens_for("a@example.com")["refresh_token"]
        p.script("token", *[ScriptedResponse(delay=0.2) for _ in range(20)])
        with ThreadPoolExecutor(20) as pool:
            statuses = sorted(r.status_code for r in pool.map(lambda _: refresh(p, rt), range(20)))
        assert statuses == [200] + [400] * 19
        assert p.calls["token"] == 20 and len(p.requests) == 20
        assert p.max_concurrent["token"] > 1


def test_scripted_responses(provider: OAuthProvider) -> None:
    rt = provider.issue_tokens_for("a@example.com")["refresh_token"]
    provider.script(
        "token",
        ScriptedResponse(
            status=429, json={"error": "temporarily_unavailable"}, headers={"Retry-After": "3"}
        ),
        ScriptedResponse(status=200, body="<html>not json</html>"),
        ScriptedResponse(),
    )
    provider.fail_token_with("invalid_grant", description="Bad Request")
    with requests.Session() as session:  # keep-alive across all of these
        limited = refresh(provider, rt, session)
        assert limited.status_code == 429
        assert limited.headers["Retry-After"] == "3"
        assert limited.json() == {"error": "temporarily_unavailable"}
        html = refresh(provider, rt, session)
        assert html.status_code == 200 and html.text == "<html>not json</html>"
        assert refresh(provider, rt, session).status_code == 503
        failed = refresh(provider, rt, session)
        assert failed.json() == {"error": "invalid_grant", "error_description": "Bad Request"}
        assert refresh(provider, rt, session).status_code == 200  # script exhausted
    provider.script("token", ScriptedResponse(delay=0.3))
    started = time.monotonic()
    assert refresh(provider, rt).status_code == 200
    assert time.monotonic() - started >= 0.3
    provider.script("token", ScriptedResponse(delay=2.0))
    with pytest.raises(requests.Timeout):
        requests.post(provider.url("token"), data={}, timeout=0.3)
    assert provider.errors == []


def test_revoke_and_introspection(provider: OAuthProvider) -> None:
    tokens = provider.issue_tokens_for("carol@example.com", scope="openid email mail")
    at, rt = tokens["access_token"], tokens["refresh_token"]
    active = requests.post(provider.url("introspect"), data={"token": at}, timeout=5).json()
    assert active["active"] is True
    assert active["email"] == "carol@example.com"
    assert active["scope"] == "openid email mail"
    assert active["client_id"] == "test-client"
    assert active["sub"] == provider.sub_for("carol@example.com")
    assert active["exp"] > time.time()

    assert requests.post(provider.url("revoke"), data={"token": rt}, timeout=5).status_code == 200
    assert provider.revoked == [rt]
    for token in (at, rt, "never-issued"):
        resp = requests.post(provider.url("introspect"), data={"token": token}, timeout=5)
        assert resp.json() == {"active": False}
    assert refresh(provider, rt).json()["error"] == "invalid_grant"
    userinfo = requests.get(
        provider.url("userinfo"), headers={"Authorization": f"Bearer {at}"}, timeout=5
    )
    assert userinfo.status_code == 401


def test_expiry_and_grant_helpers(provider: OAuthProvider) -> None:
    tokens = provider.issue_tokens_for("dave@example.com")
    headers = {"Authorization": f"Bearer {tokens['access_token']}"}
    assert requests.get(provider.url("userinfo"), headers=headers, timeout=5).ok
    provider.expire_access_token(tokens["access_token"])
    assert requests.get(provider.url("userinfo"), headers=headers, timeout=5).status_code == 401
    assert refresh(provider, tokens["refresh_token"]).ok  # refresh token still live
    assert provider.revoke_grant_for("dave@example.com") == 1
    assert refresh(provider, tokens["refresh_token"]).json()["error"] == "invalid_grant"


def test_deny_and_scope_toggles(provider: OAuthProvider) -> None:
    verifier, challenge = pkce_pair()
    provider.deny_next = True
    assert authorize(provider, challenge)["error"] == "access_denied"
    provider.next_user_email = "erin@example.com"
    provider.granted_scopes = "openid"
    code = authorize(provider, challenge)["code"]  # deny_next was one-shot
    body = redeem(provider, code, verifier).json()
    assert body["scope"] == "openid"
    claims = jwt.decode(body["id_token"], options={"verify_signature": False})
    assert claims["email"] == "erin@example.com"
    provider.omit_scope_in_response = True
    assert "scope" not in refresh(provider, body["refresh_token"]).json()
    provider.reset()
    assert provider.granted_scopes is None and provider.calls["token"] == 0
    assert refresh(provider, body["refresh_token"]).json()["error"] == "invalid_grant"


def test_env_and_lifecycle() -> None:
    p = OAuthProvider(client_id="cid", client_secret="csec")
    with pytest.raises(RuntimeError):
        _ = p.base_url
    with p:
        env = p.env("GOOGLE")
        assert env == {
            "GOOGLE_AUTHORIZE_URL": f"{p.base_url}/authorize",
            "GOOGLE_TOKEN_URL": f"{p.base_url}/token",
            "GOOGLE_USERINFO_URL": f"{p.base_url}/userinfo",
            "GOOGLE_REVOKE_URL": f"{p.base_url}/revoke",
            "GOOGLE_CLIENT_ID": "cid",
            "GOOGLE_CLIENT_SECRET": "csec",
        }
        session = requests.Session()
        assert session.post(p.url("introspect"), data={"token": "x"}, timeout=5).ok
    with pytest.raises(requests.ConnectionError):  # pooled keep-alive connection was closed
        session.post(env["GOOGLE_TOKEN_URL"], data={}, timeout=5)
    session.close()
