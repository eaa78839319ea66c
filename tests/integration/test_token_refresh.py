"""Refresh, revoke and ownership of tokens, over real HTTP against the local provider."""

from __future__ import annotations

import multiprocessing
from datetime import timedelta

import pytest
import sqlalchemy as sa

from tests.integration.conftest import refresh_now as _refresh
from tests.integration.conftest import token_row as _token
from tests.integration.conftest import wait_runs
from tests.support.flows import MAIL_SCOPE, connect, stored_grant
from tests.support.oauth_provider import ScriptedResponse
from webapp.extensions import db
from webapp.models import MailAccount, TokenRefreshAttempt, UserEmailToken, utcnow
from webapp.services import tokens as token_service


@pytest.fixture
def connected(client, auth_headers, oauth_provider, celery_worker):
    """A connected Google mailbox of user 1 / org 1 whose initial sync (which uses the
    token too) has finished; returns its token id."""
    response = connect(client, auth_headers(), "google", oauth_provider, "owner@example.com")
    assert response.status_code == 201, response.json
    wait_runs(response.json["account_id"], 1)
    return response.json["id"]


def test_refresh_now_returns_the_updated_resource(client, auth_headers, connected, oauth_provider):
    before = _token(connected).access_token_encrypted
    response = _refresh(client, auth_headers(), connected)
    assert response.status_code == 200, response.json
    assert response.json["status"] == "active"
    assert _token(connected).access_token_encrypted != before
    assert oauth_provider.requests[-1][1]["grant_type"] == "refresh_token"
    attempt = db.session.scalars(sa.select(TokenRefreshAttempt)).one()
    assert attempt.outcome == "success" and attempt.duration_ms is not None


def test_strict_rotation_persists_the_new_refresh_token(
    client, auth_headers, connected, oauth_provider
):
    oauth_provider.rotation = "strict"
    old_refresh = token_service.read_refresh_token(_token(connected))
    assert _refresh(client, auth_headers(), connected).status_code == 200
    new_refresh = token_service.read_refresh_token(_token(connected))
    assert new_refresh != old_refresh
    assert not oauth_provider.refresh_token_alive(old_refresh)
    # and the stored one keeps working
    assert _refresh(client, auth_headers(), connected).status_code == 200


def test_no_rotation_keeps_the_old_refresh_token(client, auth_headers, connected, oauth_provider):
    oauth_provider.rotation = "none"
    old_refresh = token_service.read_refresh_token(_token(connected))
    assert _refresh(client, auth_headers(), connected).status_code == 200
    assert token_service.read_refresh_token(_token(connected)) == old_refresh


def test_refresh_returns_the_stored_row_and_records_the_attempt(
    client, auth_headers, oauth_provider
):
    oauth_provider.rotation = "strict"
    headers = auth_headers()
    token_id = connect(client, headers, "google", oauth_provider, "row@example.com").json["id"]
    before = _token(token_id)
    old_refresh, old_updated_at = token_service.read_refresh_token(before), before.updated_at
    result = token_service.refresh_token(token_id, trigger="test")
    assert result.refreshed
    token = result.token  # read as returned, before any expire of our own
    assert oauth_provider.access_token_active(token_service.read_access_token(token))
    new_refresh = token_service.read_refresh_token(token)
    assert new_refresh != old_refresh and oauth_provider.refresh_token_alive(new_refresh)
    assert token.updated_at > old_updated_at
    assert token.refresh_failure_count == 0 and token.last_refresh_error is None
    assert token.expires_at - utcnow() > timedelta(minutes=50)
    attempt = db.session.scalars(sa.select(TokenRefreshAttempt)).one()
    assert (attempt.token_id, attempt.organization_id, attempt.provider) == (token_id, 1, "google")
    assert (attempt.trigger, attempt.outcome, attempt.http_status) == ("test", "success", 200)
    assert attempt.error_code is None and attempt.duration_ms is not None
    assert attempt.started_at <= attempt.finished_at == token.last_refreshed_at


def test_invalid_grant_marks_needs_reauth_and_pauses_account(
    client, auth_headers, connected, oauth_provider
):
    oauth_provider.fail_token_with(
        "invalid_grant", description="Token has been expired or revoked."
    )
    response = _refresh(client, auth_headers(), connected)
    assert response.status_code == 409
    assert response.json["error"]["code"] == "needs_reauth"
    token = _token(connected)
    assert token.status == "needs_reauth" and token.status_reason == "invalid_grant"
    account = db.session.scalars(sa.select(MailAccount)).one()
    assert account.status == "paused"
    attempt = db.session.scalars(sa.select(TokenRefreshAttempt)).one()
    assert attempt.outcome == "permanent_error" and attempt.http_status == 400
    # no further provider call: the grant is dead until the user reconnects
    calls = oauth_provider.calls["token"]
    assert _refresh(client, auth_headers(), connected).json["error"]["code"] == "needs_reauth"
    assert oauth_provider.calls["token"] == calls


def test_a_refresh_answer_without_the_mail_scope_needs_reauth_and_keeps_its_tokens(
    client, auth_headers, connected, oauth_provider
):
    """oauth2-mock-server answers `scope: "dummy"` to a refresh that sends none: such a
    grant cannot reach the mailbox, and the callback would have refused it."""
    answer = {"access_token": "new-access", "refresh_token": "new-refresh", "scope": "dummy"}
    oauth_provider.script("token", ScriptedResponse(status=200, json=answer))
    response = _refresh(client, auth_headers(), connected)
    assert response.status_code == 409, response.json
    assert response.json["error"]["code"] == "needs_reauth"
    assert response.json["error"]["reason"] == "mail_scope_missing"
    token = _token(connected)
    assert (token.status, token.status_reason, token.scopes) == (
        "needs_reauth",
        "mail_scope_missing",
        "dummy",
    )
    # the answer may have rotated the refresh token: the new one is kept
    assert token_service.read_refresh_token(token) == "new-refresh"
    assert token_service.read_access_token(token) == "new-access"
    assert db.session.scalars(sa.select(MailAccount)).one().status == "paused"
    attempt = db.session.scalars(sa.select(TokenRefreshAttempt)).one()
    assert (attempt.outcome, attempt.error_code) == ("permanent_error", "mail_scope_missing")


def test_a_refresh_answer_without_scope_keeps_the_stored_scopes(
    client, auth_headers, connected, oauth_provider
):
    oauth_provider.omit_scope_in_response = True
    response = _refresh(client, auth_headers(), connected)
    assert response.status_code == 200, response.json
    assert "https://mail.google.com/" in response.json["scopes"]


def test_microsoft_aadsts_permanent_code_is_needs_reauth(client, auth_headers, oauth_provider):
    response = connect(client, auth_headers(), "microsoft", oauth_provider, "ms@contoso.com")
    oauth_provider.fail_token_with(
        "invalid_grant",
        description="AADSTS700082: The refresh token has expired due to inactivity.",
    )
    refreshed = _refresh(client, auth_headers(), response.json["id"])
    assert refreshed.json["error"]["code"] == "needs_reauth"


def test_microsoft_refresh_asks_for_its_scopes_and_google_for_none(
    app, client, auth_headers, oauth_provider
):
    """Microsoft issues an access token for the resource the refresh asks for: without
    `scope` it need not be Outlook's, and IMAP would refuse it."""
    for name, address in (("microsoft", "scoped@contoso.com"), ("google", "plain@gmail.com")):
        token_id = connect(client, auth_headers(), name, oauth_provider, address).json["id"]
        assert _refresh(client, auth_headers(), token_id).status_code == 200
        _endpoint, form, _headers = oauth_provider.requests[-1]
        assert form["grant_type"] == "refresh_token"
        if name == "microsoft":
            assert form["scope"].split() == list(app.config["PROVIDERS"][name].scopes)
        else:
            assert "scope" not in form


def test_a_refresh_asking_for_more_than_was_granted_is_refused(oauth_provider):
    """The local provider checks a refresh's `scope` against the grant (RFC 6749 6)."""
    import requests

    issued = oauth_provider.issue_tokens_for("subset@example.com", scope="openid email")
    form = {
        "grant_type": "refresh_token",
        "refresh_token": issued["refresh_token"],
        "client_id": oauth_provider.client_id,
        "client_secret": oauth_provider.client_secret,
    }
    wider = requests.post(
        oauth_provider.url("token"), data={**form, "scope": "openid mail"}, timeout=10
    )
    assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope"
    narrower = requests.post(
        oauth_provider.url("token"), data={**form, "scope": "email"}, timeout=10
    )
    assert narrower.status_code == 200


def test_invalid_client_is_config_error_and_token_untouched(
    client, auth_headers, connected, oauth_provider
):
    before = _token(connected).access_token_encrypted
    oauth_provider.fail_token_with("invalid_client", status=401)
    response = _refresh(client, auth_headers(), connected)
    assert response.status_code == 502
    assert response.json["error"]["code"] == "provider_config_error"
    token = _token(connected)
    assert token.status == "active" and token.access_token_encrypted == before
    assert token.refresh_failure_count == 1 and "invalid_client" in token.last_refresh_error


@pytest.mark.parametrize(
    "scripted",
    [
        ScriptedResponse(status=503, body="<html>unavailable</html>"),
        ScriptedResponse(
            status=429, json={"error": "temporarily_unavailable"}, headers={"Retry-After": "7"}
        ),
        ScriptedResponse(status=200, body="not json at all"),
        ScriptedResponse(status=400, json={"error": "server_error"}),
    ],
    ids=["5xx", "429", "non-json", "server_error"],
)
def test_transient_failures_are_503_with_retry_after(
    client, auth_headers, connected, oauth_provider, scripted
):
    oauth_provider.script("token", scripted)
    response = _refresh(client, auth_headers(), connected)
    assert response.status_code == 503
    assert response.json["error"]["code"] == "provider_unavailable"
    assert int(response.headers["Retry-After"]) >= 1
    if scripted.status == 429:
        assert response.headers["Retry-After"] == "7"
    assert _token(connected).status == "active"
    attempt = db.session.scalars(sa.select(TokenRefreshAttempt)).one()
    assert attempt.outcome == "transient_error"


def test_slow_provider_times_out_as_transient(base_env, make_token, oauth_provider):
    from tests.conftest import make_app

    app = make_app(base_env, PROVIDER_TIMEOUT_SECONDS="1")
    with app.app_context():
        client = app.test_client()
        headers = {"Authorization": f"Bearer {make_token(60, 60)}"}
        token_id = connect(client, headers, "google", oauth_provider, "slow@example.com").json["id"]
        oauth_provider.script("token", ScriptedResponse(status=200, json={}, delay=3))
        response = _refresh(client, headers, token_id)
        assert response.status_code == 503
        assert response.json["error"]["reason"] == "timeout"


def test_undecryptable_token_is_409_needs_reauth_never_500(
    client, auth_headers, connected, oauth_provider
):
    other = connect(client, auth_headers(), "google", oauth_provider, "other@example.com").json[
        "id"
    ]
    # swap the refresh ciphertexts of two rows in SQL: AAD binds each to its row
    a, b = _token(connected), _token(other)
    a_refresh, b_refresh = a.refresh_token_encrypted, b.refresh_token_encrypted
    db.session.execute(
        sa.update(UserEmailToken)
        .where(UserEmailToken.id == connected)
        .values(refresh_token_encrypted=b_refresh)
    )
    db.session.execute(
        sa.update(UserEmailToken)
        .where(UserEmailToken.id == other)
        .values(refresh_token_encrypted=a_refresh)
    )
    db.session.commit()
    response = _refresh(client, auth_headers(), connected)
    assert response.status_code == 409
    assert response.json["error"] == {
        "code": "needs_reauth",
        "message": response.json["error"]["message"],
        "reason": "decryption_failed",
    }
    listed = client.get(f"/api/v1/oauth/tokens/{connected}", headers=auth_headers()).json
    assert listed["status"] == "needs_reauth" and listed["status_reason"] == "decryption_failed"


def test_tampered_access_token_is_reported_not_500(client, auth_headers, connected):
    token = _token(connected)
    text = token.access_token_encrypted
    tampered = text[:-1] + ("A" if text[-1] != "A" else "B")
    db.session.execute(
        sa.update(UserEmailToken)
        .where(UserEmailToken.id == connected)
        .values(access_token_encrypted=tampered)
    )
    db.session.commit()
    from webapp.errors import NeedsReauth

    with pytest.raises(NeedsReauth) as caught:
        token_service.get_valid_access_token(connected)
    assert caught.value.reason == "decryption_failed"


def test_get_valid_access_token_refreshes_when_close_to_expiry(app, connected, oauth_provider):
    db.session.execute(sa.update(UserEmailToken).values(expires_at=utcnow() + timedelta(minutes=2)))
    db.session.commit()
    calls = oauth_provider.calls["token"]
    secret = token_service.get_valid_access_token(connected)
    assert oauth_provider.calls["token"] == calls + 1
    assert oauth_provider.access_token_active(secret)
    token = _token(connected)
    assert token.last_used_at is not None
    assert token.expires_at - utcnow() > timedelta(minutes=50)
    # still fresh: no second call
    token_service.get_valid_access_token(connected)
    assert oauth_provider.calls["token"] == calls + 1


def test_revoke_with_a_revocation_endpoint(client, auth_headers, connected, oauth_provider):
    refresh_secret = token_service.read_refresh_token(_token(connected))
    response = client.post(f"/api/v1/oauth/tokens/{connected}/revoke", headers=auth_headers())
    assert response.status_code == 200
    assert response.json["provider_revoked"] is True
    assert response.json["status"] == "revoked"
    assert refresh_secret in oauth_provider.revoked
    token = _token(connected)
    assert token.access_token_encrypted is None and token.refresh_token_encrypted is None
    assert db.session.scalars(sa.select(MailAccount)).one().status == "paused"
    again = client.post(f"/api/v1/oauth/tokens/{connected}/revoke", headers=auth_headers())
    assert again.status_code == 200 and again.json["status"] == "revoked"
    refresh = _refresh(client, auth_headers(), connected)
    assert refresh.status_code == 409 and refresh.json["error"]["code"] == "token_revoked"


def test_revoke_without_a_revocation_endpoint(client, auth_headers, oauth_provider):
    token_id = connect(client, auth_headers(), "microsoft", oauth_provider, "m@contoso.com").json[
        "id"
    ]
    response = client.post(f"/api/v1/oauth/tokens/{token_id}/revoke", headers=auth_headers())
    assert response.status_code == 200
    assert response.json["provider_revoked"] is False
    assert "no token revocation endpoint" in response.json["message"]
    assert oauth_provider.revoked == []


def test_user_b_cannot_see_refresh_or_revoke_user_as_token(client, auth_headers, connected):
    stranger = auth_headers(2, 1)
    other_org = auth_headers(1, 2)
    for headers in (stranger, other_org):
        assert client.get(f"/api/v1/oauth/tokens/{connected}", headers=headers).status_code == 404
        assert _refresh(client, headers, connected).status_code == 404
        revoke = client.post(f"/api/v1/oauth/tokens/{connected}/revoke", headers=headers)
        assert revoke.status_code == 404
        assert client.get("/api/v1/oauth/tokens", headers=headers).json["items"] == []
    assert (
        client.get("/api/v1/oauth/tokens/999999", headers=stranger).json["error"]["code"]
        == "not_found"
    )
    assert _token(connected).status == "active"


def test_token_list_filters_and_pagination(client, auth_headers, oauth_provider):
    headers = auth_headers()
    ids = [
        connect(client, headers, "google", oauth_provider, f"p{i}@example.com").json["id"]
        for i in range(3)
    ]
    db.session.execute(
        sa.update(UserEmailToken)
        .where(UserEmailToken.id == ids[0])
        .values(expires_at=utcnow() - timedelta(hours=1))
    )
    db.session.commit()
    expired = client.get("/api/v1/oauth/tokens?status=expired", headers=headers).json["items"]
    assert [t["id"] for t in expired] == [ids[0]] and expired[0]["status"] == "expired"
    page = client.get("/api/v1/oauth/tokens?limit=2", headers=headers).json
    assert len(page["items"]) == 2 and page["next_cursor"]
    rest = client.get(
        f"/api/v1/oauth/tokens?limit=2&cursor={page['next_cursor']}", headers=headers
    ).json
    assert [t["id"] for t in rest["items"]] == [ids[2]] and rest["next_cursor"] is None
    bad = client.get("/api/v1/oauth/tokens?status=bogus&limit=abc", headers=headers)
    assert bad.status_code == 422 and set(bad.json["error"]["fields"]) == {"status", "limit"}
    assert client.get("/api/v1/oauth/tokens?cursor=%%%", headers=headers).status_code == 422
    assert client.get("/api/v1/oauth/tokens?limit=100000", headers=headers).status_code == 200


def _refresh_in_process(env: dict, token_id: int, threads: int, barrier) -> list[bool]:
    """Runs in a separate process: `threads` concurrent refreshes of one token, all
    released by one barrier with the other processes' threads."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import make_app

    app = make_app(env)

    def one() -> bool:
        with app.app_context():
            barrier.wait(timeout=120)
            return token_service.refresh_token(token_id, trigger="test").refreshed

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda _: one(), range(threads)))


def test_twenty_concurrent_refreshes_from_four_processes_make_one_provider_call(
    base_env, connected, oauth_provider
):
    oauth_provider.rotation = "strict"
    calls = oauth_provider.calls["token"]
    context = multiprocessing.get_context("spawn")
    # A provider that takes 1.5 s (real ones take 100 ms and more): every caller is
    # surely waiting on the lock while the first refresh is in flight.
    oauth_provider.script("token", ScriptedResponse(delay=1.5))
    with context.Manager() as manager, context.Pool(4) as pool:
        barrier = manager.Barrier(20)
        results = pool.starmap(_refresh_in_process, [(base_env, connected, 5, barrier)] * 4)
    flat = [refreshed for chunk in results for refreshed in chunk]
    assert len(flat) == 20
    assert oauth_provider.calls["token"] == calls + 1
    assert flat.count(True) == 1
    assert _token(connected).status == "active"


def test_invalid_grant_for_a_refresh_token_replaced_meanwhile_keeps_the_grant(
    app, connected, oauth_provider
):
    """The provider was slow, this refresh's lock ran out and another process rotated
    the refresh token: the provider refuses the old one, but the grant lives on."""
    import threading
    import time

    oauth_provider.script(
        "token", ScriptedResponse(status=400, json={"error": "invalid_grant"}, delay=1.0)
    )

    def rotate_meanwhile() -> None:
        time.sleep(0.3)
        with app.app_context():
            token = db.session.get(UserEmailToken, connected)
            token_service.store_secrets(token, "newer-access", "newer-refresh")
            db.session.commit()

    other = threading.Thread(target=rotate_meanwhile)
    other.start()
    result = token_service.refresh_token(connected, trigger="test")
    other.join()
    assert result.refreshed is False
    token = _token(connected)
    assert token.status == "active" and token.refresh_failure_count == 0
    assert token_service.read_refresh_token(token) == "newer-refresh"
    assert db.session.scalars(sa.select(MailAccount)).one().status == "active"
    attempt = db.session.scalars(sa.select(TokenRefreshAttempt)).one()
    assert attempt.outcome == "permanent_error"


def test_failure_counters_count_failures_and_reset_on_success(
    client, auth_headers, connected, oauth_provider
):
    oauth_provider.script("token", ScriptedResponse(status=503, body="down"))
    assert _refresh(client, auth_headers(), connected).status_code == 503
    oauth_provider.script("token", ScriptedResponse(status=503, body="down"))
    assert _refresh(client, auth_headers(), connected).status_code == 503
    token = _token(connected)
    assert token.refresh_failure_count == 2 and token.last_refresh_error
    assert _refresh(client, auth_headers(), connected).status_code == 200
    token = _token(connected)
    assert token.refresh_failure_count == 0 and token.last_refresh_error is None


@pytest.mark.parametrize("rotation", ["none", "strict"])
def test_a_refresh_on_sqlite_stores_the_new_tokens_and_the_attempt_together(
    sqlite_app, oauth_provider, rotation
):
    """SQLite (`make run`'s default) takes the two-statement write, not PostgreSQL's
    single statement: the same row and attempt must come out."""
    oauth_provider.reset()
    oauth_provider.rotation = rotation
    try:
        token, issued = stored_grant(
            oauth_provider, "lite@example.com", utcnow() + timedelta(minutes=1),
            refresh_failure_count=2, last_refresh_error="server_error",
        )  # fmt: skip
        db.session.commit()
        token_id, stamped = token.id, token.updated_at

        for _ in range(2):  # the second refresh sends whatever the first one stored
            assert token_service.refresh_token(token_id, trigger="test").refreshed
        token = db.session.get(UserEmailToken, token_id, populate_existing=True)
        stored = token_service.read_refresh_token(token)
        assert (stored == issued["refresh_token"]) is (rotation == "none")
        assert oauth_provider.refresh_token_alive(stored)
        assert token_service.read_access_token(token) != issued["access_token"]
        assert token.expires_at > utcnow() + timedelta(minutes=50)
        assert token.scopes == MAIL_SCOPE and token.status == "active"
        assert token.refresh_failure_count == 0 and token.last_refresh_error is None
        assert token.last_refreshed_at is not None and token.updated_at > stamped
        attempts = db.session.scalars(sa.select(TokenRefreshAttempt)).all()
        assert [(a.token_id, a.outcome, a.http_status) for a in attempts] == [
            (token_id, "success", 200)
        ] * 2
    finally:
        oauth_provider.reset()


@pytest.fixture
def one_connection_app(base_env, migrated_app, oauth_provider, monkeypatch):
    """The session's database through a pool of one connection that waits 3 s at most."""
    from tests.conftest import make_app
    from webapp import config

    options = config.engine_options
    monkeypatch.setattr(
        config,
        "engine_options",
        lambda url: {**options(url), "pool_size": 1, "max_overflow": 0, "pool_timeout": 3},
    )
    app = make_app(base_env)
    try:
        with app.app_context():
            yield app
            db.session.remove()
            db.engine.dispose()
    finally:
        migrated_app.extensions["celery"].set_default()
        migrated_app.extensions["celery"].set_current()


def test_a_refresh_by_the_api_or_before_use_needs_one_pooled_connection(
    app, one_connection_app, oauth_provider, auth_headers
):
    """The caller's session read the row first; the refresh must not wait for a second
    connection while the first one sits in the caller's open transaction."""
    token, issued = stored_grant(
        oauth_provider, "pool@example.com", utcnow() + timedelta(minutes=1)
    )
    db.session.commit()
    token_id = token.id

    secret = token_service.get_valid_access_token(token_id, force_refresh=True)
    assert secret != issued["access_token"]
    client = one_connection_app.test_client()
    response = _refresh(client, auth_headers(), token_id)
    assert response.status_code == 200, response.json
    outcomes = db.session.scalars(sa.select(TokenRefreshAttempt.outcome)).all()
    assert outcomes == ["success", "success"]
