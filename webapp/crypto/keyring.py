"""Key ids, errors, key loading and the process-wide active keyring.

All key validation happens here, once, at startup: a bad deploy must fail loudly with the
name of the offending variable, not at the first encrypt/decrypt call.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import logging
import re
from collections.abc import Callable, Mapping

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class EncryptionKeys(enum.StrEnum):
    """StrEnum (= str + Enum): plain strings like "pii" work wherever a member does."""

    OAUTH = "oauth"
    OAUTH_REFRESH = "oauth_refresh"
    PII = "pii"


class CryptoError(Exception):
    """Base class; messages never carry plaintext, ciphertext or key material."""


class DecryptionError(CryptoError):
    """The single error for any ciphertext that cannot be decrypted and authenticated."""


class KeyConfigError(CryptoError):
    """A key variable is missing or malformed; the message names the variable."""


ENV_VARS = {
    EncryptionKeys.OAUTH: "ENCRYPTION_KEY_OAUTH_AES_GCM",
    EncryptionKeys.OAUTH_REFRESH: "ENCRYPTION_KEY_OAUTH_REFRESH_AES_GCM",
    EncryptionKeys.PII: "ENCRYPTION_KEY_PII",
}
_STORED = re.compile(r"v1:([0-9a-f]{8}):(.+)", re.DOTALL)
log = logging.getLogger("mailkey.crypto")


def key_id_of(key_id: EncryptionKeys | str) -> EncryptionKeys:
    if isinstance(key_id, EncryptionKeys):
        return key_id
    try:
        return EncryptionKeys(key_id)
    except ValueError:
        raise CryptoError(f"unknown key id {key_id!r}") from None


def fingerprint(material: bytes) -> str:
    """Short public key id stored in every ciphertext so decrypt can pick the right key."""
    return hashlib.sha256(material).hexdigest()[:8]


def split_stored(text: str) -> tuple[str, str]:
    """Parse `v1:<fp>:<payload>` into (fp, payload)."""
    match = _STORED.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise DecryptionError("malformed ciphertext: expected v1:<fingerprint>:<payload>")
    return match.group(1), match.group(2)


def utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except (UnicodeEncodeError, AttributeError):  # lone surrogates / not a str
        raise CryptoError("plaintext/aad must be a str encodable as UTF-8") from None


def _b64decode(text: str) -> bytes | None:
    """Lenient key decoding: std or urlsafe alphabet, padding optional; None if invalid."""
    padded = text.translate(str.maketrans("-_", "+/")) + "=" * (-len(text) % 4)
    try:
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return None


def _parse_aes(var: str, value: str) -> bytes:
    raw = _b64decode(value)
    if raw is None:
        raise KeyConfigError(f"{var}: not valid base64")
    if len(raw) != 32:
        raise KeyConfigError(f"{var}: must decode to 32 bytes, got {len(raw)}")
    return raw


def _parse_fernet(var: str, value: str) -> bytes:
    """Accept base64(Fernet key) (what the setup docs generate) or a raw Fernet key."""
    raw = _b64decode(value)
    if raw is None:
        raise KeyConfigError(f"{var}: not valid base64")
    if len(raw) == 44 and raw.isascii():
        inner = _b64decode(raw.decode("ascii"))
        if inner is not None and len(inner) == 32:
            return inner
    if len(raw) == 32:
        return raw
    raise KeyConfigError(
        f"{var}: must be a Fernet key (32 bytes, raw or base64-encoded), got {len(raw)} bytes"
    )


class Keyring:
    """Current key (encrypts) plus previous keys (decrypt only) for each key id."""

    __slots__ = ("_names", "_rings")

    def __init__(
        self,
        rings: Mapping[EncryptionKeys, list[bytes]],
        names: Mapping[str, str] | None = None,
    ) -> None:
        # fingerprint -> material, current key first; duplicates collapse onto the first slot.
        self._rings = {kid: {fingerprint(m): m for m in keys} for kid, keys in rings.items()}
        self._names = dict(names or {})  # fingerprint -> the variable that holds the key
        for kid, keys in rings.items():
            if len(self._rings[kid]) != len(set(keys)):
                raise KeyConfigError(f"{ENV_VARS[kid]}: two keys share a fingerprint")

    @classmethod
    def from_settings(cls, values: Mapping[str, str | None]) -> Keyring:
        """Build from raw env strings. An unset refresh key reuses the whole OAuth ring."""

        def load(
            kid: EncryptionKeys,
            parse: Callable[[str, str], bytes],
            fallback: list[tuple[str, bytes]] | None = None,
        ) -> list[tuple[str, bytes]]:
            var = ENV_VARS[kid]
            if current := (values.get(var) or "").strip():
                keys = [(var, parse(var, current))]
            elif fallback is not None:
                keys = list(fallback)
            else:
                raise KeyConfigError(f"{var}: required but not set")
            # Comma-separated; blanks around items and empty items (",,", a trailing ",")
            # are ignored.
            previous = (values.get(f"{var}_PREVIOUS") or "").split(",")
            for i, item in enumerate(v.strip() for v in previous if v.strip()):
                name = f"{var}_PREVIOUS[{i}]"
                material = parse(name, item)
                same = next((n for n, m in keys if m == material), None)
                if same is not None:  # harmless (the first slot wins) but likely a paste error
                    log.warning("%s is the same key as %s; ignored", name, same)
                    continue
                keys.append((name, material))
            return keys

        oauth = load(EncryptionKeys.OAUTH, _parse_aes)
        refresh = load(EncryptionKeys.OAUTH_REFRESH, _parse_aes, fallback=oauth)
        pii = load(EncryptionKeys.PII, _parse_fernet)
        aes_owner: dict[bytes, str] = {}
        for var, material in oauth + refresh:
            aes_owner.setdefault(material, var)
        for var, material in pii:
            if material in aes_owner:
                raise KeyConfigError(f"{var}: must differ from {aes_owner[material]}")
        loaded = list(zip(EncryptionKeys, (oauth, refresh, pii), strict=True))
        names: dict[str, str] = {}
        for _kid, keys in loaded:
            for var, material in keys:
                names.setdefault(fingerprint(material), var)
        return cls({kid: [m for _, m in keys] for kid, keys in loaded}, names)

    def _ring(self, key_id: EncryptionKeys | str) -> dict[str, bytes]:
        return self._rings[key_id_of(key_id)]

    def current_fingerprint(self, key_id: EncryptionKeys | str) -> str:
        return next(iter(self._ring(key_id)))

    def fingerprints(self, key_id: EncryptionKeys | str) -> list[str]:
        return list(self._ring(key_id))

    def current(self, key_id: EncryptionKeys | str) -> tuple[str, bytes]:
        return next(iter(self._ring(key_id).items()))

    def materials(self, key_id: EncryptionKeys | str) -> list[bytes]:
        return list(self._ring(key_id).values())

    def name_of(self, fp: str) -> str | None:
        """The variable that holds the key with this fingerprint (never the key itself)."""
        return self._names.get(fp)

    def material(self, key_id: EncryptionKeys | str, fp: str) -> bytes:
        try:
            return self._ring(key_id)[fp]
        except KeyError:
            kid = key_id_of(key_id).value
            raise DecryptionError(f"unknown key fingerprint {fp} for {kid}") from None

    def __repr__(self) -> str:
        rings = ", ".join(f"{kid.value}={list(ring)}" for kid, ring in self._rings.items())
        return f"Keyring({rings})"


def generate_keys() -> dict[str, str]:
    """A fresh full key set, in the formats the setup docs produce."""
    return {
        ENV_VARS[EncryptionKeys.OAUTH]: base64.b64encode(AESGCM.generate_key(256)).decode(),
        ENV_VARS[EncryptionKeys.OAUTH_REFRESH]: base64.b64encode(AESGCM.generate_key(256)).decode(),
        ENV_VARS[EncryptionKeys.PII]: base64.b64encode(Fernet.generate_key()).decode(),
    }


_active: Keyring | None = None


def init_keyring(keyring: Keyring) -> None:
    global _active
    _active = keyring


def get_keyring() -> Keyring:
    if _active is None:
        raise CryptoError("encryption keys are not configured")
    return _active
