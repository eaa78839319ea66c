"""Key rotation on PostgreSQL: from key A to key B, killed half-way and rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from webapp.crypto import Keyring, generate_keys, init_keyring
from webapp.extensions import db
from webapp.models import UserEmailToken
from webapp.services import tokens as token_service

ROOT = Path(__file__).resolve().parents[2]
ROWS = 6000


def _seed(count: int) -> None:
    """Real rows through the token service's own encryption (keys A)."""
    for index in range(count):
        token = UserEmailToken(
            organization_id=1 + index % 3,
            user_id=index,
            provider="google",
            email_address=f"r{index}@example.com",
            status="active",
            scopes="https://mail.google.com/",
        )
        token_service.store_secrets(token, f"access-{index}", f"refresh-{index}")
        db.session.add(token)
    db.session.commit()


def _flask(env: dict[str, str], *args: str, **kwargs) -> subprocess.Popen:
    full_env = {**os.environ, **env, "FLASK_APP": "webapp:create_app"}
    return subprocess.Popen(
        [sys.executable, "-m", "flask", *args],
        env=full_env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _under(fingerprint: str) -> int:
    db.session.expire_all()
    return db.session.scalar(
        sa.select(sa.func.count())
        .select_from(UserEmailToken)
        .where(UserEmailToken.access_token_encrypted.startswith(f"v1:{fingerprint}:"))
    )


def test_rotation_killed_midway_then_rerun_leaves_every_row_readable_under_b(app, base_env):
    _seed(ROWS)
    old = {name: base_env[name] for name in generate_keys()}
    new = generate_keys()
    env_b = {**base_env, **new, **{f"{name}_PREVIOUS": value for name, value in old.items()}}
    fp_b = Keyring.from_settings(new).current_fingerprint("oauth")

    dry = _flask(env_b, "keys", "rotate", "--dry-run")
    out, _ = dry.communicate(timeout=60)
    assert dry.returncode == 0
    assert f"{ROWS * 2} would be re-encrypted" in out
    assert _under(fp_b) == 0

    first = _flask(env_b, "keys", "rotate", "--batch-size", "50", "--jobs", "2")
    deadline = time.monotonic() + 60
    while _under(fp_b) < 100 and time.monotonic() < deadline:
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    midway = _under(fp_b)
    assert 0 < midway < ROWS, "the kill must land in the middle of the rotation"

    second = _flask(env_b, "keys", "rotate", "--batch-size", "500")
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert "failed 0" in out
    assert _under(fp_b) == ROWS

    # Key B alone (no previous keys) reads every row.
    only_b = {**base_env, **new}
    init_keyring(Keyring.from_settings(new))
    try:
        rows = db.session.scalars(sa.select(UserEmailToken).order_by(UserEmailToken.id)).all()
        assert len(rows) == ROWS
        for row in rows:
            assert token_service.read_access_token(row) == f"access-{row.user_id}"
            assert token_service.read_refresh_token(row) == f"refresh-{row.user_id}"
    finally:
        init_keyring(Keyring.from_settings(app.config["ENCRYPTION"]))

    status = _flask(only_b, "keys", "status")
    out, _ = status.communicate(timeout=60)
    assert "previous" not in out and "unknown" not in out
    assert "can be removed" in out


def test_microsoft_sized_tokens_stay_in_the_heap_row(app):
    """Migration 0003: a 2 KB access token's ciphertext is stored inline, not in TOAST,
    so reading a token and rewriting it (refresh, rotation) touch one heap tuple."""
    token = UserEmailToken(
        organization_id=1, user_id=1, provider="microsoft", email_address="big@example.com",
        status="active", scopes="https://outlook.office.com/IMAP.AccessAsUser.All",
    )  # fmt: skip
    token_service.store_secrets(token, "a" * 2048, "r" * 512)
    db.session.add(token)
    db.session.commit()
    toast = db.session.scalar(
        sa.text("SELECT reltoastrelid::regclass::text FROM pg_class WHERE relname = :t"),
        {"t": "user_email_tokens"},
    )
    assert db.session.scalar(sa.text(f"SELECT count(*) FROM {toast}")) == 0  # noqa: S608
    assert token_service.read_access_token(db.session.get(UserEmailToken, token.id)) == "a" * 2048


def test_rotation_covers_every_pii_column_including_queued_sends(app, base_env):
    """A send still in the outbox holds its message Fernet-encrypted with the PII key:
    rotation must move it too, or dropping the old key would lose the message."""
    import json

    from tests.integration.conftest import queued_send
    from webapp.crypto import decrypt_field, encrypt_field
    from webapp.models import MailAccount, OutboundMessage
    from webapp.services.keys import COLUMNS, account_password_aad, payload_aad

    request = {"to": ["bob@example.com"], "subject": "still queued"}
    send = queued_send(request)
    account = db.session.get(MailAccount, send.account_id)
    account.password_encrypted = encrypt_field("pw", "pii", account_password_aad(account))
    db.session.commit()
    assert "mail_sends.payload_encrypted" in {spec.name for spec in COLUMNS}

    old = {name: base_env[name] for name in generate_keys()}
    new = generate_keys()
    env_b = {**base_env, **new, **{f"{name}_PREVIOUS": value for name, value in old.items()}}
    rotate = _flask(env_b, "keys", "rotate")
    out, err = rotate.communicate(timeout=60)
    assert rotate.returncode == 0, err
    assert "failed 0" in out

    init_keyring(Keyring.from_settings(new))  # key B alone
    try:
        db.session.expire_all()
        stored = db.session.get(OutboundMessage, send.id)
        assert json.loads(decrypt_field(stored.payload_encrypted, "pii", payload_aad(send.id))) == (
            request
        )
    finally:
        init_keyring(Keyring.from_settings(app.config["ENCRYPTION"]))


def test_keys_commands_with_the_database_down_say_so_in_one_line(base_env):
    down = {**base_env, "DATABASE_URL": "postgresql+psycopg://postgres:hunter2@127.0.0.1:9/none"}
    for args in (("keys", "status"), ("keys", "rotate", "--dry-run")):
        command = _flask(down, *args)
        out, err = command.communicate(timeout=60)
        assert command.returncode == 1
        assert "error: the database at 127.0.0.1:9/none is unavailable" in err
        assert "Traceback" not in err and "hunter2" not in out + err
