"""Helpers that drive Mailkey through its real HTTP flow against the local provider."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
from flask.testing import FlaskClient

from webapp.extensions import db
from webapp.models import UserEmailToken
from webapp.services.tokens import store_secrets


def authorize(authorization_url: str) -> dict[str, str]:
    """Play the browser at the provider: follow /authorize, return the callback params."""
    response = requests.get(authorization_url, allow_redirects=False, timeout=10)
    assert response.status_code == 302, response.text
    query = parse_qs(urlsplit(response.headers["Location"]).query)
    return {key: values[0] for key, values in query.items()}


def start_login(client: FlaskClient, headers: dict[str, str], provider: str = "google") -> dict:
    response = client.get(f"/api/v1/oauth/login/{provider}?response=json", headers=headers)
    assert response.status_code == 200, response.json
    return response.json


def connect(
    client: FlaskClient,
    headers: dict[str, str],
    provider: str = "google",
    oauth_provider: Any = None,
    email: str | None = None,
) -> Any:
    """Full login -> consent -> callback; returns the callback response."""
    if oauth_provider is not None and email is not None:
        oauth_provider.next_user_email = email
    login = start_login(client, headers, provider)
    params = authorize(login["authorization_url"])
    return client.get(f"/api/v1/oauth/callback/{provider}", query_string=params, headers=headers)


MAIL_SCOPE = "openid email https://mail.google.com/"


def stored_grant(
    provider: Any,
    address: str,
    expires_at: datetime,
    *,
    organization_id: int = 1,
    user_id: int = 1,
    **columns: Any,
) -> tuple[UserEmailToken, dict[str, Any]]:
    """A Google token row holding a grant the local provider issued for `address` (the
    mail scope granted, its tokens encrypted as the callback stores them), added to the
    session but not committed; and the tokens issued."""
    issued = provider.issue_tokens_for(address, scope=MAIL_SCOPE)
    token = UserEmailToken(
        organization_id=organization_id, user_id=user_id, provider="google",
        email_address=address, status="active", scopes=MAIL_SCOPE, expires_at=expires_at,
        **columns,
    )  # fmt: skip
    store_secrets(token, issued["access_token"], issued["refresh_token"])
    db.session.add(token)
    return token, issued
