"""Encryption at rest for OAuth tokens (AES-256-GCM) and PII columns (Fernet).

A leaf package (stdlib + cryptography only). Every stored value is `v1:<fp>:<payload>`,
where `<fp>` names the key that wrote it, so keys can rotate: the current key encrypts,
`*_PREVIOUS` keys still decrypt, and `reencrypt` moves old rows onto the current key.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from .aes_gcm import decrypt_aes_gcm, encrypt_aes_gcm
from .fernet import decrypt_field, encrypt_field, field_encryptor
from .keyring import (
    CryptoError,
    DecryptionError,
    EncryptionKeys,
    KeyConfigError,
    Keyring,
    generate_keys,
    get_keyring,
    init_keyring,
    key_id_of,
    split_stored,
)

__all__ = [
    "CryptoError",
    "DecryptionError",
    "EncryptionKeys",
    "KeyConfigError",
    "Keyring",
    "aad_for",
    "decrypt_aes_gcm",
    "decrypt_field",
    "encrypt_aes_gcm",
    "encrypt_field",
    "field_encryptor",
    "fingerprint_of",
    "generate_keys",
    "get_keyring",
    "init_keyring",
    "is_current",
    "reencrypt",
]


def fingerprint_of(ciphertext: str) -> str | None:
    """The fingerprint of the key that wrote `ciphertext`, or None if it is unparseable."""
    try:
        return split_stored(ciphertext)[0]
    except DecryptionError:
        return None


def is_current(ciphertext: str, key_id: EncryptionKeys | str) -> bool:
    return fingerprint_of(ciphertext) == get_keyring().current_fingerprint(key_id)


def reencrypt(ciphertext: str, key_id: EncryptionKeys | str, aad: str = "") -> str:
    """Decrypt with whichever known key wrote it, encrypt with the current key (rotation)."""
    if key_id_of(key_id) is EncryptionKeys.PII:
        return encrypt_field(decrypt_field(ciphertext, key_id, aad), key_id, aad)
    return encrypt_aes_gcm(decrypt_aes_gcm(ciphertext, key_id, aad), key_id, aad)


def aad_for(
    organization_id: int | str | None,
    user_id: int | str,
    provider: str,
    email_address: str,
    column: str,
) -> str:
    """Canonical row+column binding, e.g. `mailkey:v1|org=3|user=7|...|column=...`.

    Values are percent-escaped (except `@` and `+`), so a crafted value cannot forge a
    separator and two different rows can never produce the same AAD.
    """
    fields = {
        "org": "" if organization_id is None else organization_id,
        "user": user_id,
        "provider": provider,
        "address": email_address.strip().lower(),
        "column": column,
    }
    return "mailkey:v1|" + "|".join(f"{k}={_escape(str(v))}" for k, v in fields.items())


_PLAIN = re.compile(r"[A-Za-z0-9_.~@+-]*")


def _escape(value: str) -> str:
    """quote() is slow; most values (ids, names, addresses) need no escaping at all."""
    return value if _PLAIN.fullmatch(value) else quote(value, safe="@+")
