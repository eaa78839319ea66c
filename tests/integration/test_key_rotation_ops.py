"""Operating a key rotation: interrupts, undecryptable rows, concurrent old-key writers,
what `keys rotate` prints (also without a terminal) and what `keys status` advises."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import sqlalchemy as sa

from tests.conftest import make_app
from tests.integration.conftest import queued_send
from tests.integration.test_key_rotation import _flask, _seed, _under
from webapp.crypto import (
    DecryptionError,
    Keyring,
    decrypt_aes_gcm,
    generate_keys,
    init_keyring,
)
from webapp.extensions import db
from webapp.models import UserEmailToken
from webapp.services import keys as key_service
from webapp.services import tokens as token_service


def _rotation_env(base_env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(env with new keys B current and the base keys A previous, keys B)."""
    old = {name: base_env[name] for name in generate_keys()}
    new = generate_keys()
    return {**base_env, **new, **{f"{n}_PREVIOUS": v for n, v in old.items()}}, new


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def _sigint_as_in_a_terminal() -> None:
    """In the command's process before exec: SIGINT's default action, as a shell gives
    its foreground job. A script that starts the suite in the background (`make test &`)
    leaves SIGINT ignored in every process below it, and a Python started so installs no
    KeyboardInterrupt handler: the rotation would run on through the Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_parallel_rotation(env: dict[str, str], fp_b: str) -> tuple[object, list[int]]:
    start = _under(fp_b)
    proc = _flask(
        env, "keys", "rotate", "--batch-size", "10", "--jobs", "2",
        start_new_session=True, preexec_fn=_sigint_as_in_a_terminal,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while _under(fp_b) < start + 50 and time.monotonic() < deadline:
        time.sleep(0.005)
    children = _children(proc.pid)
    assert len(children) >= 2, "the forked workers must be running"
    return proc, children


def _every_row_readable(env: dict[str, str]) -> None:
    init_keyring(Keyring.from_settings(env))
    db.session.expire_all()
    for row in db.session.scalars(sa.select(UserEmailToken)):
        assert token_service.read_access_token(row) == f"access-{row.user_id}"
        assert token_service.read_refresh_token(row) == f"refresh-{row.user_id}"


def test_ctrl_c_and_kill_9_during_parallel_rotation_leave_no_process_and_no_torn_row(app, base_env):
    _seed(2000)
    env_b, new = _rotation_env(base_env)
    fp_b = Keyring.from_settings(new).current_fingerprint("oauth")
    try:
        # Ctrl-C: the terminal signals the whole process group.
        proc, children = _start_parallel_rotation(env_b, fp_b)
        os.killpg(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=30)  # type: ignore[attr-defined]
        assert proc.returncode == 130, err  # type: ignore[attr-defined]
        assert "run `flask keys rotate` again" in err
        time.sleep(0.3)
        assert _alive(children) == []
        _every_row_readable(env_b)

        # kill -9 of the command alone: its workers die with it.
        proc, children = _start_parallel_rotation(env_b, fp_b)
        proc.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
        proc.communicate(timeout=30)  # type: ignore[attr-defined]
        deadline = time.monotonic() + 5
        while _alive(children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(children) == []
        _every_row_readable(env_b)

        rerun = _flask(env_b, "keys", "rotate")
        out, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, err
        assert "failed 0, remaining 0" in out
        assert _under(fp_b) == 2000
    finally:
        init_keyring(Keyring.from_settings(app.config["ENCRYPTION"]))


def test_undecryptable_rows_are_listed_by_id_and_exit_1_and_dry_run_writes_nothing(app, base_env):
    _seed(30)
    rows = db.session.scalars(sa.select(UserEmailToken).order_by(UserEmailToken.id)).all()
    first, third = rows[0].id, rows[2].id
    swapped = rows[1].refresh_token_encrypted
    db.session.execute(
        sa.update(UserEmailToken)
        .where(UserEmailToken.id == first)
        .values(refresh_token_encrypted=swapped)
    )
    unknown_key = "v1:00000000:" + rows[2].access_token_encrypted.split(":", 2)[2]
    db.session.execute(
        sa.update(UserEmailToken)
        .where(UserEmailToken.id == third)
        .values(access_token_encrypted=unknown_key)
    )
    db.session.commit()
    env_b, _new = _rotation_env(base_env)
    before = db.session.execute(sa.text("SELECT * FROM user_email_tokens ORDER BY id")).all()

    dry = _flask(env_b, "keys", "rotate", "--dry-run")
    out, err = dry.communicate(timeout=60)
    assert dry.returncode == 0, err
    assert "user_email_tokens.access_token_encrypted: 30 to re-encrypt (1 under no" in out
    assert "nothing was written" in out
    db.session.expire_all()
    assert db.session.execute(sa.text("SELECT * FROM user_email_tokens ORDER BY id")).all() == (
        before
    )

    rotate = _flask(env_b, "keys", "rotate", "--jobs", "2")  # stderr is a pipe, not a TTY
    out, err = rotate.communicate(timeout=60)
    assert rotate.returncode == 1
    assert "rotated 58, already current 0, failed 2, remaining 0" in out
    refresh_failed = "failed in user_email_tokens.refresh_token_encrypted (cannot be decrypted)"
    assert f"{refresh_failed}: ids {first}\n" in out
    assert f"user_email_tokens.access_token_encrypted (cannot be decrypted): ids {third}" in out
    assert "rotating: user_email_tokens 30/30" in err  # plain progress lines, no bar art
    assert "━" not in err

    status = _flask(env_b, "keys", "status")
    out, _ = status.communicate(timeout=60)
    assert "ENCRYPTION_KEY_OAUTH_REFRESH_AES_GCM_PREVIOUS[0]" in out
    assert "still protects 1 ciphertexts" in out
    assert "1 ciphertexts are under keys no variable holds" in out
    assert "Rows remain under old keys" in out


def test_rows_written_under_the_old_key_during_the_pass_are_swept(app, base_env):
    """A worker not yet restarted refreshes a token the pass has already moved: the
    rotation catches it before it ends, instead of leaving it for `keys status`."""
    _seed(40)
    env_b, new = _rotation_env(base_env)
    old_ring = Keyring.from_settings(base_env)
    ring_b = Keyring.from_settings(env_b)
    first = db.session.scalar(sa.select(sa.func.min(UserEmailToken.id)))
    written = []

    def old_worker_refreshes(_table: str, _rows: int) -> None:
        if written:
            return
        init_keyring(old_ring)
        token = db.session.get(UserEmailToken, first)
        token_service.store_secrets(token, f"access-{token.user_id}", f"refresh-{token.user_id}")
        db.session.commit()
        init_keyring(ring_b)
        written.append(first)

    init_keyring(ring_b)
    try:
        report = key_service.rotate_all(10, 1, old_worker_refreshes)
        assert written == [first]
        assert report.failed_count == 0 and report.remaining == 0
        assert _under(ring_b.current_fingerprint("oauth")) == 40
        _every_row_readable(new)
    finally:
        init_keyring(Keyring.from_settings(app.config["ENCRYPTION"]))


def test_status_names_each_previous_key_and_says_when_it_can_go(app, base_env):
    _seed(3)
    env_b, _new = _rotation_env(base_env)
    status = _flask(env_b, "keys", "status")
    out, _ = status.communicate(timeout=60)
    assert "ENCRYPTION_KEY_OAUTH_AES_GCM_PREVIOUS[0]" in out
    assert "still protects 3 ciphertexts" in out
    assert "ENCRYPTION_KEY_PII_PREVIOUS[0]" in out and "protects nothing: can be removed" in out

    rotate = _flask(env_b, "keys", "rotate")
    assert rotate.wait(timeout=60) == 0
    status = _flask(env_b, "keys", "status")
    out, _ = status.communicate(timeout=60)
    assert "still protects" not in out
    assert out.count("can be removed") == 4  # three previous keys, then the summary


def test_a_queued_send_that_cannot_be_decrypted_fails_instead_of_staying_queued(app):
    from webapp.services import send as send_service

    # encrypted for another send id: the AAD binding refuses it here
    send = queued_send({"to": ["x@example.com"]}, aad_send_id=987_654)
    result = send_service.deliver(send.id)
    assert result is not None and result.status == "failed"
    assert "cannot be decrypted" in (result.error or "")


def test_a_decryption_error_reaching_the_api_is_409_never_500(base_env):
    app = make_app(base_env)

    @app.get("/_test/undecryptable")
    def _undecryptable() -> str:
        decrypt_aes_gcm("v1:00000000:AAAA", "oauth")
        raise DecryptionError("unreachable")

    response = app.test_client().get("/_test/undecryptable")
    assert response.status_code == 409
    assert response.json["error"]["code"] == "needs_reauth"
    assert response.json["error"]["reason"] == "decryption_failed"
