"""Liveness and readiness probes; no token needed."""

from __future__ import annotations

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy import text

from webapp.errors import error_response
from webapp.extensions import db, redis_store

blueprint = Blueprint("probes", __name__)


@blueprint.get("/healthz")
def healthz() -> ResponseReturnValue:
    """The process is alive; no I/O."""
    return jsonify({"status": "ok"})


@blueprint.get("/readyz")
def readyz() -> ResponseReturnValue:
    failed: dict[str, str] = {}
    try:
        db.session.execute(text("SELECT 1"))
    except Exception as exc:
        failed["database"] = type(exc).__name__
    finally:
        db.session.remove()
    try:
        redis_store.client.ping()
    except Exception as exc:
        failed["redis"] = type(exc).__name__
    if failed:
        names = ", ".join(sorted(failed))
        return error_response(
            503, "not_ready", f"not ready: {names} unavailable", extra={"checks": failed}
        )
    return jsonify({"status": "ready", "checks": {"database": "ok", "redis": "ok"}})
