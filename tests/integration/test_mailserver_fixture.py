"""Tests for the real mail-server fixtures in tests/support/mailserver.py."""

from __future__ import annotations

import base64
import json
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import IN_CI
from tests.support.mailserver import DovecotServer, SmtpServer, group_pids, make_ca_and_cert

# Skipped loudly on a developer machine without Dovecot; in CI (CI=true) it runs and fails.
pytestmark = pytest.mark.skipif(
    not (os.path.exists("/usr/sbin/dovecot") and shutil.which("doveadm")) and not IN_CI,
    reason="SERVICE MISSING: dovecot not installed (apt-get install dovecot-imapd)",
)

imapclient = pytest.importorskip("imapclient")
pytest.importorskip("aiosmtpd")
from imapclient import IMAPClient  # noqa: E402
from imapclient.exceptions import LoginError  # noqa: E402

PW_USER = "pwuser@example.com"
PW_PASS = "s3cret-pass"


# --------------------------------------------------------------------------- stand-in IdP


class FakeIntrospection:
    """Tiny RFC 7662 endpoint: ``POST /introspect`` with ``token=...``."""

    def __init__(self) -> None:
        self.tokens: dict[str, dict] = {}
        self.requests: list[dict[str, str]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                token = form.get("token", [""])[0]
                with outer._lock:
                    outer.requests.append({k: v[0] for k, v in form.items()})
                    claims = outer.tokens.get(token)
                body = json.dumps(
                    {"active": True, "token_type": "Bearer", **claims}
                    if claims
                    else {"active": False}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/introspect"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def issue(self, email: str, scope: str = "https://mail.google.com/") -> str:
        token = f"tok-{os.urandom(8).hex()}"
        with self._lock:
            self.tokens[token] = {"email": email, "scope": scope, "exp": int(time.time()) + 3600}
        return token

    def revoke(self, token: str) -> None:
        with self._lock:
            self.tokens.pop(token, None)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def idp() -> Iterator[FakeIntrospection]:
    server = FakeIntrospection()
    yield server
    server.close()


@pytest.fixture(scope="module")
def dovecot(idp: FakeIntrospection, tmp_path_factory: pytest.TempPathFactory):
    # tmp_path_factory dirs live under a 0700 dir: exercises the mail_root fallback.
    server = DovecotServer(
        introspection_url=idp.url,
        password_users={PW_USER: PW_PASS},
        workdir=tmp_path_factory.mktemp("dovecot"),
    )
    with server:
        yield server


def _user(tag: str) -> str:
    return f"{tag}-{os.urandom(3).hex()}@example.com"


def _imaps(server: DovecotServer, host: str | None = None) -> IMAPClient:
    ctx = ssl.create_default_context(cafile=str(server.ca_file))
    return IMAPClient(host or server.host, port=server.imaps_port, ssl=True, ssl_context=ctx)


# --------------------------------------------------------------------------- certificates


def test_make_ca_and_cert_verifies_with_hostname_checking(tmp_path) -> None:
    ca, cert, key = make_ca_and_cert(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(ca))
    assert client_ctx.check_hostname
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        port = lsock.getsockname()[1]

        def serve() -> None:
            conn, _ = lsock.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"hi")

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with socket.create_connection(("127.0.0.1", port)) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.recv(2) == b"hi"
        t.join(5)


# --------------------------------------------------------------------------- IMAP auth


def test_xoauth2_login_with_active_token(dovecot: DovecotServer, idp: FakeIntrospection) -> None:
    user = _user("oauth")
    token = idp.issue(user)
    c = _imaps(dovecot)
    c.oauth2_login(user, token)
    caps = c.capabilities()
    assert b"CONDSTORE" in caps and b"QRESYNC" in caps and b"IDLE" in caps
    c.enable("CONDSTORE")
    info = c.select_folder("INBOX")
    assert info[b"EXISTS"] == 0
    assert b"HIGHESTMODSEQ" in info
    names = {f[2] for f in c.list_folders()}
    assert {"INBOX", "Sent", "Drafts", "Trash", "Junk"} <= names
    c.logout()
    assert idp.requests[-1]["token"] == token


def test_oauthbearer_login(dovecot: DovecotServer, idp: FakeIntrospection) -> None:
    user = _user("bearer")
    c = _imaps(dovecot)
    c.oauthbearer_login(user, idp.issue(user))
    c.select_folder("INBOX")
    c.logout()


def test_xoauth2_rejects_unknown_revoked_and_foreign_tokens(
    dovecot: DovecotServer, idp: FakeIntrospection
) -> None:
    user = _user("revoke")
    token = idp.issue(user)

    with pytest.raises(LoginError):
        _imaps(dovecot).oauth2_login(user, "not-a-token")

    other = _user("other")
    with pytest.raises(LoginError):  # token of another account
        _imaps(dovecot).oauth2_login(other, token)

    c = _imaps(dovecot)
    c.oauth2_login(user, token)
    c.logout()

    idp.revoke(token)  # no auth cache: the very next login must fail
    with pytest.raises(LoginError):
        _imaps(dovecot).oauth2_login(user, token)


def test_password_login_and_tls_hostname(dovecot: DovecotServer) -> None:
    c = _imaps(dovecot, host="localhost")
    c.login(PW_USER, PW_PASS)
    c.select_folder("INBOX")
    c.logout()
    with pytest.raises(LoginError):
        _imaps(dovecot).login(PW_USER, "wrong")
    with pytest.raises(LoginError):  # XOAUTH2-only users have no password
        _imaps(dovecot).login("nobody-here@example.com", PW_PASS)
    with pytest.raises(ssl.SSLCertVerificationError):  # not trusted without the test CA
        IMAPClient(
            dovecot.host,
            port=dovecot.imaps_port,
            ssl=True,
            ssl_context=ssl.create_default_context(),
        )


def test_password_user_added_live(dovecot: DovecotServer) -> None:
    user = _user("late")
    dovecot.set_password_user(user, "pw1")
    c = _imaps(dovecot)
    c.login(user, "pw1")
    c.logout()
    dovecot.set_password_user(user, None)
    with pytest.raises(LoginError):
        _imaps(dovecot).login(user, "pw1")


def test_starttls_port(dovecot: DovecotServer, idp: FakeIntrospection) -> None:
    user = _user("starttls")
    c = IMAPClient(dovecot.host, port=dovecot.imap_port, ssl=False)
    caps = c.capabilities()
    assert b"STARTTLS" in caps and b"LOGINDISABLED" in caps
    c.starttls(ssl.create_default_context(cafile=str(dovecot.ca_file)))
    c.oauth2_login(user, idp.issue(user))
    c.select_folder("INBOX")
    c.logout()


# --------------------------------------------------------------------------- mailbox helpers


def test_seed_200_messages(dovecot: DovecotServer) -> None:
    user = _user("seed")
    seeded = dovecot.seed(user, "INBOX", 200)
    assert len(seeded) == 200
    assert [m.uid for m in seeded] == sorted(m.uid for m in seeded)
    assert len({m.message_id for m in seeded}) == 200
    assert len({m.subject for m in seeded}) == 200
    c = dovecot.admin_client(user)
    info = c.select_folder("INBOX", readonly=True)
    assert info[b"EXISTS"] == 200
    last = seeded[-1]
    data = c.fetch([last.uid], ["RFC822.SIZE", "INTERNALDATE", "FLAGS", "BODY.PEEK[]"])[last.uid]
    assert 1400 <= data[b"RFC822.SIZE"] <= 1600
    assert last.message_id.encode() in data[b"BODY[]"]
    assert b"\\Seen" not in data[b"FLAGS"]
    assert abs(data[b"INTERNALDATE"].timestamp() - last.date.timestamp()) < 2 or (
        data[b"INTERNALDATE"].replace(tzinfo=None) == last.date.astimezone().replace(tzinfo=None)
    )
    c.logout()
    # seeding more keeps UIDs increasing, into a new folder too, with flags
    more = dovecot.seed(user, "Archive/2024", 3, flags=["\\Seen"])
    assert [m.uid for m in more] == [1, 2, 3]
    st = dovecot.status(user, "Archive/2024")
    assert st["messages"] == 3 and st["unseen"] == 0


def test_idle_session_sees_seeded_messages(dovecot: DovecotServer) -> None:
    user = _user("idle")
    c = dovecot.admin_client(user)
    c.select_folder("INBOX")
    c.idle()
    try:
        dovecot.seed(user, "INBOX", 3)
        responses = c.idle_check(timeout=10)
    finally:
        c.idle_done()
    assert (3, b"EXISTS") in responses
    c.logout()


def test_append_flags_and_expunge(dovecot: DovecotServer) -> None:
    user = _user("flags")
    msg = b"From: a@example.org\r\nTo: x@example.com\r\nSubject: hi\r\n\r\nbody\r\n"
    uids = [dovecot.append(user, "INBOX", msg) for _ in range(3)]
    assert uids == [1, 2, 3]
    c = dovecot.admin_client(user)
    c.enable("CONDSTORE")
    modseq0 = c.select_folder("INBOX")[b"HIGHESTMODSEQ"]

    dovecot.set_flags(user, "INBOX", [2], ["\\Seen", "\\Flagged", "$Label1"])
    c.noop()
    flags = set(c.fetch([2], ["FLAGS"])[2][b"FLAGS"]) - {b"\\Recent"}
    assert flags == {b"\\Seen", b"\\Flagged", b"$Label1"}
    changed = c.fetch([1, 2, 3], ["FLAGS"], modifiers=[f"CHANGEDSINCE {modseq0}"])
    assert set(changed) == {2}

    dovecot.expunge(user, "INBOX", [1])
    c.noop()
    assert c.search("ALL") == [2, 3]
    assert dovecot.status(user, "INBOX")["highestmodseq"] > modseq0
    c.logout()


def test_folder_helpers(dovecot: DovecotServer) -> None:
    user = _user("folders")
    dovecot.create_folder(user, "Projects/Mailkey")
    dovecot.create_folder(user, "Projects/Mailkey")  # idempotent
    uid = dovecot.append(user, "Projects/Mailkey", b"Subject: x\r\n\r\ny\r\n", flags=["\\Seen"])
    assert uid == 1
    c = dovecot.admin_client(user)
    assert "Projects/Mailkey" in {f[2] for f in c.list_folders()}
    c.logout()
    dovecot.rename_folder(user, "Projects/Mailkey", "Projects/Renamed")
    dovecot.delete_folder(user, "Projects/Renamed")
    c = dovecot.admin_client(user)
    assert not c.folder_exists("Projects/Renamed")
    c.logout()


@pytest.mark.parametrize("folder", ["INBOX", "Archive"])
def test_reset_uidvalidity(dovecot: DovecotServer, folder: str) -> None:
    user = _user("uv")
    seeded = dovecot.seed(user, folder, 5)
    dovecot.set_flags(user, folder, [seeded[1].uid], ["\\Seen", "custom1"])
    c = dovecot.admin_client(user)
    before = c.select_folder(folder)
    old_uids = c.search("ALL")

    new_validity = dovecot.reset_uidvalidity(user, folder)

    assert new_validity != before[b"UIDVALIDITY"]
    # the user's sessions are thrown out (BYE), like on a real server
    with pytest.raises((imapclient.exceptions.IMAPClientError, OSError)):
        c.noop()

    c = dovecot.admin_client(user)
    status = c.folder_status(folder, ["UIDVALIDITY", "MESSAGES"])
    assert status[b"UIDVALIDITY"] == new_validity and status[b"MESSAGES"] == 5
    after = c.select_folder(folder)
    assert after[b"UIDVALIDITY"] == new_validity
    new_uids = c.search("ALL")
    assert len(new_uids) == 5 and not set(new_uids) & set(old_uids)
    data = c.fetch(new_uids, ["FLAGS", "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
    by_mid = {
        d[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].split(b":", 1)[1].strip().decode(): d[b"FLAGS"]
        for d in data.values()
    }
    assert set(by_mid) == {m.message_id for m in seeded}
    assert {b"\\Seen", b"custom1"} <= set(by_mid[seeded[1].message_id])
    c.logout()
    assert dovecot.reset_uidvalidity(user, folder) == new_validity + 1


# --------------------------------------------------------------------------- lifecycle


def _group_alive(pgid: int) -> bool:
    return bool(group_pids(pgid))


def test_outage_stop_restart_and_clean_shutdown(idp: FakeIntrospection) -> None:
    server = DovecotServer(introspection_url=idp.url)
    user = _user("outage")
    token = idp.issue(user)
    with server:
        server.seed(user, "INBOX", 4)
        c = _imaps(server)
        c.oauth2_login(user, token)
        c.select_folder("INBOX")
        pgid = server.pid
        assert pgid is not None

        server.stop_temporarily()
        assert not server.is_running and not _group_alive(pgid)
        with pytest.raises((OSError, imapclient.exceptions.IMAPClientError)):
            c.noop()
        with pytest.raises(OSError):
            socket.create_connection((server.host, server.imaps_port), timeout=2)

        ports = (server.imaps_port, server.imap_port)
        server.restart()
        assert (server.imaps_port, server.imap_port) == ports
        c = _imaps(server)
        c.oauth2_login(user, token)
        assert c.select_folder("INBOX")[b"EXISTS"] == 4
        c.logout()
        pgid = server.pid
        workdir = server.workdir
    assert not _group_alive(pgid)
    for pattern in (str(workdir), f"dovecot-{server.instance_name}/"):
        res = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
        assert res.stdout.strip() == "", pattern
    assert not workdir.exists()  # auto-created workdir is removed by stop()


def test_startup_failure_reports_log(idp: FakeIntrospection) -> None:
    server = DovecotServer(introspection_url=idp.url, start_timeout=5)
    blocker = socket.create_server((server.host, server.imaps_port))  # port taken
    try:
        with pytest.raises(RuntimeError, match="log tail"):
            server.start()
        assert not server.is_running
    finally:
        blocker.close()
        server.stop()


@pytest.mark.skipif(not os.environ.get("MAILKEY_SEED_BENCH"), reason="set MAILKEY_SEED_BENCH=1")
def test_seed_10000_benchmark(dovecot: DovecotServer) -> None:
    user = _user("bench")
    t0 = time.monotonic()
    seeded = dovecot.seed(user, "INBOX", 10_000, size=1500)
    elapsed = time.monotonic() - t0
    print(f"\nseeded 10,000 x 1.5 KB messages in {elapsed:.2f}s")
    assert len(seeded) == 10_000
    c = dovecot.admin_client(user)
    assert c.select_folder("INBOX", readonly=True)[b"EXISTS"] == 10_000
    c.logout()


# --------------------------------------------------------------------------- SMTP


def _xoauth2(user: str, token: str) -> str:
    return f"user={user}\x01auth=Bearer {token}\x01\x01"


def _mail(sender: str, to: str) -> EmailMessage:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = sender, to, "hello"
    m.set_content("body")
    return m


@pytest.fixture(scope="module")
def smtp_ssl(idp: FakeIntrospection) -> Iterator[SmtpServer]:
    with SmtpServer(introspection_url=idp.url, security="ssl") as server:
        yield server


def test_smtp_ssl_xoauth2_good_and_bad_token(smtp_ssl: SmtpServer, idp: FakeIntrospection) -> None:
    user = _user("smtp")
    token = idp.issue(user)
    ctx = ssl.create_default_context(cafile=str(smtp_ssl.ca_file))
    n_before = len(smtp_ssl.messages)

    with smtplib.SMTP_SSL(smtp_ssl.host, smtp_ssl.port, context=ctx, timeout=10) as s:
        s.ehlo()
        assert "XOAUTH2" in s.esmtp_features["auth"]
        assert "PLAIN" not in s.esmtp_features["auth"]  # no password users configured
        with pytest.raises(smtplib.SMTPSenderRefused):  # AUTH required
            s.send_message(_mail(user, "rcpt@example.net"))

    with smtplib.SMTP_SSL(smtp_ssl.host, smtp_ssl.port, context=ctx, timeout=10) as s:
        s.ehlo()  # smtplib's auth() does not send EHLO by itself (and treats 503 as success!)
        with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
            s.auth("XOAUTH2", lambda challenge=None: _xoauth2(user, "bad-token"))
        assert exc.value.smtp_code == 535

    with smtplib.SMTP_SSL(smtp_ssl.host, smtp_ssl.port, context=ctx, timeout=10) as s:
        s.ehlo()  # smtplib's auth() does not send EHLO by itself (and treats 503 as success!)
        with pytest.raises(smtplib.SMTPAuthenticationError):  # someone else's token
            s.auth("XOAUTH2", lambda challenge=None: _xoauth2("x@example.com", token))

    with smtplib.SMTP_SSL(smtp_ssl.host, smtp_ssl.port, context=ctx, timeout=10) as s:
        s.ehlo()
        code, _ = s.auth("XOAUTH2", lambda challenge=None: _xoauth2(user, token))
        assert code == 235
        s.send_message(_mail(user, "rcpt@example.net"))

    msgs = smtp_ssl.wait_for_messages(n_before + 1)
    got = msgs[-1]
    assert got["auth_user"] == user
    assert got["mail_from"] == user and got["rcpt_tos"] == ["rcpt@example.net"]
    assert b"Subject: hello" in got["data"]
    attempts = [a for a in smtp_ssl.auth_attempts if a["mechanism"] == "XOAUTH2"]
    assert [a["success"] for a in attempts[-3:]] == [False, False, True]


def test_smtp_xoauth2_raw_gmail_style_error(smtp_ssl: SmtpServer) -> None:
    ctx = ssl.create_default_context(cafile=str(smtp_ssl.ca_file))
    with smtplib.SMTP_SSL(smtp_ssl.host, smtp_ssl.port, context=ctx, timeout=10) as s:
        s.ehlo()
        blob = base64.b64encode(_xoauth2("a@example.com", "nope").encode()).decode()
        code, resp = s.docmd("AUTH", f"XOAUTH2 {blob}")
        assert code == 334
        assert json.loads(base64.b64decode(resp))["status"] == "400"
        code, _ = s.docmd("")
        assert code == 535


def test_smtp_starttls_password_and_xoauth2(idp: FakeIntrospection) -> None:
    user = _user("smtp-tls")
    token = idp.issue(user)
    with SmtpServer(
        introspection_url=idp.url, password_users={PW_USER: PW_PASS}, security="starttls"
    ) as server:
        ctx = ssl.create_default_context(cafile=str(server.ca_file))
        with smtplib.SMTP(server.host, server.port, timeout=10) as s:
            s.ehlo()
            assert "starttls" in s.esmtp_features and "auth" not in s.esmtp_features
            code, _ = s.docmd("AUTH", "PLAIN")
            assert code >= 500  # STARTTLS required first
        with smtplib.SMTP(server.host, server.port, timeout=10) as s:
            s.starttls(context=ctx)
            s.ehlo()
            assert {"XOAUTH2", "PLAIN", "LOGIN"} <= set(s.esmtp_features["auth"].split())
            with pytest.raises(smtplib.SMTPAuthenticationError):
                s.login(PW_USER, "wrong")
            s.login(PW_USER, PW_PASS)
            s.send_message(_mail(PW_USER, "a@example.net"))
        with smtplib.SMTP(server.host, server.port, timeout=10) as s:
            s.starttls(context=ctx)
            s.ehlo()
            s.auth("XOAUTH2", lambda challenge=None: _xoauth2(user, token))
            s.send_message(_mail(user, "b@example.net"))
        msgs = server.wait_for_messages(2)
        assert [m["auth_user"] for m in msgs] == [PW_USER, user]

        server.stop_temporarily()
        with pytest.raises(OSError):
            smtplib.SMTP(server.host, server.port, timeout=2)
        server.restart()
        with smtplib.SMTP(server.host, server.port, timeout=10) as s:
            s.starttls(context=ctx)
            s.ehlo()
            s.auth("XOAUTH2", lambda challenge=None: _xoauth2(user, token))
        assert len(server.messages) == 2
