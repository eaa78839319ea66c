"""XOAUTH2 as servers other than Dovecot take it: GreenMail (and hoodiecrow) accept the
initial response only on the AUTHENTICATE line (SASL-IR) and answer a bare AUTHENTICATE
XOAUTH2 with BAD; a server without SASL-IR needs the two-step exchange. A scripted
IMAP server over real TLS plays each; a refusal comes as a challenge, then NO (Gmail)."""

from __future__ import annotations

import base64
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from imapclient.exceptions import LoginError

from tests.support.mailserver import make_ca_and_cert
from webapp.services import mailconn
from webapp.services.mailconn import MailAuthUnsupported

USER, GOOD = "user@example.com", "good-token"
REFUSAL = base64.b64encode(b'{"status":"401","schemes":"Bearer"}').decode()


def _payload(token: str) -> str:
    return base64.b64encode(f"user={USER}\1auth=Bearer {token}\1\1".encode()).decode()


class ScriptedImap:
    """One connection at a time; `sasl_ir` decides which AUTHENTICATE form works."""

    def __init__(self, cert: str, key: str, sasl_ir: bool, mechanisms: str = "XOAUTH2") -> None:
        self.sasl_ir = sasl_ir
        self.mechanisms = mechanisms
        self.commands: list[str] = []
        self.after_refusal: list[bytes] = []  # what the client answered the challenge
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            with self.context.wrap_socket(raw, server_side=True) as conn:
                conn.settimeout(5)
                self._session(conn.makefile("rwb", buffering=0))

    def _session(self, stream) -> None:  # noqa: ANN001 - a socket file
        auth = " ".join(f"AUTH={mechanism}" for mechanism in self.mechanisms.split())
        capability = f"IMAP4rev1 {auth}" + (" SASL-IR" if self.sasl_ir else "")
        stream.write(f"* OK [CAPABILITY {capability}] ready\r\n".encode())
        while line := stream.readline():
            tag, command, *args = line.decode().strip().split(" ")
            self.commands.append(" ".join([command, *args]))
            if command == "CAPABILITY":
                stream.write(f"* CAPABILITY {capability}\r\n{tag} OK done\r\n".encode())
            elif command == "LOGOUT":
                stream.write(f"* BYE bye\r\n{tag} OK done\r\n".encode())
                return
            elif command == "AUTHENTICATE":
                inline = args[1] if len(args) > 1 else None
                if (inline is not None) != self.sasl_ir:
                    stream.write(f"{tag} BAD Missing argument.\r\n".encode())
                    continue
                if inline is None:
                    stream.write(b"+ \r\n")
                    inline = stream.readline().decode().strip()
                if inline == _payload(GOOD):
                    stream.write(f"{tag} OK AUTHENTICATE completed\r\n".encode())
                    continue
                stream.write(f"+ {REFUSAL}\r\n".encode())
                self.after_refusal.append(stream.readline())
                stream.write(f"{tag} NO [AUTHENTICATIONFAILED] Invalid credentials\r\n".encode())
            else:
                stream.write(f"{tag} BAD unknown\r\n".encode())

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def scripted_imap(app, tmp_path, monkeypatch) -> Iterator[Callable[..., ScriptedImap]]:
    """Starts ScriptedImap servers with a certificate Mailkey trusts; closes them after."""
    ca, cert, key = make_ca_and_cert(tmp_path)
    monkeypatch.setitem(app.config, "MAIL_CA_FILE", str(ca))
    servers: list[ScriptedImap] = []

    def start(**options: Any) -> ScriptedImap:
        servers.append(ScriptedImap(str(cert), str(key), **options))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(params=[True, False], ids=["sasl-ir only", "two-step only"])
def imap_server(request, scripted_imap) -> ScriptedImap:
    return scripted_imap(sasl_ir=request.param)


def _login(server: ScriptedImap, token: str) -> None:
    client = mailconn._imap_open("127.0.0.1", server.port, "ssl")
    try:
        mailconn.xoauth2_login(client, USER, token)
        assert client._imap.state == "AUTH"
    finally:
        client.logout()


def test_xoauth2_login_takes_the_form_the_server_offers(imap_server):
    _login(imap_server, GOOD)
    authenticate = [c for c in imap_server.commands if c.startswith("AUTHENTICATE")]
    expected = f"AUTHENTICATE XOAUTH2 {_payload(GOOD)}" if imap_server.sasl_ir else None
    assert authenticate == [expected or "AUTHENTICATE XOAUTH2"]


def test_a_refused_token_is_a_login_error_not_a_hang(imap_server):
    with pytest.raises(LoginError, match="Invalid credentials"):
        _login(imap_server, "expired-token")
    assert imap_server.after_refusal == [b"\r\n"]  # the empty response, not the token again


def test_a_server_without_xoauth2_is_unsupported_not_a_refused_token(scripted_imap):
    """pymap offers PLAIN and LOGIN only: a token refresh cannot help, so the login says
    so (MailAuthUnsupported, no forced refresh) instead of trying and failing."""
    server = scripted_imap(sasl_ir=True, mechanisms="PLAIN LOGIN")
    with pytest.raises(MailAuthUnsupported, match="AUTH=PLAIN AUTH=LOGIN"):
        _login(server, GOOD)
    assert not [c for c in server.commands if c.startswith("AUTHENTICATE")]
