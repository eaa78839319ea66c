"""Mail accounts: /api/v1/accounts/..."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask import request
from flask_smorest import Blueprint
from marshmallow import fields, validate

from webapp.api import document_errors
from webapp.auth import current_principal, require_auth
from webapp.errors import ValidationFailed
from webapp.schemas import PageArgsSchema, Timestamp, collection_schema
from webapp.services import accounts as account_service

blueprint = Blueprint(
    "accounts", __name__, url_prefix="/api/v1/accounts", description="Mail accounts, sync, send"
)
SECURITY = ("ssl", "starttls")


class AccountSchema(ma.Schema):
    id = fields.Integer()
    email_address = fields.String()
    display_name = fields.String(allow_none=True)
    provider = fields.String()
    incoming_auth_method = fields.String()
    imap_host = fields.String(attribute="incoming_server")
    imap_port = fields.Integer(attribute="incoming_port")
    imap_security = fields.String(attribute="incoming_security")
    smtp_host = fields.String(attribute="outgoing_server", allow_none=True)
    smtp_port = fields.Integer(attribute="outgoing_port", allow_none=True)
    smtp_security = fields.String(attribute="outgoing_security", allow_none=True)
    username = fields.String(allow_none=True)
    sync_enabled = fields.Boolean()
    status = fields.String()
    last_error = fields.String(allow_none=True)
    last_synced_at = Timestamp(allow_none=True)
    token_id = fields.Integer(allow_none=True)
    created_at = Timestamp()
    updated_at = Timestamp()


class AccountCreateSchema(ma.Schema):
    email_address = fields.Email(required=True, validate=validate.Length(max=255))
    display_name = fields.String(validate=validate.Length(max=255), allow_none=True)
    imap_host = fields.String(required=True, validate=validate.Length(min=1, max=255))
    imap_port = fields.Integer(load_default=993, validate=validate.Range(1, 65535))
    imap_security = fields.String(load_default="ssl", validate=validate.OneOf(SECURITY))
    smtp_host = fields.String(validate=validate.Length(min=1, max=255), allow_none=True)
    smtp_port = fields.Integer(load_default=587, validate=validate.Range(1, 65535))
    smtp_security = fields.String(load_default="starttls", validate=validate.OneOf(SECURITY))
    username = fields.String(validate=validate.Length(max=255))
    password = fields.String(
        required=True, load_only=True, validate=validate.Length(min=1, max=1024)
    )
    sync_enabled = fields.Boolean(load_default=True)


class AccountUpdateSchema(ma.Schema):
    display_name = fields.String(validate=validate.Length(max=255), allow_none=True)
    sync_enabled = fields.Boolean()
    password = fields.String(load_only=True, validate=validate.Length(min=1, max=1024))


class FolderSchema(ma.Schema):
    id = fields.Integer()
    name = fields.String()
    delimiter = fields.String(allow_none=True)
    flags = fields.List(fields.String())
    uidvalidity = fields.Integer(allow_none=True)
    message_count = fields.Integer()
    last_synced_at = Timestamp(allow_none=True)


class MessageSchema(ma.Schema):
    id = fields.Integer()
    folder = fields.String()
    uid = fields.Integer()
    message_id = fields.String(allow_none=True)
    subject = fields.String(allow_none=True)
    from_address = fields.String(allow_none=True)
    to_addresses = fields.List(fields.String())
    cc_addresses = fields.List(fields.String())
    sent_at = Timestamp(allow_none=True)
    flags = fields.List(fields.String())
    size = fields.Integer(allow_none=True)
    snippet = fields.String(allow_none=True)


class MessageArgsSchema(PageArgsSchema):
    folder = fields.String(load_default=None, validate=validate.Length(max=512))
    since = Timestamp(load_default=None)


class SyncRunSchema(ma.Schema):
    id = fields.Integer()
    account_id = fields.Integer()
    started_at = Timestamp()
    finished_at = Timestamp(allow_none=True)
    outcome = fields.String()
    new_count = fields.Integer()
    updated_count = fields.Integer()
    deleted_count = fields.Integer()
    error = fields.String(allow_none=True)
    duration_seconds = fields.Float(allow_none=True)


class SyncQueuedSchema(ma.Schema):
    sync_run_id = fields.Integer()


class SendRequestSchema(ma.Schema):
    to = fields.List(fields.Email(), load_default=list, validate=validate.Length(max=100))
    cc = fields.List(fields.Email(), load_default=list, validate=validate.Length(max=100))
    bcc = fields.List(fields.Email(), load_default=list, validate=validate.Length(max=100))
    subject = fields.String(load_default="", validate=validate.Length(max=998))
    text = fields.String(load_default="", validate=validate.Length(max=1_000_000))
    html = fields.String(validate=validate.Length(max=1_000_000))
    in_reply_to = fields.String(validate=validate.Length(max=998))
    references = fields.List(fields.String(validate=validate.Length(max=998)))

    @ma.validates_schema
    def needs_a_recipient(self, data: dict[str, Any], **_kwargs: Any) -> None:
        if not (data.get("to") or data.get("cc") or data.get("bcc")):
            raise ma.ValidationError("at least one recipient is required", "to")


class SendQueuedSchema(ma.Schema):
    send_id = fields.Integer()
    status = fields.String()


class SendSchema(ma.Schema):
    id = fields.Integer()
    account_id = fields.Integer()
    status = fields.String()
    message_id = fields.String()
    recipient_count = fields.Integer()
    error = fields.String(allow_none=True)
    attempts = fields.Integer()
    created_at = Timestamp()
    sent_at = Timestamp(allow_none=True)


def _owner() -> tuple[int, int]:
    return current_principal().owner


@blueprint.route("", methods=["GET"])
@require_auth
@blueprint.arguments(PageArgsSchema, location="query", as_kwargs=True)
@blueprint.response(200, collection_schema(AccountSchema, "AccountPage"))
@document_errors(blueprint, 401)
def list_accounts(limit: int, cursor: str | None) -> Any:
    return account_service.list_accounts(_owner(), limit, cursor)


@blueprint.route("", methods=["POST"])
@require_auth
@blueprint.arguments(AccountCreateSchema)
@blueprint.response(201, AccountSchema)
@document_errors(blueprint, 400, 401, 422)
def create_account(data: dict[str, Any]) -> Any:
    """Add a password (IMAP LOGIN) account; the server is tried before it is saved."""
    return account_service.create_password_account(_owner(), data)


@blueprint.route("/<id:account_id>", methods=["GET"])
@require_auth
@blueprint.response(200, AccountSchema)
@document_errors(blueprint, 401, 404)
def get_account(account_id: int) -> Any:
    return account_service.get_owned_account(_owner(), account_id)


@blueprint.route("/<id:account_id>", methods=["PATCH"])
@require_auth
@blueprint.arguments(AccountUpdateSchema)
@blueprint.response(200, AccountSchema)
@document_errors(blueprint, 400, 401, 404, 422)
def update_account(changes: dict[str, Any], account_id: int) -> Any:
    if not changes:
        raise ValidationFailed(fields={"_schema": ["nothing to change"]})
    return account_service.update_account(_owner(), account_id, changes)


@blueprint.route("/<id:account_id>", methods=["DELETE"])
@require_auth
@blueprint.response(204)
@document_errors(blueprint, 401, 404)
def delete_account(account_id: int) -> None:
    account_service.delete_account(_owner(), account_id)


@blueprint.route("/<id:account_id>/folders", methods=["GET"])
@require_auth
@blueprint.arguments(PageArgsSchema, location="query", as_kwargs=True)
@blueprint.response(200, collection_schema(FolderSchema, "FolderPage"))
@document_errors(blueprint, 401, 404)
def folders(account_id: int, limit: int, cursor: str | None) -> Any:
    """In the order the sync first saw them (the server's LIST order)."""
    return account_service.list_folders(_owner(), account_id, limit, cursor)


@blueprint.route("/<id:account_id>/messages", methods=["GET"])
@require_auth
@blueprint.arguments(MessageArgsSchema, location="query", as_kwargs=True)
@blueprint.response(200, collection_schema(MessageSchema, "MessagePage"))
@document_errors(blueprint, 401, 404)
def messages(account_id: int, **query: Any) -> Any:
    return account_service.list_messages(_owner(), account_id, **query)


@blueprint.route("/<id:account_id>/sync", methods=["POST"])
@require_auth
@blueprint.response(202, SyncQueuedSchema)
@document_errors(blueprint, 401, 404, 409)
def sync_now(account_id: int) -> Any:
    """Queue a sync (or answer the running one's id)."""
    return {"sync_run_id": account_service.request_sync(_owner(), account_id)}


@blueprint.route("/<id:account_id>/sync-runs", methods=["GET"])
@require_auth
@blueprint.arguments(PageArgsSchema, location="query", as_kwargs=True)
@blueprint.response(200, collection_schema(SyncRunSchema, "SyncRunPage"))
@document_errors(blueprint, 401, 404)
def sync_runs(account_id: int, limit: int, cursor: str | None) -> Any:
    """Newest first."""
    return account_service.list_sync_runs(_owner(), account_id, limit, cursor)


@blueprint.route("/<id:account_id>/send", methods=["POST"])
@require_auth
@blueprint.arguments(SendRequestSchema)
@blueprint.response(202, SendQueuedSchema)
@document_errors(blueprint, 400, 401, 404, 409, 422)
def send(request_body: dict[str, Any], account_id: int) -> Any:
    """Queue a message. An `Idempotency-Key` header makes a retried request send once."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (1 <= len(key) <= 200):
        raise ValidationFailed(fields={"Idempotency-Key": ["must be 1 to 200 characters"]})
    queued = account_service.send(_owner(), account_id, request_body, key)
    return {"send_id": queued.id, "status": queued.status}


@blueprint.route("/<id:account_id>/sends/<id:send_id>", methods=["GET"])
@require_auth
@blueprint.response(200, SendSchema)
@document_errors(blueprint, 401, 404)
def get_send(account_id: int, send_id: int) -> Any:
    return account_service.get_send(_owner(), account_id, send_id)
