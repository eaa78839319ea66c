"""Hosts typed in by users cannot reach private networks at any connection: not when
the name resolves to a private address only after the account was saved, and not
through DNS rebinding between the check and the connect (the connection goes to the
address that was checked)."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import PASSWORD, PASSWORD_USER
from tests.integration.conftest import password_account
from webapp.services import send as send_service
from webapp.services import sync as sync_service

PUBLIC = "93.184.216.34"
REBINDING_HOST = "mail.rebinding.test"


@pytest.fixture
def guarded_account(app, mail, monkeypatch):
    """A password account on the local Dovecot/SMTP, saved while private hosts were
    allowed; from then on they are not (production's default)."""
    account = password_account(mail, PASSWORD_USER, PASSWORD)
    monkeypatch.setitem(app.config, "MAIL_ALLOW_PRIVATE_HOSTS", False)
    return account


def test_sync_of_a_user_host_that_now_resolves_to_loopback_is_refused(guarded_account):
    run = sync_service.sync_account(guarded_account.id)
    assert run.outcome == "failed"
    assert run.error and "private, loopback or link-local" in run.error
    assert run.new_count == 0


def test_send_through_a_user_host_that_now_resolves_to_loopback_is_refused(mail, guarded_account):
    queued = send_service.queue_send(guarded_account, {"to": ["bob@example.com"]}, None)
    send = send_service.deliver(queued.id)
    assert send is not None and send.status == "failed"
    assert send.error and "private, loopback or link-local" in send.error
    assert mail.smtp.messages == []


def test_account_check_connects_to_the_address_it_vetted_not_a_rebound_one(
    app, client, auth_headers, monkeypatch
):
    monkeypatch.setitem(app.config, "MAIL_ALLOW_PRIVATE_HOSTS", False)
    real_getaddrinfo = socket.getaddrinfo
    answers = iter([PUBLIC])  # public for the check, loopback for anyone asking later

    def rebinding(host, port, *args, **kwargs):
        if host == REBINDING_HOST:
            address = next(answers, "127.0.0.1")
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    connected: list[str] = []

    def refuse(address, *_args, **_kwargs):
        connected.append(address[0])
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(socket, "create_connection", refuse)
    response = client.post(
        "/api/v1/accounts",
        json={"email_address": "eve@example.com", "imap_host": REBINDING_HOST, "password": "x"},
        headers=auth_headers(),
    )
    assert response.status_code == 422, response.json
    assert connected == [PUBLIC]
