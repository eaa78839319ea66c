"""Domain errors and the one JSON error envelope.

Every error response is `{"error": {"code", "message", ["fields"], ["reason"]}}`,
made by `error_response` and nowhere else.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, g, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger("mailkey.errors")

HTTP_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    502: "provider_error",
    503: "service_unavailable",
}


class MailkeyError(Exception):
    """Base for errors that map onto an API answer."""

    code = "internal_error"
    status = 500
    message = "internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        reason: str | None = None,
        fields: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.message = message or self.message
        self.reason = reason
        self.fields = dict(fields) if fields else None
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})
        super().__init__(self.message)


class BadRequest(MailkeyError):
    code, status, message = "bad_request", 400, "malformed request"


class ValidationFailed(MailkeyError):
    code, status, message = "validation_error", 422, "the request did not validate"


class Unauthorized(MailkeyError):
    code, status, message = "unauthorized", 401, "a valid bearer token is required"

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": 'Bearer realm="mailkey"'})
        super().__init__(message, **kwargs)


class Forbidden(MailkeyError):
    code, status, message = "forbidden", 403, "this needs the admin role"


class NotFound(MailkeyError):
    code, status, message = "not_found", 404, "not found"


class NeedsReauth(MailkeyError):
    code, status = "needs_reauth", 409
    message = "the mailbox must be reconnected: the grant is no longer valid"


class TokenRevoked(MailkeyError):
    code, status, message = "token_revoked", 409, "the token was revoked"


class ProviderNotConfigured(MailkeyError):
    code, status, message = "provider_not_configured", 409, "provider is not configured"


class InvalidState(MailkeyError):
    code, status = "invalid_state", 400
    message = "unknown, expired or already used OAuth state"


class ConsentDenied(MailkeyError):
    code, status, message = "consent_denied", 400, "the user declined consent"


class ProviderRejected(MailkeyError):
    """The provider refused the request at the callback (400)."""

    code, status, message = "provider_error", 400, "the provider returned an error"


class InsufficientScope(MailkeyError):
    code, status, message = "insufficient_scope", 400, "the mail scopes were not granted"


class ProviderError(MailkeyError):
    code, status, message = "provider_error", 502, "the provider answered with an error"


class ProviderConfigError(MailkeyError):
    code, status = "provider_config_error", 502
    message = "the provider rejected Mailkey's client credentials or configuration"


class ProviderUnavailable(MailkeyError):
    code, status, message = "provider_unavailable", 503, "the provider is temporarily unavailable"


class MailServerRejected(MailkeyError):
    code, status, message = "mail_server_rejected", 422, "the mail server refused the login"


class HostNotAllowed(MailkeyError):
    code, status, message = "host_not_allowed", 422, "that mail host is not allowed"


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    fields: Mapping[str, Any] | None = None,
    reason: str | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Response:
    body: dict[str, Any] = {"code": code, "message": message}
    if fields:
        body["fields"] = fields
    if reason:
        body["reason"] = reason
    if extra:
        body.update(extra)
    response = jsonify({"error": body})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def mailkey_error_response(error: MailkeyError) -> Response:
    return error_response(
        error.status,
        error.code,
        error.message,
        fields=error.fields,
        reason=error.reason,
        headers=error.headers,
        extra=error.extra,
    )


def _flatten_webargs(messages: Any) -> dict[str, Any]:
    """webargs nests errors by location ({"query": {...}}); the API shows field names."""
    fields: dict[str, Any] = {}
    if isinstance(messages, Mapping):
        for location, errs in messages.items():
            if isinstance(errs, Mapping):
                fields.update(errs)
            else:
                fields[str(location)] = errs
    return fields


def http_exception_response(error: HTTPException) -> Response:
    status = error.code or 500
    data = getattr(error, "data", None) or {}
    code = HTTP_CODES.get(status, "error")
    headers: dict[str, str] = dict(data.get("headers") or {})
    allowed = getattr(error, "valid_methods", None)
    if status == 405 and allowed:
        headers["Allow"] = ", ".join(allowed)
    if status == 401:
        headers.setdefault("WWW-Authenticate", 'Bearer realm="mailkey"')
    messages = data.get("errors") or data.get("messages")
    if status == 422:
        return error_response(
            422, code, "the request did not validate", fields=_flatten_webargs(messages)
        )
    if status == 400 and messages:
        return error_response(400, code, "malformed request body or query", headers=headers)
    if status >= 500:
        return internal_error_response()
    message = data.get("message") or (error.description or error.name)
    if status == 404 and not data.get("message"):
        message = "no such resource"
    return error_response(status, code, str(message), headers=headers)


def internal_error_response() -> Response:
    request_id = getattr(g, "request_id", None)
    return error_response(
        500,
        "internal_error",
        "internal error; quote the request id when reporting it",
        extra={"request_id": request_id},
    )


def undecryptable_response(error: Exception) -> Response:
    """Safety net: stored data no key opens is the owner's to repair (reconnect), never a
    500. Token reads mark the token themselves; this catches any other path."""
    log.error("decryption_failed", extra={"event": "decryption_failed"})
    return mailkey_error_response(
        NeedsReauth(
            "stored data cannot be decrypted; the mailbox must be reconnected",
            reason="decryption_failed",
        )
    )


def register_errorhandlers(app: Flask) -> None:
    from webapp.crypto import DecryptionError

    app.register_error_handler(MailkeyError, mailkey_error_response)
    app.register_error_handler(HTTPException, http_exception_response)
    app.register_error_handler(DecryptionError, undecryptable_response)

    @app.errorhandler(Exception)
    def _unhandled(error: Exception) -> Response:
        if isinstance(error, HTTPException):
            return http_exception_response(error)
        log.exception(
            "unhandled_error",
            extra={"event": "unhandled_error", "error_type": type(error).__name__},
        )
        return internal_error_response()
