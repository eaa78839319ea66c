"""Who am I: the simplest way for an integrator to check a token."""

from __future__ import annotations

from typing import Any

from flask_smorest import Blueprint

from webapp.api import document_errors
from webapp.auth import current_principal, require_auth
from webapp.schemas import MeSchema

blueprint = Blueprint("meta", __name__, url_prefix="/api/v1", description="The caller")


@blueprint.get("/me")
@blueprint.response(200, MeSchema)
@document_errors(blueprint, 401)
@require_auth
def me() -> dict[str, Any]:
    principal = current_principal()
    return {
        "user_id": principal.user_id,
        "organization_id": principal.organization_id,
        "roles": list(principal.roles),
    }
