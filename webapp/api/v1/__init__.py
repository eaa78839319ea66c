"""Blueprints of /api/v1, registered in this order."""

from webapp.api.v1.accounts import blueprint as accounts
from webapp.api.v1.health import blueprint as health
from webapp.api.v1.meta import blueprint as meta
from webapp.api.v1.oauth import blueprint as oauth

BLUEPRINTS = [meta, oauth, accounts, health]
