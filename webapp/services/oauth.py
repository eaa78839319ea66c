"""The OAuth2 authorization-code flow with PKCE: login and callback.

The state lives in Redis for OAUTH_STATE_TTL_SECONDS, bound to the caller's
(organization, user) and the provider, and is consumed with GETDEL on every
callback (error calls too), so it is single use even under concurrent calls.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt
import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session
from flask import current_app
from sqlalchemy import select

from webapp.auth import Principal
from webapp.errors import (
    ConsentDenied,
    InsufficientScope,
    InvalidState,
    ProviderConfigError,
    ProviderError,
    ProviderNotConfigured,
    ProviderRejected,
)
from webapp.extensions import db, redis_store
from webapp.models import MailAccount, UserEmailToken, utcnow
from webapp.providers import Provider
from webapp.services.provider_http import (
    ProviderFailure,
    parse_scope,
    refused_code,
    token_request,
)
from webapp.services.queue import enqueue
from webapp.services.tokens import apply_token_response, provider_for

log = logging.getLogger("mailkey.oauth")
STATE_KEY = "mailkey:oauth:state:{}"


def configured_provider(name: str) -> Provider:
    provider = provider_for(name)
    if not provider.configured:
        raise ProviderNotConfigured(
            f"provider {name} is not configured: set {provider.client_id_var}",
            reason="missing_client_id",
        )
    return provider


def redirect_uri_for(provider: Provider, default: str) -> str:
    template = current_app.config.get("OAUTH_REDIRECT_URI") or default
    return template.replace("{provider}", provider.name)


@dataclass
class LoginStart:
    authorization_url: str
    state: str
    expires_at: datetime


def start_login(
    principal: Principal, provider_name: str, *, default_redirect: str, login_hint: str | None
) -> LoginStart:
    provider = configured_provider(provider_name)
    ttl = current_app.config["OAUTH_STATE_TTL_SECONDS"]
    state = secrets.token_urlsafe(32)  # 256 bits
    verifier = generate_token(64)
    redirect_uri = redirect_uri_for(provider, default_redirect)
    client = OAuth2Session(
        provider.client_id,
        scope=" ".join(provider.scopes),
        redirect_uri=redirect_uri,
        code_challenge_method="S256",
    )
    extra = dict(provider.authorize_params)
    if login_hint:
        extra["login_hint"] = login_hint
    url, _ = client.create_authorization_url(
        provider.authorize_url, state=state, code_verifier=verifier, **extra
    )
    record = {
        "organization_id": principal.organization_id,
        "user_id": principal.user_id,
        "provider": provider.name,
        "verifier": verifier,
        "redirect_uri": redirect_uri,
    }
    redis_store.client.set(STATE_KEY.format(state), json.dumps(record), ex=ttl)
    log.info(
        "oauth_login_started",
        extra={"event": "oauth_login_started", "provider": provider.name},
    )
    return LoginStart(url, state, utcnow() + timedelta(seconds=ttl))


@dataclass
class CallbackResult:
    token: UserEmailToken
    account_id: int
    created: bool
    sync_enabled: bool = True


def complete_callback(
    principal: Principal, provider_name: str, params: dict[str, str]
) -> CallbackResult:
    provider = provider_for(provider_name)
    record = _consume_state(params.get("state"))
    if (
        record is None
        or record.get("provider") != provider.name
        or record.get("organization_id") != principal.organization_id
        or record.get("user_id") != principal.user_id
    ):
        raise InvalidState()
    error = params.get("error")
    if error:
        log.info("oauth_callback_error", extra={"event": "oauth_callback_error", "error": error})
        if error == "access_denied":
            raise ConsentDenied()
        raise ProviderRejected(f"the provider returned an error: {error[:100]}", reason=error[:100])
    code = params.get("code")
    if not code:
        raise ProviderRejected("the callback carried neither a code nor an error")
    configured_provider(provider.name)

    answer = _exchange_code(provider, code, record)
    address = _mailbox_address(provider, answer)
    granted = _granted_scopes(provider, answer)
    missing = provider.missing_mail_scopes(granted)
    if missing:
        log.warning(  # the operator sees why connecting fails, not only a 400
            "oauth_mail_scope_missing",
            extra={
                "event": "oauth_mail_scope_missing",
                "provider": provider.name,
                "granted": " ".join(granted),
            },
        )
        raise InsufficientScope(
            f"the mail scopes were not granted: {' '.join(missing)}", reason="mail_scope_missing"
        )
    answer = {**answer, "scope": " ".join(granted)}
    result = _store(principal, provider, address, answer)
    if result.sync_enabled:  # a reconnected account whose sync was turned off stays off
        enqueue("tasks.sync.sync_account", result.account_id)
    return result


def _consume_state(state: str | None) -> dict[str, Any] | None:
    if not state or len(state) > 200:
        return None
    raw = redis_store.client.getdel(STATE_KEY.format(state))
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _exchange_code(provider: Provider, code: str, record: dict[str, Any]) -> dict[str, Any]:
    try:
        return token_request(
            provider,
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": record["redirect_uri"],
                "code_verifier": record["verifier"],
            },
            timeout=current_app.config["PROVIDER_TIMEOUT_SECONDS"],
        )
    except ProviderFailure as failure:
        log.warning(
            "oauth_code_exchange_failed",
            extra={
                "event": "oauth_code_exchange_failed",
                "provider": provider.name,
                "error_code": failure.error_code,
                "http_status": failure.http_status,
            },
        )
        if refused_code(failure):
            raise ProviderRejected(
                f"the provider refused the authorization code ({failure.error_code})",
                reason=failure.error_code,
            ) from None
        if failure.kind == "configuration":
            raise ProviderConfigError(
                f"the provider rejected Mailkey's client configuration ({failure.error_code})",
                reason=failure.error_code,
            ) from None
        raise ProviderError(
            f"the provider failed at the code exchange ({failure.error_code})",
            reason=failure.error_code,
        ) from None


def _id_token_claims(provider: Provider, answer: dict[str, Any]) -> dict[str, Any]:
    """Claims of the id_token. It came straight from the token endpoint over TLS
    (OIDC Core 3.1.3.7), so the audience is checked, not the signature."""
    raw = answer.get("id_token")
    if not isinstance(raw, str):
        return {}
    try:
        claims = jwt.decode(raw, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        raise ProviderError("the provider returned a malformed id_token") from None
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    if provider.client_id not in audiences:
        raise ProviderError("the id_token was issued for another client", reason="aud_mismatch")
    return claims


# Where a mailbox address may be found, in order. Userinfo endpoints in Microsoft
# Graph's style answer `mail` / `userPrincipalName` rather than OIDC's `email`.
ID_TOKEN_ADDRESS_CLAIMS = ("email", "preferred_username")
USERINFO_ADDRESS_CLAIMS = ("email", "mail", "preferred_username", "userPrincipalName")


def _mailbox_address(provider: Provider, answer: dict[str, Any]) -> str:
    """From the provider's address source first, then the other one: a server may send
    no id_token (the address only in userinfo) or have no userinfo endpoint."""
    claims = _id_token_claims(provider, answer)
    sources = [
        lambda: _address_in(claims, ID_TOKEN_ADDRESS_CLAIMS),
        lambda: _address_in(_userinfo(provider, answer), USERINFO_ADDRESS_CLAIMS),
    ]
    if provider.address_source == "userinfo":
        sources.reverse()
    for source in sources:
        address = source()
        if address:
            return address.strip().lower()
    log.warning(  # claim names only: their values are the user's
        "oauth_no_address",
        extra={
            "event": "oauth_no_address",
            "provider": provider.name,
            "id_token_claims": " ".join(sorted(claims)),
        },
    )
    raise ProviderError("the provider did not tell the mailbox address", reason="no_address")


def _address_in(info: dict[str, Any], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = info.get(name)
        if isinstance(value, str) and "@" in value:
            return value
    return None


def _userinfo(provider: Provider, answer: dict[str, Any]) -> dict[str, Any]:
    """The userinfo answer; empty when there is no endpoint or it fails (the id_token may
    still tell the address)."""
    if not provider.userinfo_url:
        return {}
    try:
        response = requests.get(
            provider.userinfo_url,
            headers={
                "Authorization": f"Bearer {answer['access_token']}",
                "Accept": "application/json",
            },
            timeout=current_app.config["PROVIDER_TIMEOUT_SECONDS"],
        )
        info = response.json() if response.status_code == 200 else None
    except (requests.RequestException, ValueError):
        info = None
    if not isinstance(info, dict):
        log.warning(
            "oauth_userinfo_failed",
            extra={"event": "oauth_userinfo_failed", "provider": provider.name},
        )
        return {}
    return info


def _granted_scopes(provider: Provider, answer: dict[str, Any]) -> list[str]:
    """No `scope` in the answer means the requested scopes were granted (RFC 6749 5.1)."""
    return parse_scope(answer.get("scope")) or list(provider.scopes)


def _store(
    principal: Principal, provider: Provider, address: str, answer: dict[str, Any]
) -> CallbackResult:
    owner = {
        "organization_id": principal.organization_id,
        "user_id": principal.user_id,
        "provider": provider.name,
        "email_address": address,
    }
    token, created = _find_or_add(UserEmailToken, owner)
    now = utcnow()
    token.status = "active"
    token.status_reason = None
    token.revoked_at = None
    token.refresh_failure_count = 0
    token.last_refresh_error = None
    token.last_refreshed_at = now
    apply_token_response(token, answer, now)
    db.session.flush()
    account = _upsert_account(owner, provider, token)
    db.session.commit()
    log.info(
        "mailbox_connected",
        extra={
            "event": "mailbox_connected",
            "token_id": token.id,
            "provider": provider.name,
            "new_mailbox": created,
        },
    )
    return CallbackResult(token, account.id, created, account.sync_enabled)


def _find_or_add(model: Any, keys: dict[str, Any]) -> tuple[Any, bool]:
    """The row with these column values, or a new one added to the session (True)."""
    row = db.session.scalars(select(model).filter_by(**keys)).first()
    if row is not None:
        return row, False
    row = model(**keys)
    db.session.add(row)
    return row, True


def _upsert_account(
    owner: dict[str, Any], provider: Provider, token: UserEmailToken
) -> MailAccount:
    """One mail account per owner and address: created at the first connect, pointed at
    the token and the provider's servers again at every reconnect."""
    account, _ = _find_or_add(MailAccount, owner)  # sync_enabled defaults to true
    account.token_id = token.id
    account.incoming_auth_method = "xoauth2"
    account.incoming_server = provider.imap_host
    account.incoming_port = provider.imap_port
    account.incoming_security = provider.imap_security
    account.outgoing_server = provider.smtp_host
    account.outgoing_port = provider.smtp_port
    account.outgoing_security = provider.smtp_security
    account.username = owner["email_address"]
    account.password_encrypted = None
    account.status = "active"
    account.last_error = None
    return account
