"""Flask CLI commands: `flask auth ...`, `flask keys ...`."""

from __future__ import annotations

import click
from flask import Flask, current_app
from flask.cli import AppGroup

from webapp.auth import issue_token

auth_cli = AppGroup("auth", help="API tokens.")
keys_cli = AppGroup("keys", help="Encryption keys: generate, rotate, status.")


@auth_cli.command("issue-token")
@click.option("--user-id", type=click.IntRange(min=0), required=True)
@click.option("--org-id", type=click.IntRange(min=0), required=True)
@click.option("--admin", is_flag=True, help="Add the admin role.")
@click.option("--ttl", type=click.IntRange(min=1), default=3600, show_default=True)
def issue_token_command(user_id: int, org_id: int, admin: bool, ttl: int) -> None:
    """Print a signed API token (and nothing else) on stdout."""
    click.echo(
        issue_token(current_app.config["API_JWT_SECRET"], user_id, org_id, admin=admin, ttl=ttl)
    )


@keys_cli.command("generate")
def generate_command() -> None:
    """Print a fresh set of keys as NAME=value lines (the spec's formats)."""
    from webapp.crypto import generate_keys

    for name, value in generate_keys().items():
        click.echo(f"{name}={value}")


def register_cli(app: Flask) -> None:
    app.cli.add_command(auth_cli)
    app.cli.add_command(keys_cli)
