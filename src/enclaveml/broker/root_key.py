"""The broker's root key: where it comes from and the keys derived from it.

The root key is 32 bytes that never reach the database. It comes from one of:

- a **key file**: exactly 32 raw bytes, or 64 hex digits (surrounding whitespace ignored),
  e.g. ``openssl rand -hex 32 > root.key``; :func:`create_root_key_file` writes a new one
  with mode 0600. A key file readable by group or others is accepted (Kubernetes mounts
  secrets 0644 by default) but logged as a warning.
- a **passphrase**: ``root = scrypt(passphrase UTF-8, salt, N=2**log_n, r, p, 32 bytes)`` with
  the local KMS's :class:`~enclaveml.kms.ScryptParams`; the salt and parameters are not
  secret and live in the store (``broker_meta.root_kdf``, see ``docs/broker-store.md``).

Everything else is derived with HKDF-SHA256 (no salt, 32 bytes), one label per use::

    check_key     info "enclaveml broker root check"     check = HMAC(check_key, "enclaveml broker root v1")
    material_key  info "enclaveml broker material wrap"  wraps primary key versions and signing keys
    pepper        info "enclaveml broker api key pepper" api_key_hash = HMAC(pepper, "api-key"‖0‖app_id‖0‖api_key)
    audit_key     info "enclaveml broker audit seal"     seal = HMAC(audit_key, entry hash)
    nonce_key     info "enclaveml broker nonce mac"      attestation nonces (``_nonces.py``)

Sealed material is ``nonce(12) ‖ AES-256-GCM(material_key, nonce, material, aad)`` with
``aad = "enclaveml/broker/seal/v1" ‖ 0 ‖ table ‖ 0 ‖ row id ‖ 0 ‖ u32be(version)``, so a
blob copied to another row, table or version fails to open (one opaque ``IntegrityError``).

Api keys are 32 random bytes, so a fast keyed hash is enough: there is nothing to guess.
The pepper keeps even that out of reach of someone holding only a database dump, and the
app id in the input stops a hash being moved to another app's row.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from enclaveml._atomic import atomic_output
from enclaveml.errors import ConfigError, IntegrityError
from enclaveml.kms.local import ScryptParams

__all__ = ["ROOT_KEY_SIZE", "RootKey", "create_root_key_file", "derive_root_key", "read_root_key_file"]

logger = logging.getLogger("enclaveml.broker")

ROOT_KEY_SIZE = 32
_NONCE_SIZE = 12
_SEAL_LABEL = b"enclaveml/broker/seal/v1\x00"
_CHECK_MESSAGE = b"enclaveml broker root v1"
_API_KEY_LABEL = b"api-key\x00"


def derive_root_key(passphrase: str, salt: bytes, params: ScryptParams) -> bytes:
    """``scrypt(passphrase, salt, 2**log_n, r, p, 32)``: the root key for a passphrase."""
    if not passphrase:
        raise ConfigError("the broker passphrase must not be empty")
    if len(salt) < 16:
        raise ValueError("the scrypt salt must be at least 16 bytes")
    kdf = Scrypt(salt=salt, length=ROOT_KEY_SIZE, n=2**params.log_n, r=params.r, p=params.p)
    return kdf.derive(passphrase.encode("utf-8"))


def read_root_key_file(path: Path) -> bytes:
    """Read a root key file: 32 raw bytes, or 64 hex digits."""
    try:
        raw = Path(path).read_bytes()
        mode = Path(path).stat().st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read root key file {path}: {exc.strerror}", "check --root-key-file") from None
    if mode & 0o077:
        logger.warning("root key file %s is readable by group or others; chmod 600 it", path)
    if len(raw) == ROOT_KEY_SIZE:
        return raw
    text = raw.strip()
    if len(text) == 2 * ROOT_KEY_SIZE:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise ConfigError(
        f"root key file {path} holds neither 32 raw bytes nor 64 hex digits",
        "create one with `openssl rand -hex 32 > FILE` (mode 0600)",
    )


def create_root_key_file(path: Path) -> bytes:
    """Write a new random root key (64 hex digits, mode 0600); refuses to overwrite."""
    target = Path(path)
    if target.exists():
        raise ConfigError(f"root key file {target} already exists", "keep it: the broker store needs it")
    key = os.urandom(ROOT_KEY_SIZE)
    with atomic_output(target, mode=0o600, durable=True) as out:
        out.write(key.hex().encode("ascii") + b"\n")
    return key


def _hkdf(root: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(root)


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _aad(table: str, row_id: str, version: int) -> bytes:
    return _SEAL_LABEL + table.encode() + b"\x00" + row_id.encode() + b"\x00" + struct.pack(">I", version)


class RootKey:
    """The root key's derived keys (module docstring). Never printed, never stored."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != ROOT_KEY_SIZE:
            raise ValueError("the broker root key must be 32 bytes")
        self._check_key = _hkdf(key, b"enclaveml broker root check")
        self._material = AESGCM(_hkdf(key, b"enclaveml broker material wrap"))
        self._pepper = _hkdf(key, b"enclaveml broker api key pepper")
        self._audit_key = _hkdf(key, b"enclaveml broker audit seal")
        self._nonce_key = _hkdf(key, b"enclaveml broker nonce mac")

    def __repr__(self) -> str:
        return "RootKey(<secret>)"

    def check_value(self) -> str:
        """Hex ``HMAC(check_key, "enclaveml broker root v1")``: tells a wrong root key at open."""
        return _hmac(self._check_key, _CHECK_MESSAGE).hex()

    def seal(self, material: bytes, *, table: str, row_id: str, version: int = 0) -> bytes:
        """Encrypt key material for the row ``(table, row_id, version)``."""
        nonce = os.urandom(_NONCE_SIZE)
        return nonce + self._material.encrypt(nonce, material, _aad(table, row_id, version))

    def open(self, sealed: bytes, *, table: str, row_id: str, version: int = 0) -> bytes:
        """Decrypt what :meth:`seal` made for the same row; anything else is ``IntegrityError``."""
        try:
            return self._material.decrypt(sealed[:_NONCE_SIZE], sealed[_NONCE_SIZE:], _aad(table, row_id, version))
        except (InvalidTag, ValueError):
            raise IntegrityError(
                f"sealed key material of {table} {row_id} does not open",
                "the broker store was modified or belongs to another root key; restore it from a backup",
            ) from None

    def api_key_hash(self, app_id: str, api_key: bytes) -> bytes:
        return _hmac(self._pepper, _API_KEY_LABEL + app_id.encode() + b"\x00" + api_key)

    def audit_seal(self, entry_hash: bytes) -> bytes:
        return _hmac(self._audit_key, entry_hash)

    def nonce_mac(self, message: bytes) -> bytes:
        return _hmac(self._nonce_key, message)
