"""Benchmark mailbox sync: bare imaplib vs Mailkey's initial and no-change sync.

A real Dovecot (tests/support/mailserver.py) with --messages messages (~1.5 KB) in INBOX,
XOAUTH2 checked against the local OAuth provider's introspection. The mailbox is connected
through Mailkey's real OAuth flow (login -> provider -> callback, Flask test client), then:

(a) bare imaplib: XOAUTH2 login, SELECT, UID SEARCH ALL, UID FETCH (RFC822) in batches of
    500 into memory, logout; run twice (cold, warm), the faster counts;
(b) Mailkey's initial sync: tasks.sync.sync_account.apply() in this process, inside the app
    context (the real task body, Celery's eager path, no worker), into PostgreSQL;
(c) the same task again with nothing changed.
Targets: a/b >= 0.33 (time ratio, bare over Mailkey) and (c) < 0.3 s.

    .venv/bin/python bench/sync.py [--messages 10000] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import imaplib
import ssl
import sys
import tempfile

from _common import (
    JWT_SECRET,
    Timer,
    bench_app,
    local_provider,
    phase_timers,
    provider_env,
    table,
    top_profile,
    verdict,
)
from sqlalchemy import delete, func, select

from tasks.sync import sync_account
from tests.support.flows import connect
from tests.support.mailserver import DovecotServer
from webapp.auth import issue_token
from webapp.extensions import db
from webapp.models import MailFolder, MailMessage

RATIO_TARGET = 0.33
NOCHANGE_TARGET = 0.3
ADDRESS = "bench-sync@example.com"
SCOPE = "openid email profile https://mail.google.com/"
MAILKEY_ITEMS = "(UID ENVELOPE FLAGS RFC822.SIZE BODY.PEEK[1]<0.512>)"  # as services/sync.py


def bare_fetch(
    imap: DovecotServer, access_token: str, batch: int, items: str = "(RFC822)"
) -> tuple[int, int]:
    """(messages, bytes) fetched with plain imaplib, unparsed."""
    context = ssl.create_default_context(cafile=str(imap.ca_file))
    conn = imaplib.IMAP4_SSL(imap.host, imap.imaps_port, ssl_context=context)
    auth = f"user={ADDRESS}\x01auth=Bearer {access_token}\x01\x01".encode()
    conn.authenticate("XOAUTH2", lambda _challenge: auth)
    conn.select("INBOX", readonly=True)
    uids = conn.uid("SEARCH", "ALL")[1][0].split()
    messages: list[bytes] = []
    for index in range(0, len(uids), batch):
        chunk = b",".join(uids[index : index + batch]).decode()
        _, data = conn.uid("FETCH", chunk, items)
        messages += [part[1] for part in data if isinstance(part, tuple)]
    conn.logout()
    return len(messages), sum(map(len, messages))


def timed_sync(account_id: int) -> tuple[float, dict]:
    with Timer() as t:
        result = sync_account.apply(args=[account_id]).get()
    return t.seconds, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=1500, help="bytes per message")
    parser.add_argument("--batch", type=int, default=500, help="bare UID FETCH batch")
    parser.add_argument("--profile", action="store_true", help="cProfile both syncs regardless")
    args = parser.parse_args()

    with (
        local_provider() as provider,
        tempfile.TemporaryDirectory(prefix="mailkey-bench-dovecot-") as workdir,
        DovecotServer(provider.url("introspect"), workdir=workdir) as imap,
    ):
        with Timer() as seeding:
            imap.seed(ADDRESS, "INBOX", args.messages, size=args.size)
        print(f"seeded {args.messages:,} messages of ~{args.size} bytes in {seeding.seconds:.1f} s")
        mail_env = {
            "MAIL_CA_FILE": str(imap.ca_file),
            "MAIL_ALLOWED_PORTS": f"993,143,465,587,25,{imap.imaps_port}",
            "GOOGLE_IMAP_HOST": imap.host,
            "GOOGLE_IMAP_PORT": str(imap.imaps_port),
        }
        extra = lambda _: {**provider_env(provider), **mail_env}  # noqa: E731
        with bench_app("sync", 11, extra) as (app, _env), app.app_context():
            headers = {"Authorization": f"Bearer {issue_token(JWT_SECRET, 1, 1)}"}
            response = connect(app.test_client(), headers, "google", provider, ADDRESS)
            assert response.status_code == 201, response.json
            account_id = response.json["account_id"]

            access = provider.issue_tokens_for(ADDRESS, scope=SCOPE)["access_token"]
            bare = []
            for _ in range(2):
                with Timer() as t:
                    fetched, size = bare_fetch(imap, access, args.batch)
                bare.append(t.seconds)
            with Timer() as same_items:
                bare_fetch(imap, access, args.batch, MAILKEY_ITEMS)
            initial, first = timed_sync(account_id)
            nochange, second = timed_sync(account_id)
            stored = db.session.scalar(select(func.count()).select_from(MailMessage))

            ratio = min(bare) / initial
            print(f"\nINBOX: {args.messages:,} messages; Mailkey ran sync_account.apply() here")
            table(
                ["run", "seconds", "messages/s", "result"],
                [
                    ["(a) bare imaplib RFC822, cold", bare[0], fetched / bare[0],
                     f"{fetched:,} msgs, {size / 2**20:.1f} MiB"],
                    ["(a) bare imaplib RFC822, warm", bare[1], fetched / bare[1], ""],
                    ["(a') bare imaplib, Mailkey's FETCH items", same_items.seconds,
                     fetched / same_items.seconds, "server cost of ENVELOPE etc., unparsed"],
                    ["(b) Mailkey initial sync", initial, args.messages / initial,
                     f"{first['outcome']}, new {first['new']:,}, stored {stored:,}"],
                    ["(c) Mailkey sync, nothing changed", nochange, "",
                     f"{second['outcome']}, new {second['new']}, updated "
                     f"{second['updated']}, deleted {second['deleted']}"],
                ],
            )  # fmt: skip
            print(f"ratio a/b = {ratio:.2f} (target >= {RATIO_TARGET}); (c) target < 0.3 s")
            verdict("initial sync vs bare fetch", ratio >= RATIO_TARGET)
            verdict("no-change sync", nochange < NOCHANGE_TARGET and second["new"] == 0)

            if args.profile or ratio < RATIO_TARGET or nochange >= NOCHANGE_TARGET:
                profile_syncs(account_id)
    return 0


def profile_syncs(account_id: int) -> None:
    """Forget the folders (cascading to messages), then time an initial and a no-change
    sync per phase (plain timers, no profiler), then cProfile the initial one."""
    import imapclient.imapclient as imapclient_module
    from imapclient import IMAPClient
    from sqlalchemy.orm import Session

    from webapp.services import mailconn
    from webapp.services import sync as service

    targets = [
        (mailconn, "tls_context", "mailconn.tls_context()"),
        (mailconn, "_imap_login", "mailconn._imap_login (connect, TLS, XOAUTH2)"),
        (IMAPClient, "list_folders", "IMAPClient.list_folders"),
        (IMAPClient, "select_folder", "IMAPClient.select_folder"),
        (IMAPClient, "search", "IMAPClient.search"),
        (IMAPClient, "fetch", "IMAPClient.fetch (server, I/O and parsing)"),
        (imapclient_module, "parse_fetch_response", "  of which parse_fetch_response"),
        (service, "_message_row", "sync._message_row (decode, snippet)"),
        (service, "encrypt_field", "  of which encrypt_field (Fernet)"),
        (service, "_insert", "sync._insert (INSERT ... ON CONFLICT)"),
        (Session, "commit", "Session.commit"),
    ]
    for label in ("initial", "no-change"):
        if label == "initial":
            db.session.execute(delete(MailFolder).where(MailFolder.account_id == account_id))
            db.session.commit()
        with phase_timers(targets) as totals:
            seconds, _ = timed_sync(account_id)
        print(f"\nphases of the {label} sync ({seconds:.2f} s in all):")
        rows = [[name, int(calls), spent] for name, (calls, spent) in totals.items() if calls]
        table(["phase", "calls", "seconds"], rows)
    db.session.execute(delete(MailFolder).where(MailFolder.account_id == account_id))
    db.session.commit()
    profile = cProfile.Profile()
    seconds, _ = profile.runcall(timed_sync, account_id)
    print(f"\ncProfile of the initial sync ({seconds:.2f} s under the profiler), own time:")
    top_profile(profile, 15, "tottime")


if __name__ == "__main__":
    sys.exit(main())
