"""API authentication: HS256 bearer JWTs carrying (organization, user) and roles."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import jwt
from flask import current_app, request

from webapp.errors import Forbidden, Unauthorized

F = TypeVar("F", bound=Callable[..., Any])
DIGITS = re.compile(r"^[0-9]{1,18}$")
PRINCIPAL_KEY = "mailkey.principal"


@dataclass(frozen=True)
class Principal:
    user_id: int
    organization_id: int
    roles: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    @property
    def owner(self) -> tuple[int, int]:
        return (self.organization_id, self.user_id)


def issue_token(
    secret: str, user_id: int, organization_id: int, *, admin: bool = False, ttl: int = 3600
) -> str:
    now = datetime.now(UTC)
    claims: dict[str, Any] = {
        "sub": str(user_id),
        "org": str(organization_id),
        "iat": now,
        "exp": now + timedelta(seconds=ttl),
    }
    if admin:
        claims["roles"] = ["admin"]
    return jwt.encode(claims, secret, algorithm="HS256")


def decode_token(secret: str, token: str) -> Principal:
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            options={"require": ["exp", "sub", "org"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("the bearer token has expired") from exc
    except jwt.InvalidTokenError as exc:
        raise Unauthorized("the bearer token is invalid") from exc
    sub, org, roles = claims.get("sub"), claims.get("org"), claims.get("roles", [])
    if not (isinstance(sub, str) and DIGITS.match(sub)):
        raise Unauthorized("the bearer token's sub must be a string of digits")
    if not (isinstance(org, str) and DIGITS.match(org)):
        raise Unauthorized("the bearer token's org must be a string of digits")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise Unauthorized("the bearer token's roles must be a list of strings")
    return Principal(user_id=int(sub), organization_id=int(org), roles=tuple(roles))


def authenticate() -> Principal:
    """Read and check the request's bearer token; cached on the request itself."""
    principal = request.environ.get(PRINCIPAL_KEY)
    if principal is not None:
        return principal
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token")
    principal = decode_token(current_app.config["API_JWT_SECRET"], token.strip())
    request.environ[PRINCIPAL_KEY] = principal
    return principal


def current_principal() -> Principal:
    return authenticate()


def require_auth(view: F) -> F:
    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        authenticate()
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def require_admin(view: F) -> F:
    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not authenticate().is_admin:
            raise Forbidden()
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
