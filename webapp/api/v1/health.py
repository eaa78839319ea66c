"""Organization health for admins: /api/v1/health/..."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask_smorest import Blueprint
from marshmallow import fields, validate

from webapp.api import document_errors
from webapp.auth import current_principal, require_admin
from webapp.schemas import Timestamp
from webapp.services import health as health_service

blueprint = Blueprint(
    "health",
    __name__,
    url_prefix="/api/v1/health",
    description="Token, refresh and sync health of the caller's organization (admin role)",
)


# --- shapes -------------------------------------------------------------------------------


class TokenHealthArgsSchema(ma.Schema):
    within_hours = fields.Integer(
        load_default=24,
        validate=validate.Range(min=1, max=720),
        metadata={"description": "Window of `expiring_soon`, in hours"},
    )


class TimelineArgsSchema(ma.Schema):
    hours = fields.Integer(load_default=24, validate=validate.Range(min=1, max=168))


class ProviderTokenHealthSchema(ma.Schema):
    total = fields.Integer(required=True)
    active = fields.Integer(required=True)
    expired = fields.Integer(required=True)
    needs_reauth = fields.Integer(required=True)
    revoked = fields.Integer(required=True)
    expiring_soon = fields.Integer(required=True)
    refresh_attempts_24h = fields.Integer(required=True)
    refresh_failures_24h = fields.Integer(required=True)
    refresh_success_rate_24h = fields.Float(required=True, allow_none=True)


class TokenHealthSchema(ProviderTokenHealthSchema):
    expiring_soon_window_hours = fields.Integer(required=True)
    by_provider = fields.Dict(
        keys=fields.String(), values=fields.Nested(ProviderTokenHealthSchema), required=True
    )
    generated_at = Timestamp(required=True)


class AccountCountsSchema(ma.Schema):
    total = fields.Integer(required=True)
    active = fields.Integer(required=True)
    error = fields.Integer(required=True)
    paused = fields.Integer(required=True)


class SyncRunCountsSchema(ma.Schema):
    total = fields.Integer(required=True)
    succeeded = fields.Integer(required=True)
    failed = fields.Integer(required=True)


class SyncHealthSchema(ma.Schema):
    accounts = fields.Nested(AccountCountsSchema, required=True)
    sync_runs_24h = fields.Nested(SyncRunCountsSchema, required=True)
    success_rate_24h = fields.Float(required=True, allow_none=True)
    avg_duration_seconds = fields.Float(required=True, allow_none=True)
    p95_duration_seconds = fields.Float(required=True, allow_none=True)
    messages_synced_24h = fields.Integer(required=True)
    generated_at = Timestamp(required=True)


class TimelineBucketSchema(ma.Schema):
    start = Timestamp(required=True)
    refresh = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    sync = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)


class TimelineSchema(ma.Schema):
    buckets = fields.List(fields.Nested(TimelineBucketSchema), required=True)


# --- routes -------------------------------------------------------------------------------


@blueprint.route("/oauth-tokens", methods=["GET"])
@require_admin
@blueprint.arguments(TokenHealthArgsSchema, location="query", as_kwargs=True)
@blueprint.response(200, TokenHealthSchema)
@document_errors(blueprint, 401, 403, 422)
def oauth_tokens(within_hours: int) -> dict[str, Any]:
    """Tokens by status and refresh figures of the last 24 h, in total and per provider."""
    return health_service.oauth_token_health(
        current_principal().organization_id, within_hours=within_hours
    )


@blueprint.route("/email-sync", methods=["GET"])
@require_admin
@blueprint.response(200, SyncHealthSchema)
@document_errors(blueprint, 401, 403)
def email_sync() -> dict[str, Any]:
    """Mail accounts by status and sync runs started in the last 24 h."""
    return health_service.email_sync_health(current_principal().organization_id)


@blueprint.route("/timeline", methods=["GET"])
@require_admin
@blueprint.arguments(TimelineArgsSchema, location="query", as_kwargs=True)
@blueprint.response(200, TimelineSchema)
@document_errors(blueprint, 401, 403, 422)
def timeline(hours: int) -> dict[str, Any]:
    """Refresh and sync outcomes per UTC hour, oldest first, ending with the current hour."""
    return health_service.timeline(current_principal().organization_id, hours=hours)
