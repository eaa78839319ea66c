"""Helpers that drive Mailkey through its real HTTP flow against the local provider."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
from flask.testing import FlaskClient


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
