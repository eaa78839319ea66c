"""OAuth flow and token management: /api/v1/oauth/..."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from flask import current_app, jsonify, redirect, request, url_for
from flask_smorest import Blueprint

from webapp.api import document_errors
from webapp.api.v1.schemas_tokens import (
    CallbackArgsSchema,
    LoginArgsSchema,
    LoginSchema,
    RefreshArgsSchema,
    RevokedTokenSchema,
    TaskQueuedSchema,
    TokenListArgsSchema,
    TokenPageSchema,
    TokenSchema,
)
from webapp.auth import current_principal, require_auth
from webapp.errors import MailkeyError
from webapp.models import utcnow
from webapp.services import oauth as oauth_service
from webapp.services import tokens as token_service
from webapp.services.queue import enqueue

blueprint = Blueprint(
    "oauth", __name__, url_prefix="/api/v1/oauth", description="Connect mailboxes; manage tokens"
)


def _quality(mimetype: str) -> float:
    return max((q for value, q in request.accept_mimetypes if value == mimetype), default=0)


def prefers_json() -> bool:
    """Accept names application/json explicitly, above text/html (`*/*` does not count)."""
    return _quality("application/json") > _quality("text/html")


def accepts_json() -> bool:
    return _quality("application/json") > 0


def default_redirect_uri() -> str:
    """Without OAUTH_REDIRECT_URI, the built-in console's completion page."""
    return (
        url_for("console.oauth_complete", _external=True)
        if "console" in (current_app.blueprints)
        else request.host_url.rstrip("/") + "/console/oauth/complete"
    )


@blueprint.route("/login/<provider>", methods=["GET"])
@require_auth
@blueprint.arguments(LoginArgsSchema, location="query", as_kwargs=True)
@blueprint.response(200, LoginSchema, description="With ?response=json or Accept: application/json")
@blueprint.alt_response(302, description="Redirect to the provider's consent page", success=True)
@document_errors(blueprint, 401, 404, 409)
def login(provider: str, response: str | None = None, login_hint: str | None = None) -> Any:
    """Start connecting a mailbox: state + PKCE stored for 10 minutes."""
    start = oauth_service.start_login(
        current_principal(),
        provider,
        default_redirect=default_redirect_uri(),
        login_hint=login_hint,
    )
    if response == "json" or (response != "redirect" and prefers_json()):
        return start
    return redirect(start.authorization_url, code=302)


@blueprint.route("/callback/<provider>", methods=["GET"])
@require_auth
@blueprint.arguments(CallbackArgsSchema, location="query")
@blueprint.response(201, TokenSchema, description="A new mailbox was connected")
@blueprint.alt_response(200, schema=TokenSchema, description="Reconnected", success=True)
@blueprint.alt_response(302, description="To OAUTH_SUCCESS_REDIRECT (browsers)", success=True)
@document_errors(blueprint, 400, 401, 404, 409, 502)
def callback(args: dict[str, str], provider: str) -> Any:
    """Finish connecting: the integrator's page forwards `code` and `state` (or `error`)."""
    success_redirect: str = current_app.config.get("OAUTH_SUCCESS_REDIRECT") or ""
    redirecting = bool(success_redirect) and not accepts_json()
    try:
        result = oauth_service.complete_callback(current_principal(), provider, args)
    except MailkeyError as error:
        if not redirecting:
            raise
        return redirect(_with_query(success_redirect, status="error", code=error.code), code=302)
    if redirecting:
        return redirect(
            _with_query(success_redirect, status="connected", token_id=str(result.token.id)),
            code=302,
        )
    return result.token, 201 if result.created else 200


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = "&".join(filter(None, [parts.query, urlencode(params)]))
    return urlunsplit(parts._replace(query=query))


@blueprint.route("/tokens", methods=["GET"])
@require_auth
@blueprint.arguments(TokenListArgsSchema, location="query", as_kwargs=True)
@blueprint.response(200, TokenPageSchema)
@document_errors(blueprint, 401)
def list_tokens(**filters: Any) -> dict[str, Any]:
    """The caller's tokens (never a token value or a ciphertext)."""
    return token_service.list_tokens(current_principal().owner, **filters)


@blueprint.route("/tokens/<id:token_id>", methods=["GET"])
@require_auth
@blueprint.response(200, TokenSchema)
@document_errors(blueprint, 401, 404)
def get_token(token_id: int) -> Any:
    return token_service.get_owned_token(current_principal().owner, token_id)


@blueprint.route("/tokens/<id:token_id>/refresh", methods=["POST"])
@require_auth
@blueprint.arguments(RefreshArgsSchema, location="query", as_kwargs=True)
@blueprint.response(200, TokenSchema)
@blueprint.alt_response(202, schema=TaskQueuedSchema, description="?async=true", success=True)
@document_errors(blueprint, 401, 404, 409, 502, 503)
def refresh(token_id: int, run_async: bool = False) -> Any:
    """Refresh now (or enqueue with ?async=true)."""
    token = token_service.get_owned_token(current_principal().owner, token_id)
    if run_async:
        token_service.ensure_usable(token)  # 409 now rather than a silent task
        queued = jsonify(
            {
                "task_id": enqueue(
                    "tasks.refresh.refresh_token", token.id, True, utcnow().isoformat()
                )
            }
        )
        queued.status_code = 202
        return queued
    return token_service.refresh_token(token.id, trigger="api").token


@blueprint.route("/tokens/<id:token_id>/revoke", methods=["POST"])
@require_auth
@blueprint.alt_response(200, schema=RevokedTokenSchema, success=True)
@document_errors(blueprint, 401, 404)
def revoke(token_id: int) -> Any:
    """Revoke at the provider (where it has an endpoint) and wipe the stored secrets."""
    token, provider_revoked, message = token_service.revoke(current_principal().owner, token_id)
    body = TokenSchema().dump(token)
    return jsonify({**body, "provider_revoked": provider_revoked, "message": message})
