"""Tests for webapp.crypto: round trips, tamper resistance, AAD binding, key loading, rotation."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import string
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

import webapp.crypto.fernet as fernet_module
import webapp.crypto.keyring as keyring_module
from webapp.crypto import (
    CryptoError,
    DecryptionError,
    EncryptionKeys,
    KeyConfigError,
    Keyring,
    aad_for,
    decrypt_aes_gcm,
    decrypt_field,
    encrypt_aes_gcm,
    encrypt_field,
    fingerprint_of,
    generate_keys,
    get_keyring,
    init_keyring,
    is_current,
    reencrypt,
)

OAUTH_VAR = "ENCRYPTION_KEY_OAUTH_AES_GCM"
REFRESH_VAR = "ENCRYPTION_KEY_OAUTH_REFRESH_AES_GCM"
PII_VAR = "ENCRYPTION_KEY_PII"
KEYS = generate_keys()
RING = Keyring.from_settings(KEYS)
SECRET = "ya29.super-secret-access-token"
ALPHABET = string.ascii_letters + string.digits + "-_:="
ROW_A = aad_for(3, 7, "google", "alice@example.com", "access_token_encrypted")
ROW_B = aad_for(3, 8, "google", "bob@example.com", "access_token_encrypted")
COLUMN_B = aad_for(3, 7, "google", "alice@example.com", "refresh_token_encrypted")

Encrypt = Callable[[str, str], str]
Decrypt = Callable[[str, str], str]
SCHEMES: dict[str, tuple[Encrypt, Decrypt]] = {
    "aes_gcm": (
        lambda v, aad: encrypt_aes_gcm(v, "oauth", aad),
        lambda c, aad: decrypt_aes_gcm(c, "oauth", aad),
    ),
    "fernet": (
        lambda v, aad: encrypt_field(v, EncryptionKeys.PII, aad),
        lambda c, aad: decrypt_field(c, EncryptionKeys.PII, aad),
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _active_keyring() -> Iterator[None]:
    previous = keyring_module._active
    init_keyring(RING)
    yield
    keyring_module._active = previous


@pytest.fixture
def use_keys() -> Iterator[Callable[[dict[str, str]], Keyring]]:
    """Activate a keyring built from the given settings; restore RING afterwards."""

    def activate(settings: dict[str, str]) -> Keyring:
        ring = Keyring.from_settings(settings)
        init_keyring(ring)
        return ring

    yield activate
    init_keyring(RING)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# --- round trips -------------------------------------------------------------------------


@given(
    plaintext=st.text(),
    aad=st.one_of(st.text(), st.binary()),
    key_id=st.sampled_from(["oauth", "oauth_refresh", EncryptionKeys.OAUTH_REFRESH]),
)
def test_aes_gcm_round_trip(plaintext: str, aad: str | bytes, key_id: str) -> None:
    stored = encrypt_aes_gcm(plaintext, key_id, aad)
    assert re.fullmatch(r"v1:[0-9a-f]{8}:[A-Za-z0-9_-]+", stored)
    assert decrypt_aes_gcm(stored, key_id, aad) == plaintext


@given(value=st.text(), aad=st.text())
def test_fernet_round_trip(value: str, aad: str) -> None:
    stored = encrypt_field(value, EncryptionKeys.PII, aad)
    assert re.fullmatch(r"v1:[0-9a-f]{8}:[A-Za-z0-9_-]+={0,2}", stored)
    assert decrypt_field(stored, EncryptionKeys.PII, aad) == value


def _fernet_iv(stored: str) -> bytes:
    return base64.urlsafe_b64decode(stored.split(":", 2)[2])[9:25]  # version, time, IV


def test_fernet_tokens_are_standard_with_unique_ivs_across_pool_refills() -> None:
    material = base64.b64decode(KEYS[PII_VAR])  # the variable holds the Fernet key, base64ed
    stored = [encrypt_field("same", aad="x") for _ in range(600)]  # the pool holds 256
    assert len({_fernet_iv(s) for s in stored}) == 600
    token = stored[-1].split(":", 2)[2]
    assert json.loads(Fernet(material).decrypt(token)) == {"aad": "x", "v": "same"}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_never_reuses_the_parents_fernet_ivs() -> None:
    fernet_module._ivs.buf = b""  # the next call draws a block the child would inherit
    encrypt_field("fills the parent's IV pool")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the IV of its first encryption and leave at once
        try:
            os.write(write_end, _fernet_iv(encrypt_field("child")))
        finally:
            os._exit(0)  # never back into pytest, whatever happened
    os.close(write_end)
    child_iv = os.read(read_end, 16)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child_iv) == 16
    assert child_iv != _fernet_iv(encrypt_field("parent"))


def test_defaults_and_spec_call_shape() -> None:
    assert decrypt_aes_gcm(encrypt_aes_gcm(SECRET)) == SECRET
    assert decrypt_field(encrypt_field("Alice", EncryptionKeys.PII)) == "Alice"
    assert decrypt_field(encrypt_field("Alice"), "pii") == "Alice"


def test_fresh_nonce_and_fingerprint_is_sha256_of_key() -> None:
    first, second = encrypt_aes_gcm(SECRET), encrypt_aes_gcm(SECRET)
    assert first != second
    expected = hashlib.sha256(base64.b64decode(KEYS[OAUTH_VAR])).hexdigest()[:8]
    assert fingerprint_of(first) == expected == RING.current_fingerprint("oauth")
    fernet_key = base64.b64decode(KEYS[PII_VAR])
    pii_fp = hashlib.sha256(base64.urlsafe_b64decode(fernet_key)).hexdigest()[:8]
    assert fingerprint_of(encrypt_field("x")) == pii_fp


def test_wrong_scheme_key_ids_are_rejected() -> None:
    with pytest.raises(CryptoError):
        encrypt_aes_gcm(SECRET, "pii")
    with pytest.raises(CryptoError):
        encrypt_field("x", "oauth")
    with pytest.raises(CryptoError):
        encrypt_aes_gcm(SECRET, "nope")


# --- tampering and AAD binding -----------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_single_character_tamper_fails(scheme: str) -> None:
    encrypt, decrypt = SCHEMES[scheme]
    stored = encrypt(SECRET, ROW_A)
    survivors = []
    for i, original in enumerate(stored):
        for char in ALPHABET.replace(original, ""):
            tampered = stored[:i] + char + stored[i + 1 :]
            try:
                decrypt(tampered, ROW_A)
            except DecryptionError:
                continue
            survivors.append(tampered)
    assert survivors == []


@pytest.mark.parametrize("scheme", SCHEMES)
def test_truncation_extension_and_garbage_fail(scheme: str) -> None:
    encrypt, decrypt = SCHEMES[scheme]
    stored = encrypt(SECRET, ROW_A)
    bad = [stored[:-1], stored + "A", stored[:-4], "", "v1::", "v2" + stored[2:], " " + stored]
    bad += [stored.replace(":", "|"), stored + "\n", stored[:12] + "é" + stored[13:], None, b"x"]
    for candidate in bad:
        with pytest.raises(DecryptionError):
            decrypt(candidate, ROW_A)  # type: ignore[arg-type]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("other_aad", [ROW_B, COLUMN_B, ""], ids=["row", "column", "none"])
def test_aad_swap_fails(scheme: str, other_aad: str) -> None:
    encrypt, decrypt = SCHEMES[scheme]
    stored = encrypt(SECRET, ROW_A)
    assert decrypt(stored, ROW_A) == SECRET
    with pytest.raises(DecryptionError):
        decrypt(stored, other_aad)


def test_key_id_swap_fails() -> None:
    with pytest.raises(DecryptionError, match=RING.current_fingerprint("oauth")):
        decrypt_aes_gcm(encrypt_aes_gcm(SECRET, "oauth"), "oauth_refresh")


def test_aad_for_is_canonical() -> None:
    assert aad_for(3, 7, "google", " Alice@Example.COM ", "access_token_encrypted") == (
        "mailkey:v1|org=3|user=7|provider=google|address=alice@example.com"
        "|column=access_token_encrypted"
    )
    assert aad_for(None, 7, "microsoft", "a+b@x.io", "c").startswith("mailkey:v1|org=|user=7|")
    assert "a+b@x.io" in aad_for(None, 7, "microsoft", "a+b@x.io", "c")
    # A crafted value cannot impersonate another field layout.
    assert aad_for(1, 2, "g|address=x", "y", "c") != aad_for(1, 2, "g", "x|address=y", "c")


# --- key loading -------------------------------------------------------------------------

AES_COMMAND = (
    "import base64; from cryptography.hazmat.primitives.ciphers.aead import AESGCM; "
    "print(base64.b64encode(AESGCM.generate_key(bit_length=256)).decode())"
)
PII_COMMAND = (
    "import base64; from cryptography.fernet import Fernet; "
    "print(base64.b64encode(Fernet.generate_key()).decode())"
)


def run_python(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout


def test_keys_from_the_documented_commands_load(use_keys: Callable[..., Keyring]) -> None:
    ring = use_keys(
        {OAUTH_VAR: run_python(AES_COMMAND), REFRESH_VAR: None, PII_VAR: run_python(PII_COMMAND)}
    )
    assert ring.fingerprints("oauth_refresh") == ring.fingerprints("oauth")  # fallback
    assert decrypt_aes_gcm(encrypt_aes_gcm(SECRET, "oauth_refresh"), "oauth_refresh") == SECRET
    assert decrypt_field(encrypt_field("Alice")) == "Alice"


def test_raw_and_urlsafe_key_forms_load(use_keys: Callable[..., Keyring]) -> None:
    fernet_key = Fernet.generate_key().decode()
    aes_key = base64.urlsafe_b64encode(AESGCM.generate_key(bit_length=256)).decode()
    raw = use_keys({OAUTH_VAR: aes_key, PII_VAR: f"  {fernet_key}\n"})
    stored = encrypt_field("Alice")
    doubled = use_keys({OAUTH_VAR: aes_key, PII_VAR: b64(fernet_key.encode())})
    assert raw.fingerprints("pii") == doubled.fingerprints("pii")
    assert decrypt_field(stored) == "Alice"


@pytest.mark.parametrize("var", [OAUTH_VAR, REFRESH_VAR, PII_VAR, f"{PII_VAR}_PREVIOUS"])
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("not base64 at all!", "not valid base64"),
        ("QUJD=QUJD", "not valid base64"),
        (b64(b"k" * 16), "got 16"),
        (b64(b"k" * 33), "got 33"),
        (b64(b64(b"k" * 16).encode()), "got 24"),
    ],
)
def test_bad_keys_raise_key_config_error_naming_the_variable(
    var: str, value: str, reason: str
) -> None:
    with pytest.raises(KeyConfigError, match=re.escape(var)) as info:
        Keyring.from_settings({**KEYS, var: value})
    assert reason in str(info.value)
    assert value not in str(info.value)


@pytest.mark.parametrize("var", [OAUTH_VAR, PII_VAR])
@pytest.mark.parametrize("missing", [None, "", "   "])
def test_missing_required_key(var: str, missing: str | None) -> None:
    with pytest.raises(KeyConfigError, match=f"{var}: required"):
        Keyring.from_settings({**KEYS, var: missing})


@pytest.mark.parametrize("aes_var", [OAUTH_VAR, REFRESH_VAR])
def test_pii_key_must_differ_from_oauth_keys(aes_var: str) -> None:
    material = AESGCM.generate_key(bit_length=256)
    same_as_fernet = b64(base64.urlsafe_b64encode(material))
    for pii_value in (same_as_fernet, b64(material)):
        with pytest.raises(KeyConfigError, match=f"{PII_VAR}: must differ from {aes_var}"):
            Keyring.from_settings({**KEYS, aes_var: b64(material), PII_VAR: pii_value})
    # Refresh may equal (or fall back to) the access-token key.
    Keyring.from_settings({**KEYS, REFRESH_VAR: KEYS[OAUTH_VAR]})


def test_keyring_not_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyring_module, "_active", None)
    with pytest.raises(CryptoError, match="encryption keys are not configured"):
        get_keyring()
    with pytest.raises(CryptoError):
        encrypt_aes_gcm(SECRET)


# --- rotation ----------------------------------------------------------------------------


def test_previous_keys_decrypt_but_never_encrypt(use_keys: Callable[..., Keyring]) -> None:
    old, new = generate_keys(), generate_keys()
    old_ring = use_keys(old)
    old_token = encrypt_aes_gcm(SECRET, "oauth", ROW_A)
    old_pii = encrypt_field("Alice", EncryptionKeys.PII, ROW_A)
    filler = b64(b"x" * 32)  # an older, unrelated key listed before the one we need
    previous = {f"{var}_PREVIOUS": old[var] for var in old}
    ring = use_keys({**new, **previous, f"{OAUTH_VAR}_PREVIOUS": f" {filler} ,, {old[OAUTH_VAR]}"})
    assert ring.fingerprints("oauth") == [
        Keyring.from_settings(new).current_fingerprint("oauth"),
        Keyring.from_settings({**new, OAUTH_VAR: filler}).current_fingerprint("oauth"),
        old_ring.current_fingerprint("oauth"),
    ]
    assert decrypt_aes_gcm(old_token, "oauth", ROW_A) == SECRET
    assert decrypt_field(old_pii, EncryptionKeys.PII, ROW_A) == "Alice"
    assert not is_current(old_token, "oauth") and not is_current(old_pii, "pii")
    assert is_current(encrypt_aes_gcm(SECRET, "oauth", ROW_A), "oauth")
    assert fingerprint_of(encrypt_field("Alice")) == ring.current_fingerprint("pii")


@pytest.mark.parametrize("key_id", list(EncryptionKeys))
def test_reencrypt_moves_ciphertext_from_key_a_to_key_b(
    key_id: EncryptionKeys, use_keys: Callable[..., Keyring]
) -> None:
    a, b = generate_keys(), generate_keys()
    encrypt, decrypt = (
        (encrypt_field, decrypt_field)
        if key_id is EncryptionKeys.PII
        else (encrypt_aes_gcm, decrypt_aes_gcm)
    )
    use_keys(a)
    stored_a = encrypt(SECRET, key_id, ROW_A)
    use_keys({**b, **{f"{var}_PREVIOUS": a[var] for var in a}})
    stored_b = reencrypt(stored_a, key_id, ROW_A)
    assert fingerprint_of(stored_b) != fingerprint_of(stored_a)
    assert is_current(stored_b, key_id)
    use_keys(b)
    assert decrypt(stored_b, key_id, ROW_A) == SECRET
    with pytest.raises(
        DecryptionError, match=f"unknown key fingerprint {fingerprint_of(stored_a)}"
    ):
        decrypt(stored_a, key_id, ROW_A)


# --- no secrets in messages or reprs -----------------------------------------------------


def test_no_plaintext_or_key_material_in_reprs_and_errors() -> None:
    key_forms = set(KEYS.values()) | {base64.b64decode(KEYS[PII_VAR]).decode()}
    assert not any(form in repr(RING) for form in key_forms)
    assert RING.current_fingerprint("pii") in repr(RING)
    for encrypt, decrypt in SCHEMES.values():
        stored = encrypt(SECRET, ROW_A)
        tampered = stored[:-6] + ("A" if stored[-6] != "A" else "B") + stored[-5:]
        for candidate, aad in ((stored, ROW_B), (tampered, ROW_A), (stored[:-1], ROW_A)):
            with pytest.raises(DecryptionError) as info:
                decrypt(candidate, aad)
            text = f"{info.value} {info.value!r}"
            payload = stored.split(":", 2)[2]
            for secret in (SECRET, ROW_A, ROW_B, payload, tampered, *key_forms):
                assert secret not in text
            # No chained cryptography/codec exception (their .object/.doc may hold data).
            assert info.value.__cause__ is None
            assert info.value.__context__ is None or info.value.__suppress_context__


def test_previous_keys_ignore_blanks_and_empty_items() -> None:
    first, second = b64(b"1" * 32), b64(b"2" * 32)
    for listed in (f"{first},{second},", f" {first} ,\n{second}\n", f",{first}, ,{second},,"):
        ring = Keyring.from_settings({**KEYS, f"{OAUTH_VAR}_PREVIOUS": listed})
        assert len(ring.fingerprints("oauth")) == 3
        assert ring.name_of(ring.fingerprints("oauth")[2]) == f"{OAUTH_VAR}_PREVIOUS[1]"


def test_current_key_repeated_in_previous_is_ignored_with_a_warning_naming_both(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="mailkey.crypto"):
        ring = Keyring.from_settings({**KEYS, f"{OAUTH_VAR}_PREVIOUS": f"{KEYS[OAUTH_VAR]},"})
    assert ring.fingerprints("oauth") == RING.fingerprints("oauth")
    assert ring.current_fingerprint("oauth") == RING.current_fingerprint("oauth")
    assert f"{OAUTH_VAR}_PREVIOUS[0] is the same key as {OAUTH_VAR}" in caplog.text
    assert KEYS[OAUTH_VAR] not in caplog.text
