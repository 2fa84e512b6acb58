"""SGX SIGSTRUCT and MRSIGNER: sign an enclave measurement, read and check a ``.sig`` file.

Pure core: no I/O, no clock (the signing ``date`` is an argument). The byte layout, what
is signed and the Q1/Q2 formulas are in ``docs/attestation/sigstruct.md`` (from the shared
``tee-formats.md`` section 4, Gramine ``sgx_arch.h``). In short::

    SIGSTRUCT (1808 bytes, integers little-endian)
      [0, 128)      HEADER, VENDOR, DATE, HEADER2, SWDEFINED, reserved   -- signed
      [128, 900)    MODULUS (384, LE), EXPONENT (= 3), SIGNATURE (384, LE)
      [900, 1028)   MISCSELECT ... ENCLAVEHASH (MRENCLAVE) ... ISVSVN     -- signed
      [1028, 1808)  reserved, Q1 (384, LE), Q2 (384, LE)

    signature  = RSASSA-PKCS1-v1_5-SHA256(key, bytes[0:128] || bytes[900:1028]),  RSA-3072, e = 3
    Q1         = floor(s^2 / n);   Q2 = floor((s^2 mod n) * s / n)
    MRSIGNER   = SHA-256(MODULUS as stored, 384 bytes little-endian)

Errors:

- ``EvidenceParseError`` -- not a SIGSTRUCT: size is not 1808, or HEADER / HEADER2 differ
  from the architectural constants.
- ``AttestationError`` with ``reason`` -- a verification step failed:
  ``sigstruct_exponent_invalid`` (EXPONENT is not 3), ``sigstruct_malformed`` (MODULUS is
  not an odd 3072-bit integer), ``sigstruct_signature_invalid``, ``sigstruct_q1q2_invalid``.
- ``ConfigError`` -- an enclave key given by the user is unreadable or is not RSA-3072 with
  e = 3. A wrong key is a usage problem of the build environment, not evidence, so it exits 2.
- ``ValueError`` -- misuse of the API (an MRENCLAVE that is not 32 bytes, an ISV SVN > 65535).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
from dataclasses import dataclass, field
from enum import IntFlag

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from enclaveml.errors import AttestationError, ConfigError, EvidenceParseError

__all__ = [
    "DEFAULT_ATTRIBUTES",
    "DEFAULT_ATTRIBUTES_MASK",
    "DEFAULT_MISC_MASK",
    "RSA_EXPONENT",
    "RSA_KEY_BITS",
    "SIGNED_REGIONS",
    "SIGSTRUCT_SIZE",
    "AttributeFlag",
    "Sigstruct",
    "attribute_flag_names",
    "build_sigstruct",
    "enclave_key_to_pem",
    "generate_enclave_key",
    "load_enclave_key_pem",
    "load_enclave_signing_key_pem",
    "mrsigner_of",
    "parse_sigstruct",
    "verify_sigstruct",
]

SIGSTRUCT_SIZE = 1808
RSA_KEY_BITS = 3072
RSA_EXPONENT = 3
MODULUS_SIZE = RSA_KEY_BITS // 8
SIGNED_REGIONS = ((0, 128), (900, 1028))
HEADER = bytes.fromhex("06000000e10000000000010000000000")
HEADER2 = bytes.fromhex("01010000600000006000000001000000")
HEADER2_OFFSET = 24

# One struct for the whole layout (pad bytes "x" are the reserved fields); its field order
# is the order of the ``Sigstruct`` fields below.
_LAYOUT = struct.Struct("<16sII16sI84x384sI384sIIBB2x16s16s16s32s16x16sHH12x384s384s")
assert _LAYOUT.size == SIGSTRUCT_SIZE
_KEY_HINT = "generate one with `enclaveml enclave keygen` (or `openssl genrsa -3 3072`)"


class AttributeFlag(IntFlag):
    """ATTRIBUTES.FLAGS bits (Intel SDM; Linux ``asm/sgx.h``; Gramine ``sgx_arch.h``)."""

    INIT = 0x01
    DEBUG = 0x02
    MODE64BIT = 0x04
    PROVISION_KEY = 0x10
    EINITTOKEN_KEY = 0x20
    CET = 0x40
    KSS = 0x80
    AEXNOTIFY = 0x400


# Gramine's defaults (sgx_sign.py, sgx_arch.h): a 64-bit production enclave with legacy
# XFRM (x87 + SSE); every FLAGS bit and every security-relevant XFRM bit is enforced.
DEFAULT_ATTRIBUTES = struct.pack("<QQ", AttributeFlag.MODE64BIT, 0x3)
DEFAULT_ATTRIBUTES_MASK = struct.pack("<QQ", 0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_FFF9_FF1B)
DEFAULT_MISC_MASK = 0xFFFF_FFFF


def attribute_flag_names(flags: int) -> tuple[str, ...]:
    """``0x06`` -> ``("DEBUG", "MODE64BIT")``; bits without a name appear as hex."""
    names = [flag.name for flag in AttributeFlag if flags & flag and flag.name]
    unknown = flags & ~sum(AttributeFlag)
    if unknown:
        names.append(f"0x{unknown:x}")
    return tuple(names)


@dataclass(frozen=True)
class Sigstruct:
    """A parsed SIGSTRUCT. Integers are decoded; byte fields are as stored (LE for RSA values).

    ``raw`` is the whole 1808-byte structure, reserved bytes included: the signature covers
    them, so ``signed_data`` is cut from ``raw`` rather than rebuilt from the fields. The
    other fields follow the layout in order.
    """

    raw: bytes = field(repr=False)
    header: bytes
    vendor: int
    date_raw: int
    header2: bytes
    swdefined: int
    modulus: bytes
    exponent: int
    signature: bytes
    misc_select: int
    misc_mask: int
    cet_attributes: int
    cet_attributes_mask: int
    isv_family_id: bytes
    attributes: bytes
    attributes_mask: bytes
    enclave_hash: bytes
    isvext_prod_id: bytes
    isv_prod_id: int
    isv_svn: int
    q1: bytes
    q2: bytes

    @property
    def mr_enclave(self) -> bytes:
        return self.enclave_hash

    @property
    def mr_signer(self) -> bytes:
        return hashlib.sha256(self.modulus).digest()

    @property
    def attribute_flags(self) -> int:
        return int.from_bytes(self.attributes[:8], "little")

    @property
    def attribute_xfrm(self) -> int:
        return int.from_bytes(self.attributes[8:], "little")

    @property
    def debug(self) -> bool:
        return bool(self.attribute_flags & AttributeFlag.DEBUG)

    @property
    def date(self) -> dt.date | None:
        """The signing date: Intel's BCD ``0xYYYYMMDD``, else Gramine's binary layout, else None."""
        return _decode_date(self.date_raw)

    @property
    def signed_data(self) -> bytes:
        return b"".join(self.raw[start:end] for start, end in SIGNED_REGIONS)

    def to_json(self) -> dict[str, object]:
        signed_on = self.date
        return {
            "mr_enclave": self.mr_enclave.hex(),
            "mr_signer": self.mr_signer.hex(),
            "isv_prod_id": self.isv_prod_id,
            "isv_svn": self.isv_svn,
            "attributes": self.attributes.hex(),
            "attributes_mask": self.attributes_mask.hex(),
            "attribute_flags": list(attribute_flag_names(self.attribute_flags)),
            "xfrm": f"0x{self.attribute_xfrm:x}",
            "debug": self.debug,
            "misc_select": f"0x{self.misc_select:08x}",
            "misc_mask": f"0x{self.misc_mask:08x}",
            "isv_family_id": self.isv_family_id.hex(),
            "isvext_prod_id": self.isvext_prod_id.hex(),
            "date": signed_on.isoformat() if signed_on else f"0x{self.date_raw:08x}",
            "vendor": f"0x{self.vendor:08x}",
            "exponent": self.exponent,
        }


# -- enclave keys ------------------------------------------------------------------------------


def generate_enclave_key() -> rsa.RSAPrivateKey:
    """A new enclave signing key: RSA-3072 with e = 3, as ``openssl genrsa -3 3072``."""
    return rsa.generate_private_key(public_exponent=RSA_EXPONENT, key_size=RSA_KEY_BITS)


def enclave_key_to_pem(key: rsa.RSAPrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (like ``openssl genrsa``): protect the file, not the bytes."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_enclave_key_pem(data: bytes, *, password: bytes | None = None) -> rsa.RSAPrivateKey | rsa.RSAPublicKey:
    """Load a private or public enclave key from PEM; anything but RSA-3072 with e = 3 is a ConfigError."""
    try:
        if b"PRIVATE KEY-----" in data:
            key: object = serialization.load_pem_private_key(data, password=password)
        else:
            key = serialization.load_pem_public_key(data)
    except TypeError as exc:  # encrypted without a password, or a password for a plain key
        raise ConfigError(f"cannot open the enclave key: {exc}", "give the right passphrase") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError("the enclave key is not a readable PEM RSA key", _KEY_HINT) from None
    if not isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        raise ConfigError(f"the enclave key is {type(key).__name__.lstrip('_')}, not RSA", _KEY_HINT)
    _check_enclave_key(key)
    return key


def load_enclave_signing_key_pem(data: bytes, *, password: bytes | None = None) -> rsa.RSAPrivateKey:
    """Like ``load_enclave_key_pem``, but a public key is a ConfigError: signing needs the private key."""
    key = load_enclave_key_pem(data, password=password)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError("the enclave key is a public key; signing needs the private key", "pass the private key PEM")
    return key


def mrsigner_of(key: rsa.RSAPublicKey | rsa.RSAPrivateKey) -> bytes:
    """MRSIGNER = SHA-256 of the modulus as SIGSTRUCT stores it (384 bytes, little-endian)."""
    _check_enclave_key(key)
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return hashlib.sha256(public.public_numbers().n.to_bytes(MODULUS_SIZE, "little")).digest()


def _check_enclave_key(key: rsa.RSAPublicKey | rsa.RSAPrivateKey) -> None:
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    exponent = public.public_numbers().e
    if public.key_size != RSA_KEY_BITS or exponent != RSA_EXPONENT:
        raise ConfigError(
            f"the enclave key is RSA-{public.key_size} with e={exponent}; SGX needs RSA-3072 with e=3", _KEY_HINT
        )


# -- signing -----------------------------------------------------------------------------------


def build_sigstruct(
    mr_enclave: bytes,
    *,
    isv_prod_id: int,
    isv_svn: int,
    date: dt.date,
    key: rsa.RSAPrivateKey,
    attributes: bytes = DEFAULT_ATTRIBUTES,
    attributes_mask: bytes = DEFAULT_ATTRIBUTES_MASK,
    misc_select: int = 0,
    misc_mask: int = DEFAULT_MISC_MASK,
    isv_family_id: bytes = bytes(16),
    isvext_prod_id: bytes = bytes(16),
    cet_attributes: int = 0,
    cet_attributes_mask: int = 0,
    vendor: int = 0,
    swdefined: int = 0,
) -> bytes:
    """The signed 1808-byte SIGSTRUCT (a Gramine-compatible ``.sig``) for ``mr_enclave``.

    ``attributes`` / ``attributes_mask`` are 16 bytes as stored (FLAGS u64 LE then XFRM u64
    LE); the defaults are Gramine's for a production enclave (set ``AttributeFlag.DEBUG`` to
    sign a debug one). ``date`` is written as Intel's BCD ``0xYYYYMMDD``.
    """
    _check_enclave_key(key)
    _require_size("mr_enclave", mr_enclave, 32)
    sixteen = {"attributes": attributes, "attributes_mask": attributes_mask, "isv_family_id": isv_family_id}
    for name, value in {**sixteen, "isvext_prod_id": isvext_prod_id}.items():
        _require_size(name, value, 16)
    for name, number, bits in (
        ("isv_prod_id", isv_prod_id, 16),
        ("isv_svn", isv_svn, 16),
        ("misc_select", misc_select, 32),
        ("misc_mask", misc_mask, 32),
        ("cet_attributes", cet_attributes, 8),
        ("cet_attributes_mask", cet_attributes_mask, 8),
        ("vendor", vendor, 32),
        ("swdefined", swdefined, 32),
    ):
        if not 0 <= number < 1 << bits:
            raise ValueError(f"{name} must fit in {bits} unsigned bits, got {number}")
    n = key.public_key().public_numbers().n

    def pack(signature: int, q1: int, q2: int) -> bytes:
        return _LAYOUT.pack(
            HEADER, vendor, _encode_date(date), HEADER2, swdefined,
            _le(n), RSA_EXPONENT, _le(signature),
            misc_select, misc_mask, cet_attributes, cet_attributes_mask, isv_family_id,
            attributes, attributes_mask, mr_enclave, isvext_prod_id, isv_prod_id, isv_svn,
            _le(q1), _le(q2),
        )  # fmt: skip

    unsigned = pack(0, 0, 0)
    signed_data = b"".join(unsigned[start:end] for start, end in SIGNED_REGIONS)
    s = int.from_bytes(key.sign(signed_data, padding.PKCS1v15(), hashes.SHA256()), "big")
    return pack(s, *_q1_q2(s, n))


def _q1_q2(s: int, n: int) -> tuple[int, int]:
    """Q1 = floor(s^2 / n), Q2 = floor((s^2 mod n) * s / n): EINIT's helpers for s^3 mod n."""
    q1, remainder = divmod(s * s, n)
    return q1, remainder * s // n


def _le(value: int) -> bytes:
    return value.to_bytes(MODULUS_SIZE, "little")


def _require_size(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")


def _encode_date(signed_on: dt.date) -> int:
    return int(f"{signed_on.year:04d}{signed_on.month:02d}{signed_on.day:02d}", 16)


def _decode_date(raw: int) -> dt.date | None:
    digits = f"{raw:08x}"
    if digits.isdigit():  # Intel's BCD: u32 LE 0xYYYYMMDD (day at offset 20, year at 22)
        try:
            return dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
        except ValueError:
            pass
    # gramine-sgx-sign writes binary fields instead: year u16 at offset 20, month at 22, day at 23.
    try:
        return dt.date(raw & 0xFFFF, (raw >> 16) & 0xFF, raw >> 24)
    except ValueError:
        return None


# -- parsing and verification ------------------------------------------------------------------


def parse_sigstruct(data: bytes) -> Sigstruct:
    """Split a SIGSTRUCT into its fields. Checks only the structure (size, HEADER, HEADER2).

    Trusts nothing it returns: ``verify_sigstruct`` checks the signature.
    """
    if len(data) != SIGSTRUCT_SIZE:
        raise EvidenceParseError(
            "SIGSTRUCT",
            min(len(data), SIGSTRUCT_SIZE),
            f"SIGSTRUCT is {len(data)} bytes, expected {SIGSTRUCT_SIZE}",
            "a .sig file is exactly one 1808-byte SIGSTRUCT; is it truncated or another file?",
        )
    sigstruct = Sigstruct(bytes(data), *_LAYOUT.unpack(data))
    if sigstruct.header != HEADER:
        raise EvidenceParseError("HEADER", 0, "not a SIGSTRUCT: HEADER is not the SGX constant")
    if sigstruct.header2 != HEADER2:
        raise EvidenceParseError("HEADER2", HEADER2_OFFSET, "not a SIGSTRUCT: HEADER2 is not the SGX constant")
    return sigstruct


def verify_sigstruct(data: bytes) -> Sigstruct:
    """Parse a SIGSTRUCT and check it as EINIT would; return it only if every step passes.

    Steps, in order: structure; EXPONENT = 3; MODULUS is an odd 3072-bit integer; the RSA
    signature over the two signed regions; Q1 and Q2. It does not (cannot) judge *who* signed:
    compare ``mr_signer`` with a policy for that.
    """
    sigstruct = parse_sigstruct(data)
    _verify_exponent(sigstruct)
    public_key = _public_key_of(sigstruct)
    _verify_signature(sigstruct, public_key)
    _verify_q1_q2(sigstruct)
    return sigstruct


def _verify_exponent(sigstruct: Sigstruct) -> None:
    if sigstruct.exponent != RSA_EXPONENT:
        raise AttestationError(
            "sigstruct_exponent_invalid",
            f"SIGSTRUCT EXPONENT is {sigstruct.exponent}; SGX requires 3",
            "re-sign the enclave with an RSA-3072 key whose public exponent is 3",
        )


def _public_key_of(sigstruct: Sigstruct) -> rsa.RSAPublicKey:
    n = int.from_bytes(sigstruct.modulus, "little")
    if n.bit_length() != RSA_KEY_BITS or n % 2 == 0:
        raise AttestationError("sigstruct_malformed", "SIGSTRUCT MODULUS is not an odd 3072-bit integer")
    try:
        return rsa.RSAPublicNumbers(RSA_EXPONENT, n).public_key()
    except ValueError:
        raise AttestationError("sigstruct_malformed", "SIGSTRUCT MODULUS is not a usable RSA modulus") from None


def _verify_signature(sigstruct: Sigstruct, public_key: rsa.RSAPublicKey) -> None:
    big_endian = sigstruct.signature[::-1]
    try:
        public_key.verify(big_endian, sigstruct.signed_data, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise AttestationError(
            "sigstruct_signature_invalid",
            "SIGSTRUCT signature does not verify with its own MODULUS",
            "the .sig file was modified after signing; sign the enclave again",
        ) from None


def _verify_q1_q2(sigstruct: Sigstruct) -> None:
    s = int.from_bytes(sigstruct.signature, "little")
    q1, q2 = _q1_q2(s, int.from_bytes(sigstruct.modulus, "little"))
    stored = (int.from_bytes(sigstruct.q1, "little"), int.from_bytes(sigstruct.q2, "little"))
    if (q1, q2) != stored:
        raise AttestationError(
            "sigstruct_q1q2_invalid",
            "SIGSTRUCT Q1/Q2 do not match the signature (EINIT would reject it)",
            "the .sig file was modified after signing; sign the enclave again",
        )
