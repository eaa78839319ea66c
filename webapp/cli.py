"""Flask CLI commands: `flask auth ...`, `flask keys ...`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

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


def _needs_database(command: Callable[..., None]) -> Callable[..., None]:
    """The database (PostgreSQL down, a wrong DATABASE_URL) answers in one line naming
    where, without its password, and exit 1 instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from webapp.cli_support import UNAVAILABLE, unavailable_message

        try:
            command(*args, **kwargs)
        except UNAVAILABLE as exc:
            click.echo(f"error: {unavailable_message(exc)}", err=True)
            raise SystemExit(1) from None

    return wrapper


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
@_needs_database
def rotate_command(dry_run: bool, batch_size: int, jobs: int) -> None:
    """Re-encrypt every ciphertext not under the current keys (batched, resumable).

    Exits 1 when a ciphertext could not be decrypted (its ids are listed) or rows are
    still under an old key at the end; 130 when interrupted (rerun it to finish)."""
    from webapp.services.keys import (
        COLUMNS,
        TABLES,
        count_encrypted,
        count_stale,
        count_stale_rows,
        fingerprint_counts,
        rotate_all,
    )

    totals = {spec.name: count_stale(spec) for spec in COLUMNS}
    already_current = sum(count_encrypted(spec) for spec in COLUMNS) - sum(totals.values())
    if dry_run:
        unknown: dict[str, int] = {}
        for column, _fp, role, count in fingerprint_counts():
            if role == "unknown":
                unknown[column] = unknown.get(column, 0) + count
        for name, total in totals.items():
            note = f" ({unknown[name]} under no configured key)" if unknown.get(name) else ""
            click.echo(f"{name}: {total} to re-encrypt{note}")
        click.echo(
            f"dry run: {sum(totals.values())} would be re-encrypted, "
            f"{already_current} already current; nothing was written"
        )
        return
    progress = _RotationProgress(
        {table.model.__tablename__: count_stale_rows(table) for table in TABLES}
    )
    try:
        with progress:
            report = rotate_all(batch_size, jobs, progress.advance)
    except KeyboardInterrupt:
        click.echo(
            "interrupted: every finished batch is committed, none half-written; "
            "run `flask keys rotate` again to finish",
            err=True,
        )
        raise SystemExit(130) from None
    click.echo(
        f"rotated {report.rotated}, already current {already_current}, "
        f"failed {report.failed_count}, remaining {report.remaining}"
    )
    for name, ids in report.failed.items():
        listed = ", ".join(map(str, sorted(ids)))
        click.echo(f"failed in {name} (cannot be decrypted): ids {listed}")
    if report.remaining:
        click.echo(
            f"{report.remaining} ciphertexts were written under an old key during the rotation "
            "(a process still running with the old keys?): restart every process with the "
            "new keys and run `flask keys rotate` again"
        )
    if report.failed_count or report.remaining:
        raise SystemExit(1)


class _RotationProgress:
    """Progress bars on a terminal; plain lines (at most every few seconds) otherwise,
    so a rotation run from a script, a pipe or a job log still shows it advancing."""

    INTERVAL = 5.0

    def __init__(self, totals: dict[str, int]) -> None:
        import sys

        self.totals = totals
        self.done = dict.fromkeys(totals, 0)
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.bars: Any = None

    def __enter__(self) -> _RotationProgress:
        import time

        self.last = time.monotonic()
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            columns = ("[progress.description]{task.description}", BarColumn())
            self.bars = Progress(
                *columns, MofNCompleteColumn(), TimeRemainingColumn(), console=Console(stderr=True)
            )
            self.bars.__enter__()
            self.ids = {name: self.bars.add_task(name, total=n) for name, n in self.totals.items()}
        return self

    def advance(self, name: str, rows: int) -> None:
        import time

        self.done[name] += rows
        if self.bars is not None:
            self.bars.advance(self.ids[name], rows)
        elif time.monotonic() - self.last >= self.INTERVAL:
            self.last = time.monotonic()
            self._print()

    def _print(self) -> None:
        parts = [f"{name} {self.done[name]}/{n}" for name, n in self.totals.items() if n]
        click.echo("rotating: " + (", ".join(parts) or "nothing under an old key"), err=True)

    def __exit__(self, *exc: object) -> None:
        if self.bars is not None:
            self.bars.__exit__(*exc)
        elif exc[0] is None:
            self._print()


@keys_cli.command("status")
@_needs_database
def status_command() -> None:
    """How many ciphertexts each key fingerprint still protects, and which keys can go."""
    from rich.console import Console
    from rich.table import Table

    from webapp.crypto import EncryptionKeys, get_keyring
    from webapp.services.keys import fingerprint_counts

    table = Table("column", "key fingerprint", "key", "rows")
    rows = fingerprint_counts()
    for column, fingerprint, role, count in rows:
        table.add_row(column, fingerprint, role, str(count))
    Console().print(table)
    keyring = get_keyring()
    under: dict[str, int] = {}
    for _column, fingerprint, _role, count in rows:
        under[fingerprint] = under.get(fingerprint, 0) + count
    current = {keyring.current_fingerprint(kid) for kid in EncryptionKeys}
    previous = {
        fp: keyring.name_of(fp) or "?"
        for kid in EncryptionKeys
        for fp in keyring.fingerprints(kid)[1:]
        if fp not in current
    }
    for fp, name in sorted(previous.items(), key=lambda item: item[1]):
        if under.get(fp):
            verdict = f"still protects {under[fp]} ciphertexts: run `flask keys rotate`"
        else:
            verdict = "protects nothing: can be removed"
        click.echo(f"{name} (key {fp}): {verdict}")
    unknown = sum(count for _c, _f, role, count in rows if role == "unknown")
    if unknown:
        click.echo(
            f"{unknown} ciphertexts are under keys no variable holds: they cannot be decrypted "
            "(add the old key to *_PREVIOUS, or the owners must reconnect)."
        )
    if any(role != "current" for _c, _f, role, _n in rows):
        click.echo("Rows remain under old keys: run `flask keys rotate` before dropping them.")
    else:
        click.echo(
            "Every ciphertext is under the current keys; *_PREVIOUS keys can be removed "
            "(once every process runs with the current keys)."
        )


def register_cli(app: Flask) -> None:
    app.cli.add_command(auth_cli)
    app.cli.add_command(keys_cli)
