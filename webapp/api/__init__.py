"""The /api/v1 API: flask-smorest, with errors in Mailkey's envelope."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import marshmallow as ma
from flask import Flask, Response
from flask_smorest import Api
from werkzeug.exceptions import HTTPException
from werkzeug.routing import BaseConverter, ValidationError

from webapp.errors import http_exception_response


class ErrorBodySchema(ma.Schema):
    code = ma.fields.String(required=True)
    message = ma.fields.String(required=True)
    field_errors = ma.fields.Dict(data_key="fields")
    reason = ma.fields.String()
    request_id = ma.fields.String()


class ErrorSchema(ma.Schema):
    error = ma.fields.Nested(ErrorBodySchema, required=True)


class IdConverter(BaseConverter):
    """Path ids: positive integers that fit the id columns; anything else is a 404."""

    regex = r"[0-9]{1,10}"
    MAX = 2**31 - 1

    def to_python(self, value: str) -> int:
        number = int(value)
        if not 1 <= number <= self.MAX:
            raise ValidationError()
        return number

    def to_url(self, value: Any) -> str:
        return str(value)


class MailkeyApi(Api):
    """flask-smorest's Api, answering errors in the one envelope (DESIGN.md)."""

    ERROR_SCHEMA = ErrorSchema

    def handle_http_exception(self, error: HTTPException) -> Response:  # type: ignore[override]
        return http_exception_response(error)


api = MailkeyApi(
    spec_kwargs={
        "info": {
            "description": "Connect mailboxes with OAuth2, keep tokens fresh, sync and send mail."
        },
    }
)


def document_errors(blueprint: Any, *codes: int) -> Any:
    """Document error answers in OpenAPI, each with the error envelope schema."""

    def decorate(view: Any) -> Any:
        for code in codes:
            view = blueprint.alt_response(code, response=HTTPStatus(code).name)(view)
        return view

    return decorate


def register_api_blueprints(app: Flask) -> None:
    from webapp.api.v1 import BLUEPRINTS

    app.url_map.converters["id"] = IdConverter
    api.register_converter(
        IdConverter, lambda _c: {"type": "integer", "minimum": 1, "maximum": IdConverter.MAX}
    )

    api.spec.components.security_scheme(
        "bearerAuth", {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    )
    for blueprint in BLUEPRINTS:
        api.register_blueprint(blueprint)
    from webapp.api.docs import blueprint as docs

    app.register_blueprint(docs)


def api_config() -> dict[str, Any]:
    return {
        "API_TITLE": "Mailkey",
        "API_VERSION": "v1",
        "OPENAPI_VERSION": "3.0.3",
        "OPENAPI_URL_PREFIX": "/api/v1",
        "OPENAPI_JSON_PATH": "openapi.json",
        "API_SPEC_OPTIONS": {"security": [{"bearerAuth": []}]},
    }
