"""SIGSTRUCT and MRSIGNER, held to tee-formats.md section 4 by values computed here independently."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclaveml.attestation.sigstruct import (
    DEFAULT_ATTRIBUTES,
    DEFAULT_ATTRIBUTES_MASK,
    AttributeFlag,
    attribute_flag_names,
    build_sigstruct,
    enclave_key_to_pem,
    generate_enclave_key,
    load_enclave_key_pem,
    load_enclave_signing_key_pem,
    mrsigner_of,
    parse_sigstruct,
    verify_sigstruct,
)
from enclaveml.errors import AttestationError, ConfigError, EvidenceParseError

# The public half of Teaclave SGX SDK's sample enclave key (samplecode/microsoft_azure_attestation).
# tee-formats.md records its MRSIGNER as a595c6c5…57dd, matching what Azure Attestation issued.
TEACLAVE_SAMPLE_PUBLIC_KEY = b"""-----BEGIN PUBLIC KEY-----
MIIBoDANBgkqhkiG9w0BAQEFAAOCAY0AMIIBiAKCAYEAkfZLXB3p7SYhqBmRbiBl
TaCQ1dWWsVCGkgrcN/IAKxsh2XRJCtEEGoY3gOeZynZOAGx+eT3TskLF2/WDeQp3
PKYsLlflcPwJY1ICaUBYzVtFKM/w19uNXA5njiXdkZmOpXvsl97P0T24+ll+uL55
BayuLHitshY5CD9ITkzcckn5q1cvQsEXud/Q1l/jxE/+gghqFkSjCoxC4272XPfM
177bPk0MIsIBWp/IQJWOykdk0XlbKMkjWhk9pTThbdqHxwcXeY6FhiBAO1QcofWz
HDuSrhKA5A7zBosbVUAs7D1iyZKKE9n+R8F4yOrGZ4lN8pJ/+WyJRcuxdoAmaYbI
M99tYHos3pY/+9F9/llTSQj0K5G1m/9rMzS+uT58bX2yIQXLSRaikITNz78GNDH1
E33rC1hK3iYjr5Cec9gjtaZPHq3Hqnv01IRt6n7pcmSWR04FFLahOMCCt1/Zk4U9
IOvy+teJU/qibsIxxoLdgZzi4vY4WafHaR8b0qp8XhC7AgED
-----END PUBLIC KEY-----
"""
TEACLAVE_SAMPLE_MRSIGNER = "a595c6c5805da0c9c4cb920334d354aeaee2207e479dff679d5f360375f557dd"

# (offset, struct format) straight from the spec's table, independent of the module's layout.
SPEC = {
    "header": (0, "16s"),
    "vendor": (16, "<I"),
    "date": (20, "<I"),
    "header2": (24, "16s"),
    "swdefined": (40, "<I"),
    "modulus": (128, "384s"),
    "exponent": (512, "<I"),
    "signature": (516, "384s"),
    "misc_select": (900, "<I"),
    "misc_mask": (904, "<I"),
    "cet_attributes": (908, "B"),
    "cet_attributes_mask": (909, "B"),
    "isv_family_id": (912, "16s"),
    "attributes": (928, "16s"),
    "attributes_mask": (944, "16s"),
    "enclave_hash": (960, "32s"),
    "isvext_prod_id": (1008, "16s"),
    "isv_prod_id": (1024, "<H"),
    "isv_svn": (1026, "<H"),
    "q1": (1040, "384s"),
    "q2": (1424, "384s"),
}
MR_ENCLAVE = bytes.fromhex("33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb")
ATTRIBUTES = struct.pack("<QQ", AttributeFlag.INIT | AttributeFlag.DEBUG | AttributeFlag.MODE64BIT, 0xE7)
CHOSEN = {
    "isv_prod_id": 0x1234,
    "isv_svn": 0xBEEF,
    "attributes": ATTRIBUTES,
    "attributes_mask": bytes(range(16)),
    "misc_select": 1,
    "misc_mask": 0xFFFF_FFFE,
    "isv_family_id": b"F" * 16,
    "isvext_prod_id": b"E" * 16,
    "cet_attributes": 0x11,
    "cet_attributes_mask": 0x22,
    "vendor": 0x8086,
    "swdefined": 0xCAFE,
}


def field_at(data: bytes, name: str) -> object:
    offset, fmt = SPEC[name]
    return struct.unpack_from(fmt, data, offset)[0]


def mrsigner_by_spec(n: int) -> str:
    return hashlib.sha256(n.to_bytes(384, "big")[::-1]).hexdigest()


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return generate_enclave_key()


@pytest.fixture(scope="module")
def signed(key: rsa.RSAPrivateKey) -> bytes:
    return build_sigstruct(MR_ENCLAVE, date=dt.date(2025, 6, 19), key=key, **CHOSEN)  # type: ignore[arg-type]


def test_a_new_enclave_key_is_rsa_3072_with_exponent_3(key: rsa.RSAPrivateKey) -> None:
    assert key.key_size == 3072
    assert key.public_key().public_numbers().e == 3
    assert load_enclave_signing_key_pem(enclave_key_to_pem(key)).private_numbers() == key.private_numbers()


def test_mrsigner_is_sha256_of_the_little_endian_modulus(key: rsa.RSAPrivateKey) -> None:
    expected = mrsigner_by_spec(key.public_key().public_numbers().n)
    assert mrsigner_of(key).hex() == expected
    assert mrsigner_of(key.public_key()).hex() == expected


def test_mrsigner_known_answer_from_a_real_enclave_key() -> None:
    public = load_enclave_key_pem(TEACLAVE_SAMPLE_PUBLIC_KEY)
    assert mrsigner_of(public).hex() == TEACLAVE_SAMPLE_MRSIGNER


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_a_key_from_openssl_genrsa_gives_the_mrsigner_of_its_modulus(tmp_path: Path) -> None:
    pem = tmp_path / "enclave-key.pem"
    subprocess.run(["openssl", "genrsa", "-3", "-out", str(pem), "3072"], check=True, capture_output=True)
    shown = subprocess.run(
        ["openssl", "rsa", "-in", str(pem), "-noout", "-modulus"], check=True, capture_output=True, text=True
    ).stdout
    modulus_hex = shown.strip().removeprefix("Modulus=")
    public_pem = subprocess.run(["openssl", "rsa", "-in", str(pem), "-pubout"], check=True, capture_output=True).stdout

    from_private = mrsigner_of(load_enclave_key_pem(pem.read_bytes())).hex()
    from_public = mrsigner_of(load_enclave_key_pem(public_pem)).hex()

    assert from_private == from_public == mrsigner_by_spec(int(modulus_hex, 16))


@pytest.mark.parametrize(
    ("make_pem", "message"),
    [
        (lambda: _pem(rsa.generate_private_key(3, 2048)), "RSA-2048 with e=3"),
        (lambda: _pem(rsa.generate_private_key(65537, 3072)), "RSA-3072 with e=65537"),
        (lambda: _pem(ec.generate_private_key(ec.SECP256R1())), "not RSA"),
        (lambda: b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n", "not a readable PEM"),
        (lambda: b"hello", "not a readable PEM"),
        (
            lambda: rsa.generate_private_key(3, 2048).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pw"),
            ),
            "cannot open",
        ),
    ],
    ids=["rsa-2048", "exponent-65537", "ec-key", "bad-base64", "not-pem", "encrypted"],
)
def test_keys_sgx_cannot_use_are_refused(make_pem: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_enclave_key_pem(make_pem())  # type: ignore[operator]


def test_signing_needs_the_private_key(key: rsa.RSAPrivateKey) -> None:
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ConfigError, match="public key"):
        load_enclave_signing_key_pem(public_pem)


def _pem(private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_build_writes_every_field_at_its_spec_offset(signed: bytes, key: rsa.RSAPrivateKey) -> None:
    assert len(signed) == 1808
    assert field_at(signed, "header") == bytes.fromhex("06000000E10000000000010000000000")
    assert field_at(signed, "header2") == bytes.fromhex("01010000600000006000000001000000")
    assert field_at(signed, "date") == 0x20250619
    assert field_at(signed, "modulus") == key.public_key().public_numbers().n.to_bytes(384, "little")
    assert field_at(signed, "exponent") == 3
    assert field_at(signed, "enclave_hash") == MR_ENCLAVE
    for name, value in CHOSEN.items():
        assert field_at(signed, name) == value, name
    reserved = [(44, 128), (910, 912), (992, 1008), (1028, 1040)]
    assert all(signed[start:end] == bytes(end - start) for start, end in reserved)


def test_the_signature_and_q1_q2_follow_the_spec(signed: bytes, key: rsa.RSAPrivateKey) -> None:
    signed_message = signed[0:128] + signed[900:1028]
    s = int.from_bytes(field_at(signed, "signature"), "little")  # type: ignore[arg-type]
    n = key.public_key().public_numbers().n

    key.public_key().verify(s.to_bytes(384, "big"), signed_message, padding.PKCS1v15(), hashes.SHA256())
    assert field_at(signed, "q1") == (s * s // n).to_bytes(384, "little")
    assert field_at(signed, "q2") == ((s * s % n) * s // n).to_bytes(384, "little")


def test_build_parse_verify_round_trip(signed: bytes, key: rsa.RSAPrivateKey) -> None:
    sigstruct = verify_sigstruct(signed)

    assert sigstruct == parse_sigstruct(signed)
    assert sigstruct.mr_enclave == sigstruct.enclave_hash == MR_ENCLAVE
    assert sigstruct.mr_signer == mrsigner_of(key)
    for name, value in CHOSEN.items():
        assert getattr(sigstruct, name) == value, name
    assert sigstruct.date == dt.date(2025, 6, 19)
    assert sigstruct.exponent == 3
    assert sigstruct.attribute_flags == 0x7
    assert sigstruct.attribute_xfrm == 0xE7
    assert sigstruct.debug
    assert sigstruct.raw == signed
    assert sigstruct.signed_data == signed[:128] + signed[900:1028]
    shown = sigstruct.to_json()
    assert shown["attribute_flags"] == ["INIT", "DEBUG", "MODE64BIT"]
    assert shown["mr_signer"] == mrsigner_of(key).hex()
    assert shown["date"] == "2025-06-19"


def test_gramine_defaults_make_a_production_64_bit_enclave(key: rsa.RSAPrivateKey) -> None:
    sigstruct = verify_sigstruct(build_sigstruct(MR_ENCLAVE, isv_prod_id=0, isv_svn=0, date=dt.date.today(), key=key))
    assert attribute_flag_names(sigstruct.attribute_flags) == ("MODE64BIT",)
    assert not sigstruct.debug
    assert (sigstruct.attributes, sigstruct.attributes_mask) == (DEFAULT_ATTRIBUTES, DEFAULT_ATTRIBUTES_MASK)
    assert (sigstruct.misc_select, sigstruct.misc_mask) == (0, 0xFFFF_FFFF)


def _flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    changed = bytearray(data)
    changed[offset] ^= mask
    return bytes(changed)


def _set(data: bytes, name: str, value: object) -> bytes:
    changed = bytearray(data)
    offset, fmt = SPEC[name]
    struct.pack_into(fmt, changed, offset, value)
    return bytes(changed)


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        (16, "sigstruct_signature_invalid"),  # VENDOR, first signed region
        (20, "sigstruct_signature_invalid"),  # DATE
        (40, "sigstruct_signature_invalid"),  # SWDEFINED
        (100, "sigstruct_signature_invalid"),  # reserved, still signed
        (200, "sigstruct_signature_invalid"),  # MODULUS: the signature no longer matches the key
        (600, "sigstruct_signature_invalid"),  # SIGNATURE
        (900, "sigstruct_signature_invalid"),  # MISCSELECT, second signed region
        (928, "sigstruct_signature_invalid"),  # ATTRIBUTES (e.g. turning DEBUG on or off)
        (960, "sigstruct_signature_invalid"),  # ENCLAVEHASH
        (1000, "sigstruct_signature_invalid"),  # reserved, still signed
        (1024, "sigstruct_signature_invalid"),  # ISVPRODID
        (1027, "sigstruct_signature_invalid"),  # ISVSVN, last signed byte
        (1040, "sigstruct_q1q2_invalid"),  # Q1
        (1807, "sigstruct_q1q2_invalid"),  # Q2, last byte
    ],
)
def test_a_flipped_byte_fails_the_right_step(signed: bytes, offset: int, reason: str) -> None:
    with pytest.raises(AttestationError) as failure:
        verify_sigstruct(_flip(signed, offset))
    assert failure.value.reason == reason


def test_turning_on_debug_breaks_the_signature(signed: bytes) -> None:
    production = parse_sigstruct(signed).attribute_flags & ~AttributeFlag.DEBUG
    with pytest.raises(AttestationError, match="signature does not verify"):
        verify_sigstruct(_set(signed, "attributes", struct.pack("<QQ", production, 0xE7)))


@pytest.mark.parametrize(("offset", "field"), [(0, "HEADER"), (15, "HEADER"), (24, "HEADER2"), (39, "HEADER2")])
def test_a_wrong_header_constant_is_not_a_sigstruct(signed: bytes, offset: int, field: str) -> None:
    with pytest.raises(EvidenceParseError, match="not a SIGSTRUCT") as failure:
        parse_sigstruct(_flip(signed, offset))
    assert failure.value.field == field


def test_an_exponent_other_than_3_is_refused(signed: bytes) -> None:
    with pytest.raises(AttestationError, match="EXPONENT is 65537") as failure:
        verify_sigstruct(_set(signed, "exponent", 65537))
    assert failure.value.reason == "sigstruct_exponent_invalid"


@pytest.mark.parametrize(
    "modulus", [bytes(384), b"\x01" + bytes(383), b"\x02" + bytes(382) + b"\x80"], ids=["zero", "short", "even"]
)
def test_a_modulus_that_is_not_odd_3072_bit_is_malformed(signed: bytes, modulus: bytes) -> None:
    with pytest.raises(AttestationError) as failure:
        verify_sigstruct(_set(signed, "modulus", modulus))
    assert failure.value.reason == "sigstruct_malformed"


@pytest.mark.parametrize("size", [0, 1, 1028, 1807, 1809, 4096])
def test_a_sigstruct_of_the_wrong_size_is_a_parse_error(signed: bytes, size: int) -> None:
    data = (signed + bytes(4096))[:size]
    with pytest.raises(EvidenceParseError, match=f"SIGSTRUCT is {size} bytes, expected 1808") as failure:
        verify_sigstruct(data)
    assert failure.value.offset == min(size, 1808)


def test_gramine_binary_dates_are_read_too(signed: bytes) -> None:
    # gramine-sgx-sign writes year (u16) at offset 20, month at 22, day at 23, in binary.
    gramine_date = struct.pack("<HBB", 2025, 6, 19)
    changed = signed[:20] + gramine_date + signed[24:]
    assert parse_sigstruct(changed).date == dt.date(2025, 6, 19)
    assert parse_sigstruct(_set(signed, "date", 0)).date is None
    assert parse_sigstruct(_set(signed, "date", 0)).to_json()["date"] == "0x00000000"


def test_attribute_flags_decode_to_names() -> None:
    assert attribute_flag_names(0x05) == ("INIT", "MODE64BIT")
    assert attribute_flag_names(0x4B2) == ("DEBUG", "PROVISION_KEY", "EINITTOKEN_KEY", "KSS", "AEXNOTIFY")
    assert attribute_flag_names(0x1_0000_0006) == ("DEBUG", "MODE64BIT", "0x100000000")
    assert attribute_flag_names(0) == ()


def test_misuse_of_build_is_a_value_error(key: rsa.RSAPrivateKey) -> None:
    today = dt.date.today()
    with pytest.raises(ValueError, match="mr_enclave must be 32 bytes"):
        build_sigstruct(MR_ENCLAVE[:31], isv_prod_id=0, isv_svn=0, date=today, key=key)
    with pytest.raises(ValueError, match="isv_svn must fit in 16"):
        build_sigstruct(MR_ENCLAVE, isv_prod_id=0, isv_svn=1 << 16, date=today, key=key)
    with pytest.raises(ValueError, match="attributes must be 16 bytes"):
        build_sigstruct(MR_ENCLAVE, isv_prod_id=0, isv_svn=0, date=today, key=key, attributes=b"\x04")


def test_signing_with_a_non_sgx_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="RSA-2048 with e=65537"):
        build_sigstruct(
            MR_ENCLAVE, isv_prod_id=0, isv_svn=0, date=dt.date.today(), key=rsa.generate_private_key(65537, 2048)
        )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes_fail_only_with_our_errors(data: bytes) -> None:
    with pytest.raises(AttestationError):  # EvidenceParseError included
        verify_sigstruct(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1808 - 40, max_size=1808 - 40), st.booleans())
def test_fuzz_sigstruct_shaped_bytes_fail_only_with_our_errors(body: bytes, odd_top_bit: bool) -> None:
    data = bytearray(bytes.fromhex("06000000E10000000000010000000000") + body[:8])
    data += bytes.fromhex("01010000600000006000000001000000") + body[8:]
    if odd_top_bit:  # reach the signature and Q1/Q2 steps with a plausible modulus and exponent
        data[128] |= 1
        data[511] |= 0x80
        data[512:516] = (3).to_bytes(4, "little")
    with pytest.raises(AttestationError):
        verify_sigstruct(bytes(data))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 1807), st.integers(1, 255))
def test_fuzz_any_change_to_a_checked_byte_is_caught(signed: bytes, offset: int, mask: int) -> None:
    if 1028 <= offset < 1040:  # reserved, neither signed nor checked by EINIT
        return
    with pytest.raises(AttestationError):
        verify_sigstruct(_flip(signed, offset, mask))
