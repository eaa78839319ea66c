"""Swagger UI served from the swagger-ui-bundle package: works with no internet."""

from __future__ import annotations

from pathlib import Path

import swagger_ui_bundle
from flask import Blueprint, Response, render_template, send_from_directory

blueprint = Blueprint("docs", __name__, url_prefix="/api/v1/docs")
ASSETS = Path(swagger_ui_bundle.swagger_ui_path)
STATIC = Path(__file__).resolve().parent.parent / "static" / "docs"
# Swagger UI sets inline styles on its own elements; scripts stay same-origin only.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self'; frame-ancestors 'none'"
)


def _with_csp(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = DOCS_CSP
    return response


@blueprint.get("")
@blueprint.get("/")
def index() -> Response:
    return _with_csp(Response(render_template("docs.html"), mimetype="text/html"))


@blueprint.get("/swagger-initializer.js")
def initializer() -> Response:
    return _with_csp(send_from_directory(STATIC, "swagger-initializer.js"))


@blueprint.get("/assets/<path:filename>")
def assets(filename: str) -> Response:
    return _with_csp(send_from_directory(ASSETS, filename, max_age=3600))
