"""Real mail servers for tests: Dovecot (IMAP) and aiosmtpd (SMTP), both with XOAUTH2.

Both servers validate OAuth bearer tokens against an RFC 7662 introspection endpoint
(``POST <url>`` with form ``token=<access token>`` -> ``{"active": true, "email": ...}``).
Nothing is cached: a token revoked at the provider is rejected on the very next login.

Typical use::

    with DovecotServer(introspection_url=f"{provider}/introspect") as imap:
        imap.seed("alice@example.com", "INBOX", 200)
        ctx = ssl.create_default_context(cafile=imap.ca_file)
        client = IMAPClient(imap.host, port=imap.imaps_port, ssl=True, ssl_context=ctx)
        client.oauth2_login("alice@example.com", access_token)

    with SmtpServer(introspection_url=..., security="ssl") as smtp:
        ...  # smtplib.SMTP_SSL(smtp.host, smtp.port, context=...) ; smtp.messages

The Dovecot instance is fully self-contained: generated config, throw-away CA, base_dir,
state_dir and logs all live in private directories; ``/etc/dovecot`` is never read.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import email.utils
import glob
import grp
import ipaddress
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "DovecotServer",
    "MailServerError",
    "SeededMessage",
    "SmtpServer",
    "free_port",
    "group_pids",
    "introspect_token",
    "make_ca_and_cert",
]

DOVECOT_BIN = "/usr/sbin/dovecot"
DOVEADM_BIN = "/usr/bin/doveadm"
LOCALHOST = "127.0.0.1"


class MailServerError(RuntimeError):
    """A test mail server failed to start or a fixture helper failed."""


# --------------------------------------------------------------------------- helpers


def free_port(host: str = LOCALHOST) -> int:
    """Return a TCP port that was free a moment ago (bind to port 0 and release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_ca_and_cert(
    workdir: str | os.PathLike[str],
    hostnames: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1", "::1"),
) -> tuple[Path, Path, Path]:
    """Create a throw-away CA and a server certificate signed by it.

    Returns ``(ca_path, cert_path, key_path)`` (PEM files in *workdir*).  The server
    certificate has SANs for *hostnames* and *ips* (default: localhost, 127.0.0.1, ::1),
    so clients can verify with ``ssl.create_default_context(cafile=ca_path)`` and host
    name checking ON.  ``cert_path`` contains the leaf followed by the CA (full chain).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    not_before = now - dt.timedelta(days=1)
    not_after = now + dt.timedelta(days=30)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Mailkey tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Mailkey test CA {secrets.token_hex(4)}"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    ca_path = workdir / "ca.pem"
    cert_path = workdir / "server-cert.pem"
    key_path = workdir / "server-key.pem"
    ca_path.write_bytes(ca_cert.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(key_path, 0o600)
    return ca_path, cert_path, key_path


def introspect_token(
    introspection_url: str,
    token: str,
    *,
    client_id: str | None = None,
    client_secret: str | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """POST ``token=<token>`` to an RFC 7662 endpoint and return the JSON response.

    Raises ``OSError``/``ValueError`` when the endpoint is unreachable or answers garbage.
    """
    form = {"token": token}
    if client_id is not None:
        form["client_id"] = client_id
        form["client_secret"] = client_secret or ""
    req = urllib.request.Request(  # noqa: S310 - URL comes from the test configuration
        introspection_url,
        data=urllib.parse.urlencode(form).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
        method="POST",
    )
    ctx = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:  # noqa: S310
        data = json.loads(resp.read().decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"introspection returned non-object JSON: {data!r}")
    return data


def _token_grants(info: dict[str, Any], user: str, required_scope: str | None) -> tuple[bool, str]:
    """Check an introspection response against the user that is logging in."""
    if info.get("active") is not True:
        return False, "token inactive"
    # Same rule as Dovecot's oauth2 passdb: token_type, if present, must be "Bearer".
    token_type = info.get("token_type")
    if token_type is not None and str(token_type).lower() != "bearer":
        return False, f"token_type {token_type!r} is not Bearer"
    email_ = info.get("email") or info.get("username")
    if not isinstance(email_, str) or email_.lower() != user.lower():
        return False, f"token belongs to {email_!r}, not {user!r}"
    if required_scope:
        scopes = str(info.get("scope") or "").split()
        if required_scope not in scopes:
            return False, f"scope {required_scope!r} missing"
    return True, "ok"


def _client_ssl_context(ca_file: str | os.PathLike[str]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _traversable_by_others(path: Path) -> bool:
    """True if every directory from / down to *path* has the o+x bit."""
    path = path.resolve()
    for p in [path, *path.parents]:
        try:
            if not os.stat(p).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _rmtree_all(paths: list[Path]) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group *pgid* (Linux /proc scan)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat_ = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..." -- comm may contain spaces/parens
        fields = stat_[stat_.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            pids.append(int(entry))
    return pids


_MAILDIR_FLAG_LETTERS = {
    "\\draft": "D",
    "\\flagged": "F",
    "\\answered": "R",
    "\\seen": "S",
    "\\deleted": "T",
}


def _to_str(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v


class _TcpRelay:
    """Byte pump 127.0.0.1:<port> -> backend, connecting *from* another loopback address.

    Dovecot treats a connection whose remote IP equals its local IP (any loopback client)
    as "secured" and would allow plaintext LOGIN without STARTTLS.  Relaying from
    127.0.0.2 makes the plain port behave like a real remote server (LOGINDISABLED until
    STARTTLS).  TLS passes through untouched.
    """

    def __init__(
        self, listen: tuple[str, int], target: tuple[str, int], source_host: str | None
    ) -> None:
        self.listen = listen
        self.target = target
        self.source_host = source_host
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @staticmethod
    def source_available(host: str) -> bool:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
            return True
        except OSError:
            return False

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(self.listen)
        sock.listen(64)
        self._sock = sock
        threading.Thread(target=self._accept_loop, args=(sock,), daemon=True).start()

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            self._close(c)

    @staticmethod
    def _close(c: socket.socket) -> None:
        with contextlib.suppress(OSError):
            c.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            c.close()

    def _accept_loop(self, sock: socket.socket) -> None:
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return
            try:
                src = (self.source_host, 0) if self.source_host else None
                backend = socket.create_connection(self.target, timeout=5, source_address=src)
                backend.settimeout(None)
            except OSError:
                self._close(client)
                continue
            with self._lock:
                if self._sock is None:
                    self._close(client)
                    self._close(backend)
                    return
                self._conns.update((client, backend))
            for a, b in ((client, backend), (backend, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            self._close(src)
            self._close(dst)


# --------------------------------------------------------------------------- Dovecot


class SeededMessage(NamedTuple):
    uid: int
    message_id: str  # including angle brackets, e.g. "<seed.ab12cd.7@mailkey.test>"
    subject: str
    date: dt.datetime  # Date header == INTERNALDATE (UTC, aware)


@dataclasses.dataclass
class _Ids:
    uid: int
    gid: int
    user: str
    group: str


class DovecotServer:
    """A real Dovecot 2.3 IMAP server on 127.0.0.1 (IMAPS + IMAP/STARTTLS), XOAUTH2 enabled.

    Accounts: *any* user name can log in with XOAUTH2/OAUTHBEARER if the introspection
    endpoint says the token is active and its ``email`` equals the login name (case-
    insensitive); ``password_users`` can additionally log in with LOGIN/PLAIN.  Mailboxes
    are created on first use (static userdb), maildir with ``/`` hierarchy separator.
    """

    host = LOCALHOST
    master_user = "mailkey-master"

    def __init__(
        self,
        introspection_url: str,
        password_users: dict[str, str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        *,
        required_scope: str | None = None,
        introspection_client_id: str | None = None,
        introspection_client_secret: str | None = None,
        introspection_ca_file: str | os.PathLike[str] | None = None,
        special_folders: bool = True,
        imap_capability: str | None = None,
        start_timeout: float = 20.0,
        debug: bool = False,
    ) -> None:
        self.introspection_url = introspection_url
        # Replaces the advertised capabilities, e.g. to play a server without CONDSTORE.
        self.imap_capability = imap_capability
        self.password_users: dict[str, str] = dict(password_users or {})
        self.required_scope = required_scope
        self.introspection_client_id = introspection_client_id
        self.introspection_client_secret = introspection_client_secret
        self.introspection_ca_file = introspection_ca_file
        self.special_folders = special_folders
        self.start_timeout = start_timeout
        self.debug = debug
        self.master_password = secrets.token_urlsafe(18)

        self._own_workdir = workdir is None
        self.workdir = Path(
            tempfile.mkdtemp(prefix="mailkey-dovecot-") if workdir is None else workdir
        ).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._own_workdir:
            os.chmod(self.workdir, 0o755)  # noqa: S103 - mail uid must traverse
        # base_dir holds unix sockets (108-byte path limit) and must be reachable by the
        # unprivileged mail processes, so it always lives in a short private dir in /tmp.
        self.rundir = Path(tempfile.mkdtemp(prefix="dvk-", dir="/tmp"))  # noqa: S108
        os.chmod(self.rundir, 0o755)  # noqa: S103
        self._dirs_finalizer = weakref.finalize(
            self, _rmtree_all, [self.rundir] + ([self.workdir] if self._own_workdir else [])
        )
        self.base_dir = self.rundir / "run"
        self.state_dir = self.rundir / "state"

        self._ids = self._pick_ids()
        if _traversable_by_others(self.workdir) or os.geteuid() != 0:
            self.mail_root = self.workdir / "mail"
        else:
            # e.g. pytest's tmp_path lives under a 0700 directory; the mail processes run
            # as an unprivileged uid and could not reach it.
            self.mail_root = self.rundir / "mail"
            link = self.workdir / "mail"
            if not link.exists() and not link.is_symlink():
                link.symlink_to(self.mail_root)

        self.config_path = self.workdir / "dovecot.conf"
        self.log_path = self.workdir / "dovecot.log"
        self.passwd_path = self.workdir / "users.passwd"
        self.master_passwd_path = self.workdir / "master.passwd"
        self.oauth2_conf_path = self.workdir / "dovecot-oauth2.conf.ext"

        self.ca_file, self.cert_file, self.key_file = make_ca_and_cert(self.workdir / "tls")
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(free_port())
        self.imaps_port, self.imap_port, self._imap_backend_port = sorted(ports)
        # Plain port: served through a relay from 127.0.0.2 so Dovecot does not treat
        # the (loopback) client as secure -> STARTTLS really is required.
        relay_src = "127.0.0.2" if _TcpRelay.source_available("127.0.0.2") else None
        self.starttls_enforced = relay_src is not None
        self._relay = _TcpRelay(
            (self.host, self.imap_port), (self.host, self._imap_backend_port), relay_src
        )

        # child processes show up as "dovecot-<instance_name>/imap" etc. in ps
        self.instance_name = f"mailkey-{self.imaps_port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._seed_counter = 0
        self._passwd_mtime = 0
        self._lock = threading.RLock()
        self._write_config()

    # ------------------------------------------------------------------ config

    @staticmethod
    def _pick_ids() -> _Ids:
        if os.geteuid() == 0:
            # Dovecot refuses mail uid 0; use nobody (must not be the login user dovenull).
            pw = pwd.getpwnam("nobody")
        else:
            pw = pwd.getpwuid(os.geteuid())
        return _Ids(pw.pw_uid, pw.pw_gid, pw.pw_name, grp.getgrgid(pw.pw_gid).gr_name)

    def _write_config(self) -> None:
        is_root = os.geteuid() == 0
        me = pwd.getpwuid(os.geteuid()).pw_name
        internal_user = me
        internal_group = grp.getgrgid(pwd.getpwnam(me).pw_gid).gr_name
        login_user = "dovenull" if is_root else me
        try:
            pwd.getpwnam(login_user)
        except KeyError:  # pragma: no cover - non-Debian fallback
            login_user = "nobody" if is_root else me

        self._write_passwd_file()
        self.master_passwd_path.write_text(
            f"{self.master_user}:{{PLAIN}}{self.master_password}::::::\n"
        )
        os.chmod(self.master_passwd_path, 0o600)

        oauth = [
            "introspection_mode = post",
            f"introspection_url = {self.introspection_url}",
            "force_introspection = yes",
            "username_attribute = email",
            "active_attribute = active",
            "active_value = true",
            "timeout_msecs = 10000",
            "max_parallel_connections = 4",
            f"debug = {'yes' if self.debug else 'no'}",
        ]
        if self.required_scope:
            oauth.append(f"scope = {self.required_scope}")
        if self.introspection_client_id is not None:
            oauth.append(f"client_id = {self.introspection_client_id}")
            oauth.append(f"client_secret = {self.introspection_client_secret or ''}")
        if self.introspection_ca_file is not None:
            oauth.append(f"tls_ca_cert_file = {self.introspection_ca_file}")
        self.oauth2_conf_path.write_text("\n".join(oauth) + "\n")

        for d in (self.base_dir, self.state_dir, self.mail_root):
            d.mkdir(parents=True, exist_ok=True)
        if is_root:
            os.chown(self.mail_root, self._ids.uid, self._ids.gid)
        os.chmod(self.mail_root, 0o700)

        mr = str(self.mail_root)
        special = ""
        if self.special_folders:
            special = "".join(
                f"  mailbox {name} {{\n    special_use = \\{use}\n    auto = subscribe\n  }}\n"
                for name, use in (
                    ("Drafts", "Drafts"),
                    ("Sent", "Sent"),
                    ("Junk", "Junk"),
                    ("Trash", "Trash"),
                )
            )
        capability = f"imap_capability = {self.imap_capability}\n" if self.imap_capability else ""
        conf = f"""\
# Generated by tests/support/mailserver.py -- do not edit.
base_dir = {self.base_dir}
state_dir = {self.state_dir}
instance_name = {self.instance_name}
log_path = {self.log_path}
info_log_path = {self.log_path}
debug_log_path = {self.log_path}
protocols = imap
listen = {self.host}
shutdown_clients = yes

default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
first_valid_uid = 1
mail_uid = {self._ids.uid}
mail_gid = {self._ids.gid}

ssl = required
ssl_cert = <{self.cert_file}
ssl_key = <{self.key_file}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes

mail_location = maildir:{mr}/%u:LAYOUT=fs:INBOX={mr}/%u/INBOX
mail_fsync = never
mail_max_userip_connections = 1000
mailbox_idle_check_interval = 1 secs
imap_idle_notify_interval = 2 mins
{capability}
auth_mechanisms = plain login xoauth2 oauthbearer
auth_master_user_separator = *
auth_cache_size = 0
auth_cache_ttl = 0
auth_cache_negative_ttl = 0
auth_failure_delay = 0
auth_verbose = yes
auth_debug = {"yes" if self.debug else "no"}
auth_debug_passwords = no

passdb {{
  driver = passwd-file
  args = {self.master_passwd_path}
  master = yes
  mechanisms = plain login
}}
passdb {{
  driver = passwd-file
  args = {self.passwd_path}
  mechanisms = plain login
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {self.oauth2_conf_path}
}}
userdb {{
  driver = static
  args = uid={self._ids.uid} gid={self._ids.gid} home={mr}/%u allow_all_users=yes
}}

namespace inbox {{
  inbox = yes
  separator = /
  prefix =
{special}}}

service imap-login {{
  inet_listener imap {{
    address = {self.host}
    port = {self._imap_backend_port}
  }}
  inet_listener imaps {{
    address = {self.host}
    port = {self.imaps_port}
    ssl = yes
  }}
  process_min_avail = 1
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""
        self.config_path.write_text(conf)

    def _write_passwd_file(self) -> None:
        lines = []
        for user, password in self.password_users.items():
            for v in (user, password):
                if any(c in v for c in ":\n\r"):
                    raise ValueError(f"unsupported character in password user entry {v!r}")
            lines.append(f"{user}:{{PLAIN}}{password}::::::\n")
        tmp = self.passwd_path.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.passwd_path)

    def set_password_user(self, user: str, password: str | None) -> None:
        """Add/change (or with ``None`` remove) a LOGIN/PLAIN account live (takes ~1 s)."""
        with self._lock:
            if password is None:
                self.password_users.pop(user, None)
            else:
                self.password_users[user] = password
            self._write_passwd_file()
            # Dovecot re-reads passwd-file when mtime/size change, but checks at most once
            # per wall-clock second: give it a fresh mtime and let the current second pass.
            self._passwd_mtime = max(int(time.time()), self._passwd_mtime + 1)
            os.utime(self.passwd_path, (self._passwd_mtime, self._passwd_mtime))
            time.sleep(1.05 - (time.time() % 1))

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> DovecotServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """PID of the dovecot master (== process group id of all its children)."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start dovecot and wait until both ports accept connections (TLS verified)."""
        with self._lock:
            if self.is_running:
                return
            # stale pid file from a killed instance would make dovecot refuse to start
            with contextlib.suppress(FileNotFoundError):
                (self.base_dir / "master.pid").unlink()
            log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
            try:
                self._proc = subprocess.Popen(
                    [DOVECOT_BIN, "-F", "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            finally:
                log.close()
            self._finalizer = weakref.finalize(self, _kill_group, self._proc.pid)
            try:
                self._relay.start()
                self._wait_ready()
            except BaseException:
                self._terminate()
                raise

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        ctx = _client_ssl_context(self.ca_file)
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise MailServerError(
                    f"dovecot exited with code {self._proc.returncode} during startup; "
                    f"log tail:\n{_log_tail(self.log_path)}"
                )
            try:
                with socket.create_connection((self.host, self.imaps_port), timeout=2) as raw:
                    with ctx.wrap_socket(raw, server_hostname=self.host) as tls:
                        greeting = tls.recv(1024)
                if not greeting.startswith(b"* OK"):
                    raise MailServerError(f"unexpected IMAPS greeting {greeting!r}")
                with socket.create_connection((self.host, self.imap_port), timeout=2) as raw:
                    greeting = raw.recv(1024)
                if not greeting.startswith(b"* OK"):
                    raise MailServerError(f"unexpected IMAP greeting {greeting!r}")
                return
            except ssl.SSLCertVerificationError:
                raise
            except (OSError, MailServerError) as e:
                last_err = e
                time.sleep(0.05)
        raise MailServerError(
            f"dovecot did not become ready within {self.start_timeout}s ({last_err!r}); "
            f"log tail:\n{_log_tail(self.log_path)}"
        )

    def _terminate(self) -> None:
        self._relay.stop()
        proc = self._proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session=True -> pgid == pid
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            # A graceful dovecot shutdown lingers 1-3 s (log process drain); the mail
            # storage is crash-safe, so after a short grace period kill the children
            # first (the still-running master reaps them, no zombies left for init),
            # then the master itself.
            try:
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                for pid in group_pids(pgid):
                    if pid != proc.pid:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.3)
                _kill_group(pgid)
                proc.wait(timeout=10)
        # Children (imap, auth, ...) share the process group; make sure none survive.
        deadline = time.monotonic() + 10
        while group_pids(pgid) and time.monotonic() < deadline:
            _kill_group(pgid)
            time.sleep(0.02)
        self._proc = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def stop_temporarily(self) -> None:
        """Simulate an outage: kill the server (clients get disconnected), keep all data."""
        with self._lock:
            self._terminate()

    def restart(self) -> None:
        """Start again after :meth:`stop_temporarily` (same ports, certs and mail data)."""
        with self._lock:
            self._terminate()
            self.start()

    def stop(self) -> None:
        """Stop for good and delete the private runtime dirs (and workdir if we made it)."""
        with self._lock:
            self._terminate()
            self._dirs_finalizer()

    def log_tail(self, lines: int = 40) -> str:
        return _log_tail(self.log_path, lines)

    # ------------------------------------------------------------------ clients

    def ssl_context(self) -> ssl.SSLContext:
        """Client context trusting this server's CA (host name checking on)."""
        return _client_ssl_context(self.ca_file)

    def client(self, *, starttls: bool = False, timeout: float = 30.0) -> Any:
        """Unauthenticated IMAPClient: IMAPS, or plain port + STARTTLS if *starttls*."""
        from imapclient import IMAPClient

        if starttls:
            c = IMAPClient(self.host, port=self.imap_port, ssl=False, timeout=timeout)
            c.starttls(self.ssl_context())
            return c
        return IMAPClient(
            self.host,
            port=self.imaps_port,
            ssl=True,
            ssl_context=self.ssl_context(),
            timeout=timeout,
        )

    def admin_client(self, user: str) -> Any:
        """IMAPClient (IMAPS) logged in as *user* via the master user -- no OAuth needed."""
        c = self.client()
        try:
            c.login(f"{user}*{self.master_user}", self.master_password)
        except Exception:
            with contextlib.suppress(Exception):
                c.shutdown()
            raise
        return c

    @contextlib.contextmanager
    def _admin(self, user: str):  # type: ignore[no-untyped-def]
        c = self.admin_client(user)
        try:
            yield c
        finally:
            with contextlib.suppress(Exception):
                c.logout()

    def kick(self, user: str) -> None:
        """Disconnect all IMAP sessions of *user* (they get ``* BYE``)."""
        res = self.doveadm("kick", user, check=False)
        if res.returncode not in (0, 68):  # 68 = EX_NOUSER: nobody to kick
            raise MailServerError(f"doveadm kick {user} failed: {res.stderr.strip()}")

    def doveadm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``doveadm -c <this config> <args>`` (server must be running)."""
        cmd = [DOVEADM_BIN, "-c", str(self.config_path), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if check and res.returncode != 0:
            raise MailServerError(
                f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}\n"
                f"log tail:\n{self.log_tail(10)}"
            )
        return res

    # ------------------------------------------------------------------ mailbox helpers

    def create_folder(self, user: str, name: str) -> None:
        """Create folder *name* (``/``-separated hierarchy); no error if it exists."""
        with self._admin(user) as c:
            if not c.folder_exists(name):
                c.create_folder(name)
                c.subscribe_folder(name)

    def delete_folder(self, user: str, name: str) -> None:
        with self._admin(user) as c:
            if c.folder_exists(name):
                c.delete_folder(name)

    def rename_folder(self, user: str, old: str, new: str) -> None:
        with self._admin(user) as c:
            c.rename_folder(old, new)

    def append(
        self,
        user: str,
        folder: str,
        raw: bytes,
        flags: Iterable[str | bytes] = (),
        internaldate: dt.datetime | None = None,
    ) -> int:
        """IMAP APPEND one message (folder created if missing); returns its UID."""
        with self._admin(user) as c:
            if not c.folder_exists(folder):
                c.create_folder(folder)
            resp = c.append(folder, raw, flags=tuple(flags), msg_time=internaldate)
        m = re.search(rb"APPENDUID \d+ (\d+)", resp if isinstance(resp, bytes) else b"")
        if not m:
            raise MailServerError(f"APPEND gave no APPENDUID: {resp!r}")
        return int(m.group(1))

    def set_flags(
        self, user: str, folder: str, uids: Iterable[int], flags: Iterable[str | bytes]
    ) -> None:
        """Replace the flags of *uids* (``UID STORE FLAGS``); keywords allowed."""
        self._store(user, folder, uids, flags, "set")

    def add_flags(
        self, user: str, folder: str, uids: Iterable[int], flags: Iterable[str | bytes]
    ) -> None:
        self._store(user, folder, uids, flags, "add")

    def remove_flags(
        self, user: str, folder: str, uids: Iterable[int], flags: Iterable[str | bytes]
    ) -> None:
        self._store(user, folder, uids, flags, "remove")

    def _store(
        self, user: str, folder: str, uids: Iterable[int], flags: Iterable[str | bytes], op: str
    ) -> None:
        uids = list(uids)
        if not uids:
            return
        flags = [f.encode() if isinstance(f, str) else f for f in flags]
        with self._admin(user) as c:
            c.select_folder(folder)
            getattr(c, f"{op}_flags")(uids, flags, silent=True)

    def expunge(self, user: str, folder: str, uids: Iterable[int]) -> None:
        """Permanently remove *uids* (``\\Deleted`` + ``UID EXPUNGE``)."""
        uids = list(uids)
        if not uids:
            return
        with self._admin(user) as c:
            c.select_folder(folder)
            c.add_flags(uids, [b"\\Deleted"], silent=True)
            c.uid_expunge(uids)

    def fetch_uids(self, user: str, folder: str) -> list[int]:
        with self._admin(user) as c:
            c.select_folder(folder, readonly=True)
            return sorted(c.search("ALL"))

    def status(self, user: str, folder: str) -> dict[str, int]:
        """``{messages, unseen, uidvalidity, uidnext, highestmodseq}`` (forces a sync)."""
        fields = "messages unseen uidvalidity uidnext highestmodseq"
        out = self.doveadm("-f", "flow", "mailbox", "status", "-u", user, fields, folder).stdout
        result: dict[str, int] = {}
        for m in re.finditer(r"(\w+)=(\d+)", out):
            result[m.group(1)] = int(m.group(2))
        if "uidvalidity" not in result:
            raise MailServerError(f"cannot parse doveadm status output {out!r}")
        return result

    def mailbox_path(self, user: str, folder: str) -> Path:
        out = self.doveadm("mailbox", "path", "-u", user, folder).stdout.strip()
        return Path(out)

    def _ensure_folder(self, user: str, folder: str) -> Path:
        res = self.doveadm("mailbox", "status", "-u", user, "messages", folder, check=False)
        if res.returncode != 0:
            self.create_folder(user, folder)
        path = self.mailbox_path(user, folder)
        if not (path / "cur").is_dir():
            # INBOX dirs are created lazily on first access
            self.status(user, folder)
        if not (path / "cur").is_dir():
            raise MailServerError(f"maildir for {user}/{folder} not found at {path}")
        return path

    def seed(
        self,
        user: str,
        folder: str,
        count: int,
        size: int = 1500,
        *,
        flags: Iterable[str] = (),
        sender: str = "Seed Sender <sender@example.org>",
        subject_prefix: str = "Seed message",
        start: dt.datetime | None = None,
        interval: dt.timedelta = dt.timedelta(minutes=1),
    ) -> list[SeededMessage]:
        """Bulk-create *count* distinct RFC 5322 messages (~*size* bytes each).

        Files are written straight into the maildir ``cur/`` (tmp + rename, proper owner)
        and then Dovecot is made to index them, so UIDs are assigned in generation order
        and the result is immediately visible to IMAP clients (IDLE sessions get EXISTS).
        Dates (``Date:`` header == INTERNALDATE) increase by *interval*; by default the
        last message is dated ~now.  Only system flags (``\\Seen`` etc.) are supported.
        Returns ``SeededMessage(uid, message_id, subject, date)`` in order (oldest first).
        """
        if count <= 0:
            return []
        letters = []
        for f in flags:
            try:
                letters.append(_MAILDIR_FLAG_LETTERS[f.lower()])
            except KeyError:
                raise ValueError(f"seed() supports only system flags, not {f!r}") from None
        info = ":2," + "".join(sorted(set(letters)))
        path = self._ensure_folder(user, folder)
        tmpdir, curdir = path / "tmp", path / "cur"
        if start is None:
            start = dt.datetime.now(dt.UTC).replace(microsecond=0) - interval * (count - 1)
        if start.tzinfo is None:
            start = start.replace(tzinfo=dt.UTC)
        with self._lock:
            self._seed_counter += 1
            batch = f"{secrets.token_hex(3)}{self._seed_counter}"
        base_sec = int(time.time())
        pid = os.getpid()
        uid_, gid_ = self._ids.uid, self._ids.gid
        chown = os.geteuid() == 0
        filler_line = "The quick brown fox jumps over the lazy dog. 0123456789 abcdefghij.\r\n"
        to_addr = user
        basenames: list[str] = []
        produced: list[tuple[str, str, dt.datetime]] = []
        for i in range(count):
            when = start + interval * i
            msgid = f"<seed.{batch}.{i}@mailkey.test>"
            subject = f"{subject_prefix} {i} [{batch}]"
            header = (
                f"Return-Path: <sender@example.org>\r\n"
                f"From: {sender}\r\n"
                f"To: {to_addr}\r\n"
                f"Subject: {subject}\r\n"
                f"Date: {email.utils.format_datetime(when)}\r\n"
                f"Message-ID: {msgid}\r\n"
                f"MIME-Version: 1.0\r\n"
                f"Content-Type: text/plain; charset=utf-8\r\n"
                f"Content-Transfer-Encoding: 7bit\r\n"
                f"\r\n"
                f"Message {i} of seed batch {batch}.\r\n"
            )
            need = max(0, size - len(header))
            body = (filler_line * (need // len(filler_line) + 1))[:need]
            if need >= 2:
                body = body[: need - 2] + "\r\n"
            data = (header + body).encode("ascii")
            n = len(data)
            basename = (
                f"{base_sec + i // 1_000_000}.M{i % 1_000_000}P{pid}Q{self._seed_counter}"
                f".mailkey,S={n},W={n}"
            )
            tmp_path = tmpdir / basename
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                if chown:
                    os.fchown(fd, uid_, gid_)
            finally:
                os.close(fd)
            ts = when.timestamp()
            os.utime(tmp_path, (ts, ts))
            os.rename(tmp_path, curdir / (basename + info))
            basenames.append(basename)
            produced.append((msgid, subject, when))

        self.status(user, folder)  # make dovecot sync: assigns UIDs, updates indexes
        uid_map = self._read_uidlist(path)
        out: list[SeededMessage] = []
        for basename, (msgid, subject, when) in zip(basenames, produced, strict=True):
            uid = uid_map.get(basename)
            if uid is None:
                raise MailServerError(f"dovecot did not index seeded file {basename}")
            out.append(SeededMessage(uid, msgid, subject, when))
        return out

    @staticmethod
    def _read_uidlist(path: Path) -> dict[str, int]:
        result: dict[str, int] = {}
        with open(path / "dovecot-uidlist", encoding="utf-8", errors="replace") as f:
            f.readline()  # header
            for line in f:
                left, sep, name = line.rstrip("\n").partition(" :")
                if not sep:
                    continue
                result[name] = int(left.split(" ", 1)[0])
        return result

    def reset_uidvalidity(self, user: str, folder: str, new_uidvalidity: int | None = None) -> int:
        """Give *folder* a new UIDVALIDITY and renumber all its messages; returns it.

        Mimics a server-side mailbox rebuild: messages, flags, keywords and INTERNALDATEs
        stay, but every message gets a new UID starting at the old UIDNEXT (so no old
        UID is reused) and UIDVALIDITY becomes *new_uidvalidity* (default old + 1).
        All IMAP sessions of *user* are disconnected (``doveadm kick``) before and after
        the rebuild, like a server doing mailbox maintenance; clients must reconnect.
        """
        self.kick(user)
        st = self.status(user, folder)
        old_validity, next_uid = st["uidvalidity"], st["uidnext"]
        new_validity = new_uidvalidity if new_uidvalidity is not None else old_validity + 1
        if new_validity == old_validity or not 0 < new_validity < 2**32:
            raise ValueError(f"bad new UIDVALIDITY {new_validity}")
        path = self.mailbox_path(user, folder)
        uidlist = path / "dovecot-uidlist"
        header = uidlist.read_text(errors="replace").splitlines()[0].split()
        guid = next((h for h in header if h.startswith("G")), None)
        new_header = f"3 V{new_validity} N{next_uid}" + (f" {guid}" if guid else "") + "\n"
        tmp = path / f"dovecot-uidlist.mailkey-{secrets.token_hex(4)}"
        tmp.write_text(new_header)
        os.chmod(tmp, 0o600)
        if os.geteuid() == 0:
            os.chown(tmp, self._ids.uid, self._ids.gid)
        for f in glob.glob(str(path / "dovecot.index*")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)
        os.replace(tmp, uidlist)
        after = self.status(user, folder)
        self.kick(user)
        if after["uidvalidity"] != new_validity:
            raise MailServerError(
                f"UIDVALIDITY reset failed: {old_validity} -> {after['uidvalidity']}, "
                f"wanted {new_validity}\n{self.log_tail(10)}"
            )
        return new_validity


# --------------------------------------------------------------------------- SMTP


class _XOAuth2Identity(NamedTuple):
    login: bytes


class _SmtpHandler:
    """aiosmtpd handler: XOAUTH2 mechanism + message capture."""

    def __init__(self, owner: SmtpServer) -> None:
        self.owner = owner

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> Any:  # noqa: N802
        from aiosmtpd.smtp import MISSING, AuthResult

        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1].encode(), validate=True)
            except ValueError:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        user, token = None, None
        for part in blob.split(b"\x01"):
            if part.startswith(b"user="):
                user = part[5:].decode("utf-8", "replace")
            elif part.lower().startswith(b"auth=bearer "):
                token = part[12:].decode("utf-8", "replace").strip()
        if not user or not token:
            await server.push("501 5.5.2 Malformed XOAUTH2 initial response")
            return AuthResult(success=False, handled=True)

        owner = self.owner
        loop = asyncio.get_running_loop()
        try:
            info = await loop.run_in_executor(
                None,
                lambda: introspect_token(
                    owner.introspection_url,
                    token,
                    client_id=owner.introspection_client_id,
                    client_secret=owner.introspection_client_secret,
                    ca_file=owner.introspection_ca_file,
                ),
            )
        except (OSError, ValueError) as e:
            owner._record_auth("XOAUTH2", user, False, f"introspection failed: {e!r}")
            await server.push("454 4.7.0 Temporary authentication failure")
            return AuthResult(success=False, handled=True)
        ok, reason = _token_grants(info, user, owner.required_scope)
        owner._record_auth("XOAUTH2", user, ok, reason)
        if ok:
            return AuthResult(success=True, auth_data=_XOAuth2Identity(user.encode()))
        if owner.gmail_style_errors:
            err = json.dumps(
                {"status": "400", "schemes": "Bearer", "scope": "https://mail.google.com/"}
            )
            resp = await server.challenge_auth(err)  # client answers with an empty line
            if resp is MISSING:  # client aborted with "*" (501 already sent)
                return AuthResult(success=False, handled=True)
        await server.push(
            "535 5.7.8 Username and Password not accepted. "
            "For more information, go to https://support.google.com/mail/?p=BadCredentials"
        )
        return AuthResult(success=False, handled=True)

    async def handle_RCPT(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        refusal = self.owner.rcpt_replies.get(address)
        if refusal:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        if self.owner.data_replies:  # a scripted refusal: the message is not accepted
            return self.owner.data_replies.pop(0)
        login = getattr(session.auth_data, "login", None)  # LoginPassword / _XOAuth2Identity
        auth_user = _to_str(login) if login else None
        data = envelope.original_content or envelope.content
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        self.owner._store_message(
            {
                "mail_from": envelope.mail_from,
                "rcpt_tos": list(envelope.rcpt_tos),
                "data": bytes(data),
                "auth_user": auth_user,
                "peer": session.peer,
                "received_at": time.time(),
            }
        )
        return "250 2.0.0 OK: queued"


class SmtpServer:
    """aiosmtpd submission server on 127.0.0.1 with XOAUTH2 (+ LOGIN/PLAIN for passwords).

    ``security="starttls"``: plain port, STARTTLS required before anything else,
    AUTH only after TLS.  ``security="ssl"``: implicit TLS (like port 465).
    AUTH is required before MAIL FROM.
    """

    def __init__(
        self,
        introspection_url: str,
        password_users: dict[str, str] | None = None,
        *,
        security: str = "starttls",
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        host: str = LOCALHOST,
        port: int | None = None,
        required_scope: str | None = None,
        introspection_client_id: str | None = None,
        introspection_client_secret: str | None = None,
        introspection_ca_file: str | os.PathLike[str] | None = None,
        gmail_style_errors: bool = True,
        server_hostname: str = "smtp.mailkey.test",
        data_size_limit: int = 35 * 1024 * 1024,
        exclude_auth: tuple[str, ...] = (),
    ) -> None:
        if security not in ("starttls", "ssl"):
            raise ValueError("security must be 'starttls' or 'ssl'")
        self.introspection_url = introspection_url
        self.password_users: dict[str, str] = dict(password_users or {})
        self.security = security
        self.host = host
        self.port = port or free_port(host)
        self.required_scope = required_scope
        self.introspection_client_id = introspection_client_id
        self.introspection_client_secret = introspection_client_secret
        self.introspection_ca_file = introspection_ca_file
        self.gmail_style_errors = gmail_style_errors
        self.server_hostname = server_hostname
        self.data_size_limit = data_size_limit
        # Mechanisms not offered, e.g. ("XOAUTH2",) for a server with PLAIN/LOGIN only.
        self.exclude_auth = exclude_auth
        # Scripted refusals: RCPT TO address -> reply, and replies to the next DATAs.
        self.rcpt_replies: dict[str, str] = {}
        self.data_replies: list[str] = []

        self._own_workdir = workdir is None and tls_cert is None
        self.workdir: Path | None = None
        self._dirs_finalizer: weakref.finalize | None = None
        if tls_cert is None or tls_key is None:
            self.workdir = Path(
                tempfile.mkdtemp(prefix="mailkey-smtp-") if workdir is None else workdir
            )
            if self._own_workdir:
                self._dirs_finalizer = weakref.finalize(self, _rmtree_all, [self.workdir])
            ca, cert, key = make_ca_and_cert(self.workdir / "tls")
            self.ca_file: Path | None = ca
            self.cert_file, self.key_file = cert, key
        else:
            self.cert_file, self.key_file = Path(tls_cert), Path(tls_key)
            self.ca_file = Path(ca_file) if ca_file is not None else None

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._messages: list[dict[str, Any]] = []
        self._auth_attempts: list[dict[str, Any]] = []
        self._controller: Any = None

    # ------------------------------------------------------------------ capture

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Snapshot of received messages: dicts with mail_from, rcpt_tos, data (bytes),
        auth_user (str|None), peer, received_at."""
        with self._lock:
            return list(self._messages)

    @property
    def auth_attempts(self) -> list[dict[str, Any]]:
        """Snapshot of AUTH attempts: dicts with mechanism, user, success, reason."""
        with self._lock:
            return list(self._auth_attempts)

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()
            self._auth_attempts.clear()
            self.rcpt_replies.clear()
            self.data_replies.clear()

    def wait_for_messages(self, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Block until at least *count* messages were received; returns the snapshot."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"expected {count} messages, got {len(self._messages)}")
                self._cond.wait(remaining)
            return list(self._messages)

    def _store_message(self, msg: dict[str, Any]) -> None:
        with self._cond:
            self._messages.append(msg)
            self._cond.notify_all()

    def _record_auth(self, mechanism: str, user: str | None, ok: bool, reason: str) -> None:
        with self._lock:
            self._auth_attempts.append(
                {"mechanism": mechanism, "user": user, "success": ok, "reason": reason}
            )

    def set_password_user(self, user: str, password: str | None) -> None:
        with self._lock:
            if password is None:
                self.password_users.pop(user, None)
            else:
                self.password_users[user] = password

    # ------------------------------------------------------------------ auth (PLAIN/LOGIN)

    def _authenticator(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> Any:
        from aiosmtpd.smtp import AuthResult, LoginPassword

        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        with self._lock:
            expected = self.password_users.get(user)
        ok = expected is not None and secrets.compare_digest(expected, password)
        self._record_auth(mechanism, user, ok, "ok" if ok else "bad password")
        if ok:
            return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)

    # ------------------------------------------------------------------ lifecycle

    def ssl_context(self) -> ssl.SSLContext:
        """Client context trusting this server's CA (only if the CA is known)."""
        if self.ca_file is None:
            raise MailServerError("ca_file unknown (custom tls_cert without ca_file)")
        return _client_ssl_context(self.ca_file)

    def _server_ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        return ctx

    def __enter__(self) -> SmtpServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def is_running(self) -> bool:
        return self._controller is not None

    def start(self) -> None:
        from aiosmtpd.controller import Controller

        if self._controller is not None:
            return
        server_ctx = self._server_ssl_context()
        exclude = [*([] if self.password_users else ["PLAIN", "LOGIN"]), *self.exclude_auth]
        kwargs: dict[str, Any] = {
            "hostname": self.host,
            "port": self.port,
            "server_hostname": self.server_hostname,
            "authenticator": self._authenticator,
            "auth_required": True,
            "auth_exclude_mechanism": exclude,
            "data_size_limit": self.data_size_limit,
            "ready_timeout": 10.0,
        }
        if self.security == "ssl":
            kwargs.update(ssl_context=server_ctx, auth_require_tls=True)
        else:
            kwargs.update(tls_context=server_ctx, require_starttls=True, auth_require_tls=True)
        implicit_tls = self.security == "ssl"

        class _Controller(Controller):
            def factory(self) -> Any:
                smtp = super().factory()
                if implicit_tls:
                    # The whole session is TLS; aiosmtpd only knows about STARTTLS, and
                    # passing auth_require_tls=False emits a UserWarning (error in pytest).
                    smtp._auth_require_tls = False
                return smtp

        controller = _Controller(_SmtpHandler(self), **kwargs)
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        self._stop_controller()
        if self._dirs_finalizer is not None:
            self._dirs_finalizer()

    def _stop_controller(self) -> None:
        if self._controller is not None:
            with contextlib.suppress(Exception):
                self._controller.stop()
            self._controller = None

    def stop_temporarily(self) -> None:
        """Simulate an outage (port closed); captured messages are kept."""
        self._stop_controller()

    def restart(self) -> None:
        """Listen again on the same port after :meth:`stop_temporarily`."""
        self._stop_controller()
        deadline = time.monotonic() + 10
        while True:
            try:
                self.start()
                return
            except Exception:
                self._controller = None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
