"""Real-world OAuth servers differ from the local fixture: each test scripts one quirk a
provider pointed at through the `{P}_*` variables may have, over real HTTP."""

from __future__ import annotations

import json
import logging
import secrets
from datetime import timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import quote

import pytest

from tests.conftest import make_app
from tests.integration.conftest import refresh_now as _refresh
from tests.integration.conftest import token_row as _token
from tests.support.flows import authorize, connect, start_login
from tests.support.oauth_provider import OAuthProvider, ScriptedResponse
from webapp.models import utcnow
from webapp.services import tokens as token_service

GOOGLE_SCOPES = "openid email profile https://mail.google.com/"


def _answer(oauth_provider: OAuthProvider, email: str | None = None, **fields: Any) -> dict:
    """A token endpoint answer; `email` adds an id_token for it, a None field is left out."""
    answer: dict[str, Any] = {
        "access_token": secrets.token_urlsafe(16),
        "token_type": "Bearer",
        "expires_in": 3600,
        "refresh_token": secrets.token_urlsafe(16),
        "scope": GOOGLE_SCOPES,
    }
    if email:
        answer["id_token"] = oauth_provider._id_token(email, None)
    answer.update(fields)
    return {key: value for key, value in answer.items() if value is not None}


def _callback(client, headers, provider: str, oauth_provider, *token_replies, **extra: str):
    """Login and consent for real, then the scripted token (and userinfo) answers."""
    params = authorize(start_login(client, headers, provider)["authorization_url"])
    for endpoint, reply in token_replies:
        oauth_provider.script(endpoint, reply)
    return client.get(
        f"/api/v1/oauth/callback/{provider}", query_string={**params, **extra}, headers=headers
    )


@pytest.fixture
def other_app(base_env):
    """make_app with overrides. Afterwards a plain app is made again: the Celery app made
    last becomes the default, and the session's worker must not go on running tasks
    against this test's (by then stopped) provider."""
    yield lambda **overrides: make_app(base_env, **overrides)
    make_app(base_env)


# --- the code exchange --------------------------------------------------------------------


@pytest.mark.parametrize("expires_in", ["1800", 1800.0, "1800.0"])
def test_expires_in_as_string_or_float_is_read(client, auth_headers, oauth_provider, expires_in):
    answer = _answer(oauth_provider, "exp@example.com", expires_in=expires_in)
    reply = ScriptedResponse(status=200, json=answer)
    response = _callback(client, auth_headers(), "google", oauth_provider, ("token", reply))
    assert response.status_code == 201, response.json
    left = _token(response.json["id"]).expires_at - utcnow()
    assert timedelta(minutes=29) < left <= timedelta(minutes=30)


def test_missing_expires_in_and_lowercase_bearer(client, auth_headers, oauth_provider):
    answer = _answer(oauth_provider, "exp2@example.com", expires_in=None, token_type="bearer")
    reply = ScriptedResponse(status=200, json=answer)
    response = _callback(client, auth_headers(), "google", oauth_provider, ("token", reply))
    assert response.status_code == 201, response.json
    assert _token(response.json["id"]).expires_at > utcnow()


@pytest.mark.parametrize(
    "scope",
    [
        "openid,email,profile,https://mail.google.com/",
        "openid, email, https://mail.google.com/",
        ["openid", "email", "https://mail.google.com/"],
    ],
    ids=["comma", "comma-space", "json-list"],
)
def test_scope_separated_by_commas_or_as_a_list(client, auth_headers, oauth_provider, scope):
    reply = ScriptedResponse(
        status=200, json=_answer(oauth_provider, "sc@example.com", scope=scope)
    )
    response = _callback(client, auth_headers(), "google", oauth_provider, ("token", reply))
    assert response.status_code == 201, response.json
    assert "https://mail.google.com/" in response.json["scopes"]
    assert "openid" in response.json["scopes"]


def test_scope_list_without_the_mail_scope_is_insufficient(client, auth_headers, oauth_provider):
    answer = _answer(oauth_provider, "sc2@example.com", scope=["openid", "email"])
    reply = ScriptedResponse(status=200, json=answer)
    response = _callback(client, auth_headers(), "google", oauth_provider, ("token", reply))
    assert response.status_code == 400
    assert response.json["error"]["code"] == "insufficient_scope"


def test_charset_in_content_type(client, auth_headers, oauth_provider):
    answer = _answer(oauth_provider, "cs@example.com")
    reply = ScriptedResponse(
        status=200, json=answer, headers={"Content-Type": "application/json;charset=UTF-8"}
    )
    response = _callback(client, auth_headers(), "google", oauth_provider, ("token", reply))
    assert response.status_code == 201, response.json


def test_no_id_token_address_from_userinfo(client, auth_headers, oauth_provider, monkeypatch):
    monkeypatch.setattr(oauth_provider, "issue_id_token", False)
    response = connect(client, auth_headers(), "google", oauth_provider, "ui@example.com")
    assert response.status_code == 201, response.json
    assert response.json["email_address"] == "ui@example.com"


@pytest.mark.parametrize(
    "userinfo",
    [
        ScriptedResponse(status=404, json={"error": "not_found"}),
        ScriptedResponse(status=200, body="<html>no userinfo here</html>"),
        ScriptedResponse(status=200, json={"sub": "1"}),
    ],
    ids=["404", "html", "no-email"],
)
def test_no_usable_userinfo_address_from_id_token(client, auth_headers, oauth_provider, userinfo):
    token = ScriptedResponse(status=200, json=_answer(oauth_provider, "Idt@Example.com"))
    response = _callback(
        client, auth_headers(), "google", oauth_provider, ("token", token), ("userinfo", userinfo)
    )
    assert response.status_code == 201, response.json
    assert response.json["email_address"] == "idt@example.com"


@pytest.mark.parametrize(
    "info",
    [
        {"mail": "Graph@Contoso.com", "userPrincipalName": "graph@contoso.onmicrosoft.com"},
        {"userPrincipalName": "graph@contoso.com"},
        {"preferred_username": "graph@contoso.com"},
    ],
    ids=["mail", "upn", "preferred_username"],
)
def test_graph_style_userinfo(client, auth_headers, oauth_provider, info):
    token = ScriptedResponse(status=200, json=_answer(oauth_provider))
    userinfo = ScriptedResponse(status=200, json={"id": "abc", **info})
    response = _callback(
        client, auth_headers(), "google", oauth_provider, ("token", token), ("userinfo", userinfo)
    )
    assert response.status_code == 201, response.json
    assert response.json["email_address"].startswith("graph@contoso.")


def test_microsoft_without_id_token_uses_a_configured_userinfo(
    app, other_app, make_token, oauth_provider, monkeypatch
):
    app = other_app(MICROSOFT_USERINFO_URL=oauth_provider.url("userinfo"))
    with app.app_context():
        client = app.test_client()
        headers = {"Authorization": f"Bearer {make_token(71, 71)}"}
        monkeypatch.setattr(oauth_provider, "issue_id_token", False)
        response = connect(client, headers, "microsoft", oauth_provider, "ms@contoso.com")
        assert response.status_code == 201, response.json
        assert response.json["email_address"] == "ms@contoso.com"


def test_extra_callback_params_are_ignored(client, auth_headers, oauth_provider):
    response = _callback(
        client,
        auth_headers(),
        "microsoft",
        oauth_provider,
        session_state="8f0d3c5e-1",
        iss=oauth_provider.base_url,
        scope="openid email https://outlook.office.com/IMAP.AccessAsUser.All",
        authuser="0",
        prompt="consent",
    )
    assert response.status_code == 201, response.json


def test_access_denied_with_description(client, auth_headers, oauth_provider):
    headers = auth_headers()
    login = start_login(client, headers)
    response = client.get(
        "/api/v1/oauth/callback/google",
        query_string={
            "error": "access_denied",
            "error_description": "AADSTS65004: User declined to consent to access the app.",
            "error_subcode": "cancel",
            "state": login["state"],
        },
        headers=headers,
    )
    assert response.status_code == 400 and response.json["error"]["code"] == "consent_denied"


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain"])
def test_form_encoded_invalid_grant_at_code_exchange(
    client, auth_headers, oauth_provider, content_type
):
    reply = ScriptedResponse(
        status=400,
        body="error=invalid_grant&error_description=Code+expired",
        headers={"Content-Type": f"{content_type}; charset=utf-8"},
    )
    response = _callback(client, auth_headers(), "google", oauth_provider, ("token", reply))
    assert response.status_code == 400, response.json
    assert response.json["error"]["code"] == "provider_error"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [("form", "application/x-www-form-urlencoded"), ("json", "application/x-www-form-urlencoded")],
    ids=["form", "json-labelled-as-form"],
)
def test_form_encoded_success_at_code_exchange(
    client, auth_headers, oauth_provider, body, content_type
):
    answer = _answer(oauth_provider, "form@example.com")
    if body == "form":
        text = "&".join(f"{key}={quote(str(value), safe='')}" for key, value in answer.items())
    else:
        text = json.dumps(answer)
    reply = ScriptedResponse(status=200, body=text, headers={"Content-Type": content_type})
    response = _callback(client, auth_headers(), "google", oauth_provider, ("token", reply))
    assert response.status_code == 201, response.json
    assert response.json["email_address"] == "form@example.com"


# --- refresh ------------------------------------------------------------------------------


@pytest.fixture
def token_id(client, auth_headers, oauth_provider) -> int:
    response = connect(client, auth_headers(), "google", oauth_provider, "q@example.com")
    assert response.status_code == 201, response.json
    return response.json["id"]


def test_form_encoded_invalid_grant_at_refresh_is_needs_reauth(
    client, auth_headers, oauth_provider, token_id
):
    oauth_provider.script(
        "token",
        ScriptedResponse(
            status=400,
            body="error=invalid_grant&error_description=Token+revoked",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
    )
    response = _refresh(client, auth_headers(), token_id)
    assert response.status_code == 409, response.json
    assert _token(token_id).status == "needs_reauth"


def test_200_with_error_field_is_classified(client, auth_headers, oauth_provider, token_id):
    oauth_provider.script("token", ScriptedResponse(status=200, json={"error": "invalid_grant"}))
    assert _refresh(client, auth_headers(), token_id).status_code == 409


@pytest.mark.parametrize(
    "reply",
    [
        ScriptedResponse(status=401, json={"error": "invalid_client"}),
        ScriptedResponse(
            status=401,
            json={
                "error": "invalid_client",
                "error_description": "AADSTS7000215: Invalid client secret provided.",
                "error_codes": [7000215],
            },
        ),
        ScriptedResponse(status=400, json={"error": "unauthorized_client"}),
    ],
    ids=["401-invalid_client", "aadsts7000215", "unauthorized_client"],
)
def test_configuration_errors_leave_the_token(
    client, auth_headers, oauth_provider, token_id, reply
):
    oauth_provider.script("token", reply)
    response = _refresh(client, auth_headers(), token_id)
    assert response.status_code == 502
    assert response.json["error"]["code"] == "provider_config_error"
    assert _token(token_id).status == "active"


def test_retry_after_as_http_date(client, auth_headers, oauth_provider, token_id):
    when = format_datetime(utcnow() + timedelta(seconds=120), usegmt=True)
    oauth_provider.script(
        "token", ScriptedResponse(status=503, body="busy", headers={"Retry-After": when})
    )
    response = _refresh(client, auth_headers(), token_id)
    assert response.status_code == 503
    assert 100 <= int(response.headers["Retry-After"]) <= 120


def test_refresh_answer_with_comma_scope_and_string_expiry(
    client, auth_headers, oauth_provider, token_id
):
    answer = _answer(
        oauth_provider,
        scope="openid,https://mail.google.com/",
        expires_in="600",
        token_type="bearer",
    )
    oauth_provider.script("token", ScriptedResponse(status=200, json=answer))
    response = _refresh(client, auth_headers(), token_id)
    assert response.status_code == 200, response.json
    assert response.json["scopes"] == ["openid", "https://mail.google.com/"]
    assert timedelta(minutes=9) < _token(token_id).expires_at - utcnow() <= timedelta(minutes=10)
    assert token_service.read_refresh_token(_token(token_id)) == answer["refresh_token"]


def test_refresh_answer_without_refresh_token_keeps_the_old_one(
    client, auth_headers, oauth_provider, token_id
):
    old = token_service.read_refresh_token(_token(token_id))
    answer = _answer(oauth_provider, refresh_token=None, scope=None)
    oauth_provider.script("token", ScriptedResponse(status=200, json=answer))
    assert _refresh(client, auth_headers(), token_id).status_code == 200
    assert token_service.read_refresh_token(_token(token_id)) == old
    assert token_service.read_access_token(_token(token_id)) == answer["access_token"]


# --- client authentication ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_id", "secret"),
    [
        ("basic-client", "plain-secret-0123456789abcdef"),
        ("basic-client", "s3cr+t/base64=="),
        ("urn:basic:client", "s+cr/t=:%&~ with space"),
    ],
    ids=["plain", "base64-secret", "reserved-characters"],
)
def test_client_secret_basic_end_to_end(app, other_app, make_token, client_id, secret):
    """RFC 6749 2.3.1: id and secret are form-encoded before going into the Basic header."""
    with OAuthProvider(
        client_id=client_id, client_secret=secret, token_auth_method="client_secret_basic"
    ) as server:
        server.rotation = "strict"
        app = other_app(
            **server.env("GOOGLE"),
            GOOGLE_TOKEN_AUTH_METHOD="client_secret_basic",
        )
        with app.app_context():
            client = app.test_client()
            headers = {"Authorization": f"Bearer {make_token(72, 72)}"}
            response = connect(client, headers, "google", server, "basic@example.com")
            assert response.status_code == 201, response.json
            token_id = response.json["id"]
            assert _refresh(client, headers, token_id).status_code == 200
            assert _refresh(client, headers, token_id).status_code == 200
            revoked = client.post(f"/api/v1/oauth/tokens/{token_id}/revoke", headers=headers)
            assert revoked.json["provider_revoked"] is True
            auth = server.revoke_requests[-1][1].get("Authorization", "")
            assert auth.startswith("Basic "), "revocation must authenticate the client"


def test_revocation_authenticates_with_client_secret_post(client, auth_headers, oauth_provider):
    response = connect(client, auth_headers(), "google", oauth_provider, "rv@example.com")
    token_id = response.json["id"]
    revoked = client.post(f"/api/v1/oauth/tokens/{token_id}/revoke", headers=auth_headers())
    assert revoked.json["provider_revoked"] is True
    form = oauth_provider.revoke_requests[-1][0]
    assert form.get("client_secret") == oauth_provider.client_secret
    assert form.get("token_type_hint") == "refresh_token"


def test_quirky_answers_log_no_secret(client, auth_headers, oauth_provider, caplog):
    """Raw log records (before any redaction) of the quirk paths carry no secret."""
    caplog.set_level(logging.DEBUG)
    headers = auth_headers()
    answer = _answer(oauth_provider, scope="openid,https://mail.google.com/")
    form = "&".join(f"{key}={quote(str(value), safe='')}" for key, value in answer.items())
    userinfo = ScriptedResponse(status=200, json={"mail": "logs@example.com"})
    token = ScriptedResponse(status=200, body=form, headers={"Content-Type": "text/plain"})
    params = authorize(start_login(client, headers)["authorization_url"])
    oauth_provider.script("token", token)
    oauth_provider.script("userinfo", userinfo)
    response = client.get("/api/v1/oauth/callback/google", query_string=params, headers=headers)
    assert response.status_code == 201, response.json
    token_id = response.json["id"]
    echoed = f"error=invalid_grant&error_description=refresh+token+{answer['refresh_token']}+dead"
    oauth_provider.script("token", ScriptedResponse(status=400, body=echoed))
    assert _refresh(client, headers, token_id).status_code == 409
    stored = client.get(f"/api/v1/oauth/tokens/{token_id}", headers=headers).json
    assert stored["last_refresh_error"] == "invalid_grant: refresh token [REDACTED] dead"
    secrets_seen = [
        params["code"],
        params["state"],
        answer["access_token"],
        answer["refresh_token"],
        oauth_provider.client_secret,
    ]
    text = "\n".join(f"{record.getMessage()} {vars(record)}" for record in caplog.records)
    assert caplog.records
    for secret in secrets_seen:
        assert secret not in text
