"""The built-in web console: server-rendered page shells under /console/.

The pages hold no data: their JavaScript (webapp/static/console/) fetches it from
/api/v1 with the JWT kept in the tab's sessionStorage. The shells carry only
non-secret facts as data attributes (configured providers, development mode), so
the strict CSP below needs no inline script or style.

`CONSOLE_ENABLED=false` registers nothing: /console/* and the `/` redirect are 404.
The development token endpoint exists only outside production.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue

from webapp.auth import issue_token
from webapp.errors import BadRequest, NotFound, ValidationFailed

STATIC = Path(__file__).resolve().parent / "static" / "console"
CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
DEV_TOKEN_TTL_SECONDS = 4 * 3600
MAX_ID = 10**18 - 1  # the JWT's sub/org are at most 18 digits
PROVIDER_LABELS = {"google": "Google", "microsoft": "Microsoft", "yahoo": "Yahoo"}

blueprint = Blueprint(
    "console",
    __name__,
    url_prefix="/console",
    static_folder=str(STATIC),
    static_url_path="/static",
)
dev_blueprint = Blueprint("console_dev", __name__, url_prefix="/console/dev")
root_blueprint = Blueprint("console_root", __name__)


def init_console(app: Flask) -> None:
    """Register the console when CONSOLE_ENABLED; its dev token endpoint outside production."""
    if not app.config["CONSOLE_ENABLED"]:
        return
    app.register_blueprint(blueprint)
    app.register_blueprint(root_blueprint)
    if app.config["MAILKEY_ENV"] != "production":
        app.register_blueprint(dev_blueprint)


@blueprint.after_request
def _console_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONSOLE_CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    if response.mimetype == "text/html":
        response.headers["Cache-Control"] = "no-store"
    return response


def _development() -> bool:
    return current_app.config["MAILKEY_ENV"] != "production"


def _providers() -> list[dict[str, str]]:
    return [
        {"name": name, "label": PROVIDER_LABELS.get(name, name.title())}
        for name, provider in current_app.config["PROVIDERS"].items()
        if provider.configured
    ]


def _page(template: str, page: str, **context: Any) -> Response:
    html = render_template(f"console/{template}", page=page, development=_development(), **context)
    return Response(html, mimetype="text/html")


@root_blueprint.get("/")
def root() -> ResponseReturnValue:
    return redirect(url_for("console.mailboxes"), code=302)


@blueprint.get("/")
def mailboxes() -> Response:
    return _page("mailboxes.html", "mailboxes", providers=_providers())


@blueprint.get("/signin")
def signin() -> Response:
    return _page("signin.html", "signin")


@blueprint.get("/messages")
def messages() -> Response:
    return _page("messages.html", "messages")


@blueprint.get("/health")
def health() -> Response:
    return _page("health.html", "health")


@blueprint.get("/oauth/complete")
@blueprint.get("/oauth/complete/<provider>")
def oauth_complete(provider: str | None = None) -> Response:
    """OAUTH_REDIRECT_URI target: its script forwards code/state (or error) to the callback."""
    if provider is not None and provider not in current_app.config["PROVIDERS"]:
        raise NotFound("no such provider")
    return _page("complete.html", "complete", provider=provider or "")


@blueprint.get("/providers")
def providers() -> ResponseReturnValue:
    """The configured providers (names and labels only), for scripts that want them."""
    return jsonify({"items": _providers()})


def _id_field(body: dict[str, Any], name: str, errors: dict[str, list[str]]) -> int:
    value = body.get(name, 1)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        errors[name] = ["must be a whole number of at most 18 digits"]
        return 0
    return value


@dev_blueprint.post("/token")
def dev_token() -> ResponseReturnValue:
    """Development only: mint a console JWT for any user, organization and admin flag.

    JSON only, so a cross-site form cannot call it; the token travels only in this
    response body.
    """
    body = _json_body()
    errors: dict[str, list[str]] = {}
    user_id = _id_field(body, "user_id", errors)
    organization_id = _id_field(body, "organization_id", errors)
    admin = body.get("admin", False)
    if not isinstance(admin, bool):
        errors["admin"] = ["must be true or false"]
    if errors:
        raise ValidationFailed(fields=errors)
    token = issue_token(
        current_app.config["API_JWT_SECRET"],
        user_id,
        organization_id,
        admin=admin,
        ttl=DEV_TOKEN_TTL_SECONDS,
    )
    response = jsonify({"token": token, "expires_in": DEV_TOKEN_TTL_SECONDS})
    response.headers["Cache-Control"] = "no-store"
    return response


def _json_body() -> dict[str, Any]:
    if not request.is_json:
        raise BadRequest("send a JSON body (Content-Type: application/json)")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body
