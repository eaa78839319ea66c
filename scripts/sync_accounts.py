"""Operator CLI: sync mail accounts now, in-process or on the workers.

    python scripts/sync_accounts.py --account-id N [--dry-run] [--enqueue] [--json]
    python scripts/sync_accounts.py --user-id N [--org-id N] [--dry-run] [--enqueue] [--json]
    python scripts/sync_accounts.py --all [--dry-run] [--enqueue] [--json]

`--all` takes every account with sync enabled that is not paused (paused accounts
wait for their owner to reconnect). Exit status: 0 when every sync succeeded, 1
when any failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rich.table import Table
from sqlalchemy import select

from webapp.cli_support import (
    FAILED,
    OK,
    UNAVAILABLE,
    Outcome,
    describe,
    positive_int,
    print_json,
    run_in_app,
    stdout_console,
    work_or_enqueue,
)
from webapp.extensions import db
from webapp.models import MailAccount
from webapp.services import sync as sync_service

log = logging.getLogger("mailkey.cli.sync")
SYNC_TASK = "tasks.sync.sync_account"
OUTCOMES = ("synced", "skipped", "failed")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Sync Mailkey mail accounts now.",
        epilog="Exit status: 0 all succeeded, 1 something failed, 2 bad usage.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--account-id", type=positive_int, metavar="N", help="one account")
    which.add_argument("--user-id", type=positive_int, metavar="N", help="a user's accounts")
    which.add_argument("--all", action="store_true", help="every enabled, unpaused account")
    parser.add_argument("--org-id", type=positive_int, metavar="N", help="with --user-id")
    parser.add_argument("--dry-run", action="store_true", help="show what would be synced")
    parser.add_argument("--enqueue", action="store_true", help="send to the Celery workers")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    if args.org_id is not None and args.user_id is None:
        parser.error("--org-id only applies to --user-id")
    if args.dry_run and args.enqueue:
        parser.error("--dry-run and --enqueue exclude each other")
    return args


def select_accounts(args: argparse.Namespace) -> list[MailAccount]:
    query = select(MailAccount).order_by(MailAccount.id)
    if args.account_id is not None:
        query = query.where(MailAccount.id == args.account_id)
    elif args.user_id is not None:
        query = query.where(MailAccount.user_id == args.user_id)
        if args.org_id is not None:
            query = query.where(MailAccount.organization_id == args.org_id)
    else:
        query = query.where(MailAccount.sync_enabled.is_(True), MailAccount.status != "paused")
    return list(db.session.scalars(query))


def show(accounts: list[MailAccount], as_json: bool) -> None:
    if as_json:
        print_json(
            [{"id": a.id, "email_address": a.email_address, "status": a.status} for a in accounts]
        )
        return
    table = Table("id", "organization", "user", "address", "status", "last synced", "last error")
    for account in accounts:
        table.add_row(
            str(account.id),
            str(account.organization_id),
            str(account.user_id),
            account.email_address,
            account.status,
            account.last_synced_at.isoformat(timespec="seconds") if account.last_synced_at else "-",
            account.last_error or "",
        )
    console = stdout_console()
    console.print(f"{len(accounts)} accounts would be synced")
    console.print(table)


def sync_one(account_id: int) -> Outcome:
    try:
        run = sync_service.sync_account(account_id)
    except sync_service.SyncBusy:
        return Outcome(account_id, "skipped", "another sync of this account is running")
    except UNAVAILABLE:
        raise  # the database or Redis is down: every other account would fail too
    except Exception as exc:
        db.session.rollback()
        return Outcome(account_id, "failed", describe(exc))
    if run.outcome != "succeeded":
        return Outcome(account_id, "failed", run.error)
    return Outcome(account_id, "synced")


def run(args: argparse.Namespace) -> int:
    accounts = select_accounts(args)
    if args.account_id is not None and not accounts:
        print(f"error: no account with id {args.account_id}", file=sys.stderr)
        return FAILED
    if args.dry_run:
        show(accounts, args.json)
        return OK
    return work_or_enqueue(
        {account.id: account.email_address for account in accounts},
        enqueue_task=SYNC_TASK if args.enqueue else None,
        work=sync_one,
        label="Syncing",
        keys=OUTCOMES,
        as_json=args.json,
        noun="account",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_in_app(lambda: run(args), needs_redis=not args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
