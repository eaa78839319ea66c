"""Operator CLI: list OAuth mailbox tokens and refresh them in bulk.

    python scripts/refresh_oauth_tokens.py --list [--status S] [--provider P] [--json]
    python scripts/refresh_oauth_tokens.py --refresh-all [--days N] [--provider P]
        [--status S] [--dry-run] [--enqueue] [--json]
    python scripts/refresh_oauth_tokens.py --token-id N [--dry-run] [--enqueue] [--json]

Runs against the configured database (the same environment as the web and worker
processes) and calls the same token service they do. Exit status: 0 when everything
succeeded, 1 when anything failed (needs re-auth included), 2 on bad usage. Only
the requested output goes to stdout; logs and the progress bar go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta

from rich.table import Table
from sqlalchemy import select

from webapp.api.v1.schemas_tokens import TokenSchema
from webapp.cli_support import (
    FAILED,
    OK,
    UNAVAILABLE,
    Outcome,
    describe,
    non_negative_int,
    positive_int,
    print_json,
    run_in_app,
    stdout_console,
    work_or_enqueue,
)
from webapp.errors import MailkeyError, NeedsReauth, TokenRevoked
from webapp.extensions import db
from webapp.models import TOKEN_STATUSES_REPORTED, UserEmailToken, utcnow
from webapp.providers import PROVIDER_NAMES
from webapp.services.tokens import refresh_token, status_filter

log = logging.getLogger("mailkey.cli.refresh")

REFRESH_TASK = "tasks.refresh.refresh_token"
OUTCOMES = ("refreshed", "skipped", "failed", "needs_reauth")
LABELS = {"needs_reauth": "needs re-auth"}
DEFAULT_DAYS = 7


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="List Mailkey OAuth tokens and refresh them.",
        epilog="Exit status: 0 all succeeded, 1 something failed or needs re-auth, 2 bad usage.",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--list", action="store_true", help="list tokens")
    action.add_argument(
        "--refresh-all",
        action="store_true",
        help="refresh active tokens (expired included) expiring within --days",
    )
    action.add_argument(
        "--token-id", type=positive_int, metavar="N", help="refresh one token, whatever its expiry"
    )
    parser.add_argument("--provider", choices=PROVIDER_NAMES, help="only this provider's tokens")
    parser.add_argument("--status", choices=TOKEN_STATUSES_REPORTED, help="only this status")
    parser.add_argument(
        "--days",
        type=non_negative_int,
        metavar="N",
        help=f"with --refresh-all: expiring within N days (default {DEFAULT_DAYS})",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="show what would be refreshed; change nothing"
    )
    parser.add_argument(
        "--enqueue", action="store_true", help="send the refreshes to the Celery workers"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.days is not None and not args.refresh_all:
        parser.error("--days only applies to --refresh-all")
    if args.list and (args.dry_run or args.enqueue):
        parser.error("--dry-run and --enqueue do not apply to --list")
    if args.token_id is not None and (args.provider or args.status):
        parser.error("--provider and --status do not apply to --token-id")
    if args.days is None:
        args.days = DEFAULT_DAYS
    return args


# --- selection and display ---------------------------------------------------------------


def select_tokens(args: argparse.Namespace, now: datetime) -> list[UserEmailToken]:
    query = select(UserEmailToken)
    if args.token_id is not None:
        query = query.where(UserEmailToken.id == args.token_id)
    if args.provider:
        query = query.where(UserEmailToken.provider == args.provider)
    if args.status:
        query = query.where(status_filter(args.status, now))
    elif args.refresh_all:
        query = query.where(UserEmailToken.status == "active")
    if args.refresh_all:
        query = query.where(UserEmailToken.expires_at <= now + timedelta(days=args.days))
        query = query.order_by(UserEmailToken.expires_at, UserEmailToken.id)
    else:
        query = query.order_by(UserEmailToken.id)
    return list(db.session.scalars(query))


def humanize(delta: timedelta) -> str:
    seconds = abs(int(delta.total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def expires_in(token: UserEmailToken, now: datetime) -> str:
    if token.expires_at is None:
        return "-"
    delta = token.expires_at - now
    return (
        f"in {humanize(delta)}" if delta.total_seconds() > 0 else f"expired {humanize(delta)} ago"
    )


def print_table(tokens: list[UserEmailToken], now: datetime, title: str) -> None:
    table = Table()
    for name in ("id", "organization", "user", "provider", "address", "status"):
        table.add_column(name, no_wrap=True, justify="right" if name == "id" else "left")
    table.add_column("expires in", no_wrap=True)
    table.add_column("last refresh", no_wrap=True)
    table.add_column("last error", overflow="fold")
    for token in tokens:
        last = f"{humanize(now - token.last_refreshed_at)} ago" if token.last_refreshed_at else "-"
        table.add_row(
            str(token.id),
            str(token.organization_id),
            str(token.user_id),
            token.provider,
            token.email_address,
            token.derived_status(now),
            expires_in(token, now),
            last,
            token.last_refresh_error or "",
        )
    console = stdout_console()
    console.print(title)
    console.print(table)


def show_tokens(tokens: list[UserEmailToken], now: datetime, args: argparse.Namespace) -> None:
    if args.json:
        print_json(TokenSchema().dump(tokens, many=True))
        return
    noun = "token" if len(tokens) == 1 else "tokens"
    title = f"{len(tokens)} {noun}" + (" would be refreshed" if args.dry_run else "")
    print_table(tokens, now, title)


# --- refreshing --------------------------------------------------------------------------


def refresh_one(token_id: int) -> Outcome:
    try:
        result = refresh_token(token_id, trigger="cli", force=True)
    except (NeedsReauth, TokenRevoked) as exc:
        return Outcome(token_id, "needs_reauth", describe(exc))
    except UNAVAILABLE:
        raise  # the database or Redis is down: every other token would fail too
    except Exception as exc:
        db.session.rollback()
        if not isinstance(exc, MailkeyError):
            log.exception("cli_refresh_crashed", extra={"event": "cli_refresh_crashed"})
        return Outcome(token_id, "failed", describe(exc))
    return Outcome(token_id, "refreshed" if result.refreshed else "skipped")


def run(args: argparse.Namespace) -> int:
    now = utcnow()
    tokens = select_tokens(args, now)
    if args.token_id is not None and not tokens:
        print(f"error: no token with id {args.token_id}", file=sys.stderr)
        return FAILED
    if args.list or args.dry_run:
        show_tokens(tokens, now, args)
        return OK
    return work_or_enqueue(
        {token.id: token.email_address for token in tokens},
        enqueue_task=REFRESH_TASK if args.enqueue else None,
        # Forced, and queued now: a task redelivered after its worker died skips a token
        # it already refreshed.
        enqueue_args=(True, now.isoformat()),
        work=refresh_one,
        label="Refreshing",
        keys=OUTCOMES,
        as_json=args.json,
        noun="token",
        labels=LABELS,
        failing=("failed", "needs_reauth"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Listing reads the database only; refreshing takes Redis locks, enqueueing its broker.
    return run_in_app(lambda: run(args), needs_redis=not (args.list or args.dry_run))


if __name__ == "__main__":
    sys.exit(main())
