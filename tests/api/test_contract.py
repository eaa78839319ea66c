"""DESIGN.md's API contract where a conformance review found the API answering otherwise."""

from __future__ import annotations

from tests.conftest import PASSWORD, PASSWORD_USER
from tests.support.flows import connect
from webapp.errors import MailkeyError
from webapp.extensions import db
from webapp.models import MailFolder, SyncRun

DESIGN_CODES = {
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "validation_error",
    "payload_too_large",
    "invalid_state",
    "consent_denied",
    "provider_error",
    "insufficient_scope",
    "needs_reauth",
    "token_revoked",
    "provider_not_configured",
    "provider_config_error",
    "provider_unavailable",
    "mail_server_rejected",
    "host_not_allowed",
    "not_ready",
    "internal_error",
}


def _subclasses(cls: type) -> set[type]:
    found = set(cls.__subclasses__())
    return found.union(*(_subclasses(sub) for sub in found))


def test_every_domain_error_code_is_one_of_designs():
    codes = {cls.code for cls in _subclasses(MailkeyError) | {MailkeyError}}
    assert codes <= DESIGN_CODES, codes - DESIGN_CODES


def _connected(client, headers, oauth_provider, address="contract@example.com"):
    response = connect(client, headers, "google", oauth_provider, address)
    assert response.status_code == 201, response.json
    return response.json


def _assert_validation_error(response, field):
    assert response.status_code == 422, response.json
    error = response.json["error"]
    assert error["code"] == "validation_error"
    assert set(error["fields"]) == {field}


def test_folders_are_a_collection_with_limit_and_cursor(client, auth_headers, oauth_provider):
    account_id = _connected(client, auth_headers(), oauth_provider)["account_id"]
    for name in ("INBOX", "Sent", "Trash"):
        db.session.add(MailFolder(account_id=account_id, name=name, flags=[]))
    db.session.commit()
    url = f"/api/v1/accounts/{account_id}/folders"

    first = client.get(f"{url}?limit=2", headers=auth_headers())
    assert first.status_code == 200
    assert [f["name"] for f in first.json["items"]] == ["INBOX", "Sent"]
    assert first.json["next_cursor"]
    rest = client.get(f"{url}?limit=2&cursor={first.json['next_cursor']}", headers=auth_headers())
    assert [f["name"] for f in rest.json["items"]] == ["Trash"]
    assert rest.json["next_cursor"] is None
    assert len(client.get(url, headers=auth_headers()).json["items"]) == 3
    _assert_validation_error(client.get(f"{url}?limit=0", headers=auth_headers()), "limit")
    _assert_validation_error(client.get(f"{url}?cursor=nope", headers=auth_headers()), "cursor")


def test_sync_of_a_revoked_mailbox_is_409_token_revoked(client, auth_headers, oauth_provider):
    body = _connected(client, auth_headers(), oauth_provider)
    revoked = client.post(f"/api/v1/oauth/tokens/{body['id']}/revoke", headers=auth_headers())
    assert revoked.status_code == 200
    runs_before = db.session.query(SyncRun).count()

    response = client.post(f"/api/v1/accounts/{body['account_id']}/sync", headers=auth_headers())

    assert response.status_code == 409
    assert response.json["error"]["code"] == "token_revoked"
    assert db.session.query(SyncRun).count() == runs_before


def test_sync_of_a_mailbox_needing_reauth_is_409_needs_reauth(client, auth_headers, oauth_provider):
    body = _connected(client, auth_headers(), oauth_provider)
    oauth_provider.fail_token_with("invalid_grant")
    refresh = client.post(f"/api/v1/oauth/tokens/{body['id']}/refresh", headers=auth_headers())
    assert refresh.json["error"]["code"] == "needs_reauth"

    response = client.post(f"/api/v1/accounts/{body['account_id']}/sync", headers=auth_headers())

    assert response.status_code == 409
    assert response.json["error"] == {
        "code": "needs_reauth",
        "message": response.json["error"]["message"],
        "reason": "invalid_grant",
    }


def test_password_change_of_an_oauth_account_is_422_on_password(
    client, auth_headers, oauth_provider
):
    account_id = _connected(client, auth_headers(), oauth_provider)["account_id"]
    response = client.patch(
        f"/api/v1/accounts/{account_id}", json={"password": "secret"}, headers=auth_headers()
    )
    _assert_validation_error(response, "password")


def test_duplicate_account_and_send_without_smtp_are_422(client, auth_headers, mail):
    body = {
        "email_address": PASSWORD_USER,
        "imap_host": mail.imap.host,
        "imap_port": mail.imap.imaps_port,
        "password": PASSWORD,
    }
    created = client.post("/api/v1/accounts", json=body, headers=auth_headers())
    assert created.status_code == 201, created.json
    assert created.json["smtp_host"] is None

    again = client.post("/api/v1/accounts", json=body, headers=auth_headers())
    _assert_validation_error(again, "email_address")

    send = client.post(
        f"/api/v1/accounts/{created.json['id']}/send",
        json={"to": ["bob@example.com"], "text": "hi"},
        headers=auth_headers(),
    )
    _assert_validation_error(send, "smtp_host")
