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


@keys_cli.command("rotate")
@click.option("--dry-run", is_flag=True, help="Only count what would be re-encrypted.")
@click.option("--batch-size", type=click.IntRange(1, 10000), default=500, show_default=True)
@click.option(
    "--jobs", type=click.IntRange(1, 16), default=2, show_default=True, help="Parallel processes."
)
def rotate_command(dry_run: bool, batch_size: int, jobs: int) -> None:
    """Re-encrypt every ciphertext not under the current keys (batched, resumable)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from webapp.services.keys import (
        COLUMNS,
        TABLES,
        count_encrypted,
        count_stale,
        count_stale_rows,
        rotate_all,
    )

    totals = {spec.name: count_stale(spec) for spec in COLUMNS}
    already_current = sum(count_encrypted(spec) for spec in COLUMNS) - sum(totals.values())
    if dry_run:
        for name, total in totals.items():
            click.echo(f"{name}: {total} to re-encrypt")
        click.echo(
            f"dry run: {sum(totals.values())} would be re-encrypted, "
            f"{already_current} already current"
        )
        return
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeRemainingColumn(), console=Console(stderr=True)) as progress:
        bars = {
            table.model.__tablename__: progress.add_task(
                table.model.__tablename__, total=count_stale_rows(table)
            )
            for table in TABLES
        }
        report = rotate_all(batch_size, jobs, lambda name, rows: progress.advance(bars[name], rows))
    click.echo(
        f"rotated {report.rotated}, already current {already_current}, failed {report.failed_count}"
    )
    for name, ids in report.failed.items():
        click.echo(f"failed in {name}: ids {', '.join(map(str, ids))}")
    if report.failed_count:
        raise SystemExit(1)


@keys_cli.command("status")
def status_command() -> None:
    """How many ciphertexts each key fingerprint still protects, per column."""
    from rich.console import Console
    from rich.table import Table

    from webapp.services.keys import fingerprint_counts

    table = Table("column", "key fingerprint", "key", "rows")
    rows = fingerprint_counts()
    for column, fingerprint, role, count in rows:
        table.add_row(column, fingerprint, role, str(count))
    Console().print(table)
    if any(role != "current" for _c, _f, role, _n in rows):
        click.echo("Rows remain under old keys: run `flask keys rotate` before dropping them.")
    else:
        click.echo("Every ciphertext is under the current keys; *_PREVIOUS keys can be removed.")


def register_cli(app: Flask) -> None:
    app.cli.add_command(auth_cli)
    app.cli.add_command(keys_cli)
