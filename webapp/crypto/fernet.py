"""Fernet for PII columns, stored as `v1:<fp>:<fernet token>`.

Fernet has no associated data, so the AAD travels inside the authenticated plaintext
(`{"aad": ..., "v": ...}`) and is compared on decrypt: same row/column binding as AES-GCM.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
import re
import threading
import time
from collections.abc import Callable
from json.encoder import encode_basestring  # type: ignore[attr-defined]

from cryptography.fernet import Fernet, InvalidToken

from .keyring import (
    CryptoError,
    DecryptionError,
    EncryptionKeys,
    get_keyring,
    key_id_of,
    split_stored,
    utf8,
)

_TOKEN = re.compile(r"[A-Za-z0-9_-]+={0,2}")


_IV_LEN = 16
_IV_BLOCK = _IV_LEN * 256


class _IVPool(threading.local):
    """Random IVs drawn 256 at a time, one pool per thread.

    os.urandom releases the GIL; with a sync's other threads running, each of 10,000
    calls then waited ~50 µs to get it back, more than the encryption itself. The pool is
    emptied in a forked child (Celery prefork), so parent and child never share an IV.
    """

    buf = b""
    pos = 0


_ivs = _IVPool()
# A private method (cryptography 44-50): should a release drop it, encrypt() still works.
_WITH_IV = hasattr(Fernet, "_encrypt_from_parts")
os.register_at_fork(after_in_child=lambda: setattr(_ivs, "buf", b""))


def _iv() -> bytes:
    pool = _ivs
    pos = pool.pos
    if pos + _IV_LEN > len(pool.buf):
        pool.buf, pos = os.urandom(_IV_BLOCK), 0
    pool.pos = pos + _IV_LEN
    return pool.buf[pos : pos + _IV_LEN]


@functools.lru_cache(maxsize=32)
def _fernet(material: bytes) -> Fernet:
    return Fernet(base64.urlsafe_b64encode(material))


def _pii_key_id(key: EncryptionKeys | str) -> EncryptionKeys:
    kid = key_id_of(key)
    if kid is not EncryptionKeys.PII:
        raise CryptoError(f"{kid.value} is not a Fernet key id")
    return kid


def encrypt_field(value: str, key: EncryptionKeys | str = EncryptionKeys.PII, aad: str = "") -> str:
    return field_encryptor(key)(value, aad)


def field_encryptor(key: EncryptionKeys | str = EncryptionKeys.PII) -> Callable[[str, str], str]:
    """encrypt_field(value, key, aad) as a function of (value, aad), bound to the key that
    is current now: for many values in a row (a sync batch), the key is looked up once."""
    kid = _pii_key_id(key)
    fp, material = get_keyring().current(kid)
    fernet = _fernet(material)  # always the current key, as MultiFernet does
    prefix = f"v1:{fp}:"

    def encrypt(value: str, aad: str) -> str:
        if not isinstance(value, str) or not isinstance(aad, str):
            raise CryptoError("value and aad must be str")
        # json.dumps({"aad": aad, "v": value}, ensure_ascii=False, separators=(",", ":")),
        # with the C escaper that call uses and without its per-call encoder set-up
        body = utf8(f'{{"aad":{encode_basestring(aad)},"v":{encode_basestring(value)}}}')
        if _WITH_IV:  # Fernet.encrypt with a pooled IV, the way MultiFernet.rotate calls it
            token = fernet._encrypt_from_parts(body, int(time.time()), _iv())
        else:
            token = fernet.encrypt(body)
        return prefix + token.decode("ascii")

    return encrypt


def decrypt_field(
    ciphertext: str, key: EncryptionKeys | str = EncryptionKeys.PII, aad: str = ""
) -> str:
    kid = _pii_key_id(key)
    fp, token = split_stored(ciphertext)
    # Fernet's own decoder is lenient; insist on the one canonical padded base64url form.
    if not _TOKEN.fullmatch(token):
        raise DecryptionError("malformed ciphertext payload")
    try:
        canonical = base64.urlsafe_b64encode(base64.urlsafe_b64decode(token)).decode() == token
    except (binascii.Error, ValueError):
        canonical = False
    if not canonical:
        raise DecryptionError("malformed ciphertext payload")
    fernet = _fernet(get_keyring().material(kid, fp))
    try:
        doc = json.loads(fernet.decrypt(token))
    except (InvalidToken, ValueError):  # ValueError: bad UTF-8/JSON behind a valid MAC
        raise DecryptionError(
            f"authentication failed with key {fp} (wrong key or tampered data)"
        ) from None
    if not (isinstance(doc, dict) and isinstance(doc.get("v"), str) and doc.get("aad") == aad):
        raise DecryptionError(f"AAD mismatch for ciphertext under key {fp}")
    return doc["v"]
