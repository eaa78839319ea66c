"""The OAuth flow end to end, over real HTTP against the local provider."""

from __future__ import annotations

import logging
import threading
from urllib.parse import parse_qs, urlsplit

import pytest
import sqlalchemy as sa

from tests.conftest import make_app
from tests.support.flows import authorize, connect, start_login
from tests.support.oauth_provider import ScriptedResponse
from webapp.extensions import db
from webapp.models import MailAccount, UserEmailToken


def _count(model) -> int:
    return db.session.scalar(sa.select(sa.func.count()).select_from(model))


def test_google_login_callback_list(app, client, auth_headers, oauth_provider):
    headers = auth_headers(7, 3)
    login = start_login(client, headers, "google")
    url = urlsplit(login["authorization_url"])
    query = parse_qs(url.query)
    assert query["code_challenge_method"] == ["S256"]
    assert query["access_type"] == ["offline"] and query["prompt"] == ["consent"]
    assert "https://mail.google.com/" in query["scope"][0].split()
    assert len(login["state"]) >= 22 and login["expires_at"].endswith("Z")

    params = authorize(login["authorization_url"])
    oauth_provider.next_user_email = "Alice@Example.COM"
    response = client.get("/api/v1/oauth/callback/google", query_string=params, headers=headers)
    assert response.status_code == 201, response.json
    token = response.json
    assert token["email_address"] == "user@example.com" or token["email_address"].islower()
    assert token["status"] == "active" and token["provider"] == "google"
    assert "https://mail.google.com/" in token["scopes"]
    assert token["account_id"] is not None
    for secret_key in ("access_token", "refresh_token", "access_token_encrypted"):
        assert secret_key not in token

    listing = client.get("/api/v1/oauth/tokens", headers=headers)
    assert listing.status_code == 200
    assert [t["id"] for t in listing.json["items"]] == [token["id"]]
    assert listing.json["next_cursor"] is None

    row = db.session.get(UserEmailToken, token["id"])
    assert row.access_token_encrypted.startswith("v1:")
    assert len(row.access_token_encrypted.split(":")[1]) == 8
    issued = oauth_provider.requests[-1]
    assert issued[1]["grant_type"] == "authorization_code"
    account = db.session.get(MailAccount, token["account_id"])
    assert account.incoming_auth_method == "xoauth2"
    assert account.incoming_server == app.config["PROVIDERS"]["google"].imap_host


def test_login_redirects_browsers_and_answers_json_to_fetch(client, auth_headers):
    headers = auth_headers()
    browser = client.get(
        "/api/v1/oauth/login/google", headers={**headers, "Accept": "text/html,*/*;q=0.8"}
    )
    assert browser.status_code == 302
    assert "/authorize?" in browser.headers["Location"]
    fetch = client.get(
        "/api/v1/oauth/login/google", headers={**headers, "Accept": "application/json"}
    )
    assert fetch.status_code == 200 and "authorization_url" in fetch.json
    wildcard = client.get("/api/v1/oauth/login/google", headers={**headers, "Accept": "*/*"})
    assert wildcard.status_code == 302


def test_login_hint_is_passed_through(client, auth_headers):
    response = client.get(
        "/api/v1/oauth/login/google?response=json&login_hint=bob@example.com",
        headers=auth_headers(),
    )
    assert parse_qs(urlsplit(response.json["authorization_url"]).query)["login_hint"] == [
        "bob@example.com"
    ]


def test_microsoft_address_comes_from_id_token(client, auth_headers, oauth_provider):
    response = connect(client, auth_headers(), "microsoft", oauth_provider, "Carol@Contoso.com")
    assert response.status_code == 201, response.json
    assert response.json["email_address"] == "carol@contoso.com"
    assert "https://outlook.office.com/IMAP.AccessAsUser.All" in response.json["scopes"]


def test_yahoo_connects_through_userinfo(client, auth_headers, oauth_provider):
    response = connect(client, auth_headers(), "yahoo", oauth_provider, "dave@yahoo.com")
    assert response.status_code == 201, response.json
    assert response.json["email_address"] == "dave@yahoo.com"


def test_reconnect_revives_the_same_row(client, auth_headers, oauth_provider):
    headers = auth_headers()
    first = connect(client, headers, "google", oauth_provider, "erin@example.com")
    db.session.execute(sa.update(UserEmailToken).values(status="needs_reauth"))
    db.session.commit()
    second = connect(client, headers, "google", oauth_provider, "erin@example.com")
    assert second.status_code == 200
    assert second.json["id"] == first.json["id"]
    assert second.json["status"] == "active"
    assert _count(UserEmailToken) == 1 and _count(MailAccount) == 1


def test_connecting_syncs_at_once_unless_the_account_has_sync_turned_off(
    client, auth_headers, oauth_provider, monkeypatch
):
    from webapp.services import oauth as oauth_service

    queued: list[tuple] = []
    monkeypatch.setattr(oauth_service, "enqueue", lambda *args: queued.append(args))
    headers = auth_headers()
    first = connect(client, headers, "google", oauth_provider, "fay@example.com")
    assert queued == [("tasks.sync.sync_account", first.json["account_id"])]
    db.session.execute(sa.update(MailAccount).values(sync_enabled=False))
    db.session.commit()
    again = connect(client, headers, "google", oauth_provider, "fay@example.com")
    assert again.status_code == 200 and len(queued) == 1


def test_replayed_state_is_rejected(client, auth_headers):
    headers = auth_headers()
    params = authorize(start_login(client, headers)["authorization_url"])
    assert (
        client.get(
            "/api/v1/oauth/callback/google", query_string=params, headers=headers
        ).status_code
        == 201
    )
    replay = client.get("/api/v1/oauth/callback/google", query_string=params, headers=headers)
    assert replay.status_code == 400
    assert replay.json["error"]["code"] == "invalid_state"


def test_forged_state_is_rejected_and_nothing_stored(client, auth_headers):
    headers = auth_headers()
    params = authorize(start_login(client, headers)["authorization_url"])
    params["state"] = "forged-" + params["state"][7:]
    response = client.get("/api/v1/oauth/callback/google", query_string=params, headers=headers)
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_state"
    assert _count(UserEmailToken) == 0


def test_state_of_another_user_is_rejected(client, auth_headers):
    params = authorize(start_login(client, auth_headers(1, 1))["authorization_url"])
    response = client.get(
        "/api/v1/oauth/callback/google", query_string=params, headers=auth_headers(2, 1)
    )
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_state"
    # consumed: the rightful owner cannot use it afterwards either
    again = client.get(
        "/api/v1/oauth/callback/google", query_string=params, headers=auth_headers(1, 1)
    )
    assert again.json["error"]["code"] == "invalid_state"
    assert _count(UserEmailToken) == 0


def test_state_of_another_provider_is_rejected(client, auth_headers):
    headers = auth_headers()
    params = authorize(start_login(client, headers, "google")["authorization_url"])
    response = client.get("/api/v1/oauth/callback/microsoft", query_string=params, headers=headers)
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_state"


def test_concurrent_callbacks_with_one_state_store_once(app, auth_headers):
    headers = auth_headers()
    params = authorize(start_login(app.test_client(), headers)["authorization_url"])
    results: list[int] = []
    barrier = threading.Barrier(2)

    def call() -> None:
        with app.app_context():
            barrier.wait()
            response = app.test_client().get(
                "/api/v1/oauth/callback/google", query_string=params, headers=headers
            )
            results.append(response.status_code)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [201, 400]
    assert _count(UserEmailToken) == 1


def test_callback_without_jwt_is_401_and_leaves_state_usable(client, auth_headers):
    headers = auth_headers()
    params = authorize(start_login(client, headers)["authorization_url"])
    anonymous = client.get("/api/v1/oauth/callback/google", query_string=params)
    assert anonymous.status_code == 401
    assert (
        client.get(
            "/api/v1/oauth/callback/google", query_string=params, headers=headers
        ).status_code
        == 201
    )


def test_consent_declined(client, auth_headers, oauth_provider):
    headers = auth_headers()
    oauth_provider.deny_next = True
    params = authorize(start_login(client, headers)["authorization_url"])
    assert params["error"] == "access_denied"
    params["error_description"] = "AADSTS65004: User declined to consent. Trace ID: " + "x" * 3000
    response = client.get("/api/v1/oauth/callback/google", query_string=params, headers=headers)
    assert response.status_code == 400 and response.json["error"]["code"] == "consent_denied"
    assert _count(UserEmailToken) == 0


def test_an_oversized_state_is_just_unknown(client, auth_headers):
    params = {"code": "c", "state": "s" * 600}
    response = client.get(
        "/api/v1/oauth/callback/google", query_string=params, headers=auth_headers()
    )
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_state"


def _warning(caplog, event: str) -> logging.LogRecord:
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == event]
    assert record.levelno == logging.WARNING
    return record


def test_missing_mail_scope_stores_nothing(client, auth_headers, oauth_provider, caplog):
    oauth_provider.granted_scopes = "openid email profile"
    response = connect(client, auth_headers(), "google", oauth_provider, "frank@example.com")
    assert response.status_code == 400
    assert response.json["error"]["code"] == "insufficient_scope"
    assert _count(UserEmailToken) == 0 and _count(MailAccount) == 0
    # the operator sees why in the log, not only a 400 in the access log
    assert _warning(caplog, "oauth_mail_scope_missing").granted == "openid email profile"


def test_no_address_from_the_provider_is_502_and_logged(
    client, auth_headers, oauth_provider, caplog, monkeypatch
):
    """What oauth2-mock-server does as shipped: userinfo is `{"sub": ...}`, the
    id_token carries no email."""
    monkeypatch.setattr(oauth_provider, "issue_id_token", False)
    oauth_provider.script("userinfo", ScriptedResponse(status=200, json={"sub": "johndoe"}))
    response = connect(client, auth_headers(), "google", oauth_provider, "nobody@example.com")
    assert response.status_code == 502, response.json
    assert response.json["error"]["reason"] == "no_address"
    assert _count(UserEmailToken) == 0
    assert _warning(caplog, "oauth_no_address").provider == "google"


def test_no_scope_in_answer_means_all_requested_granted(client, auth_headers, oauth_provider):
    oauth_provider.omit_scope_in_response = True
    response = connect(client, auth_headers(), "google", oauth_provider, "gina@example.com")
    assert response.status_code == 201
    assert "https://mail.google.com/" in response.json["scopes"]


def test_provider_down_at_code_exchange_is_502(client, auth_headers, oauth_provider):
    headers = auth_headers()
    params = authorize(start_login(client, headers)["authorization_url"])
    oauth_provider.script("token", ScriptedResponse(status=503, body="<html>down</html>"))
    response = client.get("/api/v1/oauth/callback/google", query_string=params, headers=headers)
    assert response.status_code == 502 and response.json["error"]["code"] == "provider_error"
    assert _count(UserEmailToken) == 0


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"error": "invalid_client"}, 401),
        ({"error": "unauthorized_client"}, 400),
        ({"message": "Unauthorized"}, 401),  # RFC 6749 5.2 lets invalid_client be a bare 401
        ({"message": "no such endpoint"}, 404),  # a wrong token URL
        ({"error": "invalid_request", "error_description": "AADSTS900144: The request body "
          "must contain the following parameter: 'client_id'."}, 400),
    ],
)  # fmt: skip
def test_bad_client_credentials_at_code_exchange_is_502_config(
    client, auth_headers, oauth_provider, body, status
):
    headers = auth_headers()
    params = authorize(start_login(client, headers)["authorization_url"])
    oauth_provider.script("token", ScriptedResponse(status=status, json=body))
    response = client.get("/api/v1/oauth/callback/google", query_string=params, headers=headers)
    assert response.status_code == 502
    assert response.json["error"]["code"] == "provider_config_error"


@pytest.mark.parametrize("error", ["invalid_request", "invalid_code", None])
def test_code_refused_in_other_words_is_400_provider_error(
    client, auth_headers, oauth_provider, error
):
    """oauth2-mock-server answers invalid_request to a used code or a wrong verifier:
    the user connects again, so it is not reported as the operator's configuration."""
    headers = auth_headers()
    params = authorize(start_login(client, headers)["authorization_url"])
    body = {"error": error} if error else {"message": "bad code"}
    oauth_provider.script("token", ScriptedResponse(status=400, json=body))
    response = client.get("/api/v1/oauth/callback/google", query_string=params, headers=headers)
    assert response.status_code == 400, response.json
    assert response.json["error"]["code"] == "provider_error"
    assert _count(UserEmailToken) == 0


def test_invalid_code_is_400_provider_error(client, auth_headers):
    headers = auth_headers()
    params = authorize(start_login(client, headers)["authorization_url"])
    params["code"] = "not-a-real-code"
    response = client.get("/api/v1/oauth/callback/google", query_string=params, headers=headers)
    assert response.status_code == 400 and response.json["error"]["code"] == "provider_error"


def test_unknown_provider_is_404(client, auth_headers):
    response = client.get("/api/v1/oauth/login/myspace", headers=auth_headers())
    assert response.status_code == 404 and response.json["error"]["code"] == "not_found"


def test_unconfigured_provider_is_409_naming_the_variable(base_env, make_token):
    app = make_app(base_env, GOOGLE_CLIENT_ID="")
    response = app.test_client().get(
        "/api/v1/oauth/login/google",
        headers={"Authorization": f"Bearer {make_token()}", "Accept": "application/json"},
    )
    assert response.status_code == 409
    assert response.json["error"]["code"] == "provider_not_configured"
    assert "GOOGLE_CLIENT_ID" in response.json["error"]["message"]


def test_success_redirect_for_browsers_json_for_fetch(base_env, make_token, oauth_provider):
    app = make_app(base_env, OAUTH_SUCCESS_REDIRECT="http://localhost:3000/connected")
    with app.app_context():
        client = app.test_client()
        headers = {"Authorization": f"Bearer {make_token(50, 50)}"}
        params = authorize(start_login(client, headers)["authorization_url"])
        response = client.get(
            "/api/v1/oauth/callback/google",
            query_string=params,
            headers={**headers, "Accept": "text/html"},
        )
        assert response.status_code == 302
        location = response.headers["Location"]
        assert location.startswith("http://localhost:3000/connected?status=connected&token_id=")
        params = authorize(start_login(client, headers)["authorization_url"])
        params["state"] = "bogus"
        failed = client.get(
            "/api/v1/oauth/callback/google",
            query_string=params,
            headers={**headers, "Accept": "text/html"},
        )
        assert failed.headers["Location"].endswith("status=error&code=invalid_state")
        db.session.execute(sa.delete(MailAccount))
        db.session.execute(sa.delete(UserEmailToken))
        db.session.commit()
