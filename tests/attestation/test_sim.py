"""The simulated TEE: workload measurement, simulation keys, evidence and its verification."""

from __future__ import annotations

import hashlib
import os
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from enclaveml.attestation.claims import Claims, TcbStatus, TeeType
from enclaveml.attestation.sim import (
    SimEvidence,
    SimulationKey,
    create_sim_evidence,
    load_sim_public_key,
    measure_workload,
    verify_sim_evidence,
)
from enclaveml.errors import AttestationError, ConfigError, EvidenceParseError

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
MEASUREMENT = bytes(range(48))
REPORT_DATA = bytes(range(100, 164))
NONCE = b"challenge-0001"
COMMAND = ["python", "train.py", "--epochs", "3"]
EMPTY_MEASUREMENT_HEX = (
    "f90012e30de2b41da15612d307eb32babb55fdf69ff0ce658c19c3e88eff0923f5d3701bd281b55190d18e511320725d"
)
DOCS_EXAMPLE_HEX = "9cfef68720ef641e32bc3ccf2fac7ba69664c886d673ffb26789dfc59ea67b070634ce802a99903aa7baafd2f844eff1"

# Field offsets of evidence v1 with a 14-byte nonce (docs/attestation/sim-and-policy.md).
N = len(NONCE)
FIELDS = {
    "magic": (0, 8),
    "version": (8, 10),
    "measurement": (10, 58),
    "report_data": (58, 122),
    "nonce_length": (122, 123),
    "nonce": (123, 123 + N),
    "issued_at": (123 + N, 131 + N),
    "signer": (131 + N, 163 + N),
    "signature": (163 + N, 227 + N),
}


@pytest.fixture(scope="module")
def key() -> SimulationKey:
    return SimulationKey.generate()


@pytest.fixture(scope="module")
def evidence(key: SimulationKey) -> bytes:
    return create_sim_evidence(key, MEASUREMENT, REPORT_DATA, NONCE, NOW)


@pytest.fixture
def workload(tmp_path: Path) -> Path:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "train.py").write_bytes(b"print('training')\n")
    (tmp_path / "pkg" / "model.py").write_bytes(b"WEIGHTS = [1, 2, 3]\n")
    (tmp_path / "pkg" / "data.bin").write_bytes(bytes(1000))
    return tmp_path


def verify(
    evidence: bytes,
    *,
    trusted_keys: list[Ed25519PublicKey] | None = None,
    expected_nonce: bytes | None = NONCE,
    now: datetime = NOW,
) -> Claims:
    return verify_sim_evidence(evidence, trusted_keys=trusted_keys, expected_nonce=expected_nonce, now=now)


# -- measurement --------------------------------------------------------------------------


def reference_measurement(files: dict[str, bytes], command: list[str]) -> bytes:
    """The formula from the docs, written out independently of the implementation."""
    out = b"enclaveml-sim-measurement-v1\x00" + struct.pack(">I", len(files))
    for name in sorted(files, key=lambda n: n.encode()):
        out += struct.pack(">I", len(name.encode())) + name.encode() + hashlib.sha384(files[name]).digest()
    out += struct.pack(">I", len(command))
    for arg in command:
        out += struct.pack(">I", len(arg.encode())) + arg.encode()
    return hashlib.sha384(out).digest()


def test_measurement_matches_the_documented_formula(workload: Path) -> None:
    expected = reference_measurement(
        {"train.py": b"print('training')\n", "pkg/model.py": b"WEIGHTS = [1, 2, 3]\n", "pkg/data.bin": bytes(1000)},
        COMMAND,
    )
    measured = measure_workload([Path("train.py"), Path("pkg")], COMMAND, root=workload)
    assert measured == expected
    assert len(measured) == 48


def test_empty_workload_has_a_fixed_measurement(tmp_path: Path) -> None:
    measured = measure_workload([], [], root=tmp_path)
    assert measured == reference_measurement({}, [])
    assert measured.hex() == EMPTY_MEASUREMENT_HEX  # the value printed in the docs


def test_worked_example_from_the_docs(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "job.py").write_bytes(b'print("hello")\n')
    (tmp_path / "lib" / "util.py").write_bytes(b"X = 1\n")
    measured = measure_workload([Path("job.py"), Path("lib")], ["python", "job.py"], root=tmp_path)
    assert measured.hex() == DOCS_EXAMPLE_HEX


def test_listing_order_duplicates_and_directory_expansion_do_not_matter(workload: Path) -> None:
    by_dir = measure_workload([Path("train.py"), Path("pkg")], COMMAND, root=workload)
    by_files = measure_workload(
        [Path("pkg/model.py"), workload / "pkg" / "data.bin", Path("train.py"), Path("pkg/model.py")],
        COMMAND,
        root=workload,
    )
    assert by_dir == by_files


def test_measurement_changes_with_any_content_byte(workload: Path) -> None:
    before = measure_workload([Path(".")], COMMAND, root=workload)
    data = bytearray((workload / "pkg" / "data.bin").read_bytes())
    data[500] ^= 1
    (workload / "pkg" / "data.bin").write_bytes(bytes(data))
    assert measure_workload([Path(".")], COMMAND, root=workload) != before


def test_measurement_changes_with_a_file_name(workload: Path) -> None:
    before = measure_workload([Path(".")], COMMAND, root=workload)
    (workload / "pkg" / "model.py").rename(workload / "pkg" / "model2.py")
    assert measure_workload([Path(".")], COMMAND, root=workload) != before


@pytest.mark.parametrize(
    "command",
    [["python", "train.py", "--epochs", "4"], ["python", "train.py", "--epochs"], ["python", "train.py--epochs", "3"]],
)
def test_measurement_changes_with_the_command(workload: Path, command: list[str]) -> None:
    assert measure_workload([Path(".")], command, root=workload) != measure_workload(
        [Path(".")], COMMAND, root=workload
    )


def test_file_outside_the_root_is_refused(workload: Path) -> None:
    with pytest.raises(ConfigError, match="outside the workload root"):
        measure_workload([Path("../elsewhere.py")], COMMAND, root=workload)


def test_missing_file_is_refused(workload: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot measure 'absent\.py'"):
        measure_workload([Path("absent.py")], COMMAND, root=workload)


def test_symlink_cycle_is_refused(workload: Path) -> None:
    os.symlink(workload / "pkg", workload / "pkg" / "loop")
    with pytest.raises(ConfigError, match="symbolic link cycle"):
        measure_workload([Path("pkg")], COMMAND, root=workload)


# -- keys ---------------------------------------------------------------------------------


def test_simulation_key_survives_a_pem_round_trip(key: SimulationKey, evidence: bytes) -> None:
    reloaded = SimulationKey.from_pem(key.to_pem())
    claims = verify(evidence, trusted_keys=[load_sim_public_key(reloaded.public_pem())])
    assert claims.tee is TeeType.SIM


def test_non_ed25519_key_is_refused() -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        SimulationKey.from_pem(pem)
    with pytest.raises(ConfigError, match="not a readable PEM"):
        SimulationKey.from_pem(b"garbage")


# -- evidence -----------------------------------------------------------------------------


def test_evidence_round_trip_gives_insecure_simulated_claims(key: SimulationKey, evidence: bytes) -> None:
    claims = verify_sim_evidence(evidence, trusted_keys=[key.public_key], expected_nonce=NONCE, now=NOW)
    assert claims.tee is TeeType.SIM
    assert claims.source == "sim"
    assert claims.mr_enclave == MEASUREMENT
    assert claims.report_data == REPORT_DATA
    assert claims.debug is False
    assert claims.tcb_status is TcbStatus.SIMULATED
    assert claims.insecure is True
    assert claims.mr_signer is None
    assert claims.extra["sim_issued_at"] == NOW.isoformat()
    assert len(evidence) == 227 + N
    parsed = SimEvidence.from_bytes(evidence)
    assert (parsed.version, parsed.nonce, parsed.issued_at) == (1, NONCE, int(NOW.timestamp()))
    assert parsed.to_bytes() == evidence


@pytest.mark.parametrize(
    ("field", "reason"),
    [
        ("magic", "malformed_evidence"),
        ("version", "malformed_evidence"),
        ("measurement", "sim_signature_invalid"),
        ("report_data", "sim_signature_invalid"),
        ("nonce_length", "malformed_evidence"),
        ("nonce", "sim_signature_invalid"),
        ("issued_at", "sim_signature_invalid"),
        ("signer", "sim_signature_invalid"),
        ("signature", "sim_signature_invalid"),
    ],
)
def test_tampering_with_any_field_is_detected(evidence: bytes, field: str, reason: str) -> None:
    _, end = FIELDS[field]
    tampered = bytearray(evidence)
    tampered[end - 1] ^= 0x01
    with pytest.raises(AttestationError) as info:
        verify(bytes(tampered))
    assert info.value.reason == reason


def test_evidence_signed_by_another_key_is_untrusted(key: SimulationKey) -> None:
    other = create_sim_evidence(SimulationKey.generate(), MEASUREMENT, REPORT_DATA, NONCE, NOW)
    with pytest.raises(AttestationError, match="is not trusted") as info:
        verify(other, trusted_keys=[key.public_key])
    assert info.value.reason == "sim_key_untrusted"
    assert verify(other).mr_enclave == MEASUREMENT


def test_wrong_nonce_is_refused(evidence: bytes) -> None:
    with pytest.raises(AttestationError, match="differs from the expected") as info:
        verify(evidence, expected_nonce=b"another-challenge")
    assert info.value.reason == "nonce_mismatch"


def test_old_evidence_is_expired_and_future_evidence_not_yet_valid(evidence: bytes) -> None:
    verify(evidence, now=NOW + timedelta(seconds=300))
    with pytest.raises(AttestationError, match="301 s old") as info:
        verify(evidence, now=NOW + timedelta(seconds=301))
    assert info.value.reason == "evidence_expired"
    verify(evidence, now=NOW - timedelta(seconds=60))
    with pytest.raises(AttestationError) as info:
        verify(evidence, now=NOW - timedelta(seconds=61))
    assert info.value.reason == "evidence_not_yet_valid"


def test_every_truncation_and_trailing_data_are_malformed(evidence: bytes) -> None:
    for length in range(len(evidence)):
        with pytest.raises(EvidenceParseError) as info:
            verify(evidence[:length])
        assert info.value.reason == "malformed_evidence"
    with pytest.raises(EvidenceParseError, match="field trailing"):
        verify(evidence + b"\x00")


def test_nonce_longer_than_64_bytes_is_malformed(evidence: bytes) -> None:
    start, _ = FIELDS["nonce_length"]
    tampered = evidence[:start] + bytes([65]) + evidence[start + 1 :]
    with pytest.raises(EvidenceParseError, match="field nonce_length at offset 122"):
        verify(tampered)


@pytest.mark.parametrize(
    ("measurement", "report_data", "nonce"),
    [(bytes(32), REPORT_DATA, NONCE), (MEASUREMENT, bytes(32), NONCE), (MEASUREMENT, REPORT_DATA, bytes(65))],
)
def test_creating_evidence_with_wrong_sizes_is_misuse(
    key: SimulationKey, measurement: bytes, report_data: bytes, nonce: bytes
) -> None:
    with pytest.raises(ValueError, match="bytes"):
        create_sim_evidence(key, measurement, report_data, nonce, NOW)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_parser_raises_only_attestation_errors_on_arbitrary_bytes(data: bytes) -> None:
    with pytest.raises(AttestationError):
        verify(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_parser_raises_only_attestation_errors_on_mutated_evidence(evidence: bytes, data: st.DataObject) -> None:
    mutated = bytearray(evidence)
    position = data.draw(st.integers(0, len(mutated) - 1))
    mutated[position] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    with pytest.raises(AttestationError):
        verify(bytes(mutated[:cut]) + data.draw(st.binary(max_size=8)) + bytes(mutated[cut:]))
