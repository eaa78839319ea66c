"""Shapes of the OAuth and token endpoints."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from marshmallow import fields, validate

from webapp.models import TOKEN_STATUSES_REPORTED
from webapp.providers import PROVIDER_NAMES
from webapp.schemas import PageArgsSchema, Timestamp, collection_schema


class TokenSchema(ma.Schema):
    id = fields.Integer()
    provider = fields.String()
    email_address = fields.String()
    status = fields.Method("get_status")
    status_reason = fields.String(allow_none=True)
    scopes = fields.Function(lambda token: token.scope_list)
    expires_at = Timestamp(allow_none=True)
    last_refreshed_at = Timestamp(allow_none=True)
    last_used_at = Timestamp(allow_none=True)
    refresh_failure_count = fields.Integer()
    last_refresh_error = fields.String(allow_none=True)
    account_id = fields.Function(lambda token: token.account.id if token.account else None)
    created_at = Timestamp()
    updated_at = Timestamp()

    def get_status(self, token: Any) -> str:
        return token.derived_status()


class RevokedTokenSchema(TokenSchema):
    provider_revoked = fields.Boolean()
    message = fields.String()


TokenPageSchema = collection_schema(TokenSchema, "TokenPage")


class TokenListArgsSchema(PageArgsSchema):
    provider = fields.String(validate=validate.OneOf(PROVIDER_NAMES))
    status = fields.String(validate=validate.OneOf(TOKEN_STATUSES_REPORTED))


class LoginArgsSchema(ma.Schema):
    response = fields.String(validate=validate.OneOf(["json", "redirect"]))
    login_hint = fields.String(validate=validate.Length(max=320))


class LoginSchema(ma.Schema):
    authorization_url = fields.String()
    state = fields.String()
    expires_at = Timestamp()


class CallbackArgsSchema(ma.Schema):
    class Meta:
        unknown = ma.EXCLUDE

    code = fields.String(validate=validate.Length(max=4096))
    # No length limits on what the provider wrote: an oversized state is simply unknown
    # (400 invalid_state) and the description is never used.
    state = fields.String()
    error = fields.String(validate=validate.Length(max=200))
    error_description = fields.String()


class RefreshArgsSchema(ma.Schema):
    # `async` is a Python keyword: the field is named run_async.
    run_async = fields.Boolean(data_key="async", load_default=False)


class TaskQueuedSchema(ma.Schema):
    task_id = fields.String()
