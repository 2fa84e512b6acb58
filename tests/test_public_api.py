"""The public names of each package are exactly what its ``__all__`` says, and all import."""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "enclaveml": ["__version__", "session"],
    "enclaveml.crypto": [
        "DATA_KEY_SIZE",
        "DEFAULT_SEGMENT_SIZE",
        "MAX_SEGMENT_SIZE",
        "MIN_SEGMENT_SIZE",
        "BoundHeader",
        "EmlReader",
        "Envelope",
        "FileDescription",
        "Header",
        "KeyReference",
        "KeyWrapper",
        "WrappedKey",
        "decrypt_bytes",
        "decrypt_file",
        "describe_file",
        "encrypt_bytes",
        "encrypt_file",
        "open_reader",
        "rewrap_file",
    ],
    "enclaveml.attestation": [
        "INTEL_SGX_ROOT_CA",
        "Claims",
        "Collateral",
        "DcapResult",
        "Decision",
        "Failure",
        "Policy",
        "PolicyViolation",
        "Quote",
        "SimulationKey",
        "TcbStatus",
        "TeeType",
        "VerifiedEvidence",
        "create_sim_evidence",
        "detect_evidence",
        "load_collateral",
        "measure_workload",
        "parse_quote",
        "verify_evidence",
        "verify_maa_token",
        "verify_quote",
        "verify_sim_evidence",
    ],
    "enclaveml.kms": [
        "SCRYPT_DEFAULT",
        "SCRYPT_FAST_FOR_TESTS",
        "KeyInfo",
        "KeyManagementService",
        "KeyVersionInfo",
        "LocalKms",
        "ScryptParams",
        "WrappedKey",
    ],
}


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_exported_members(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert sorted(module.__all__) == sorted(PUBLIC[module_name])
    for name in module.__all__:
        assert getattr(module, name) is not None


def test_every_error_maps_to_its_documented_exit_code() -> None:
    from enclaveml import errors

    expected = {
        "ConfigError": 2,
        "AttestationError": 3,
        "EvidenceParseError": 3,
        "PolicyError": 3,
        "IntegrityError": 4,
        "FormatError": 4,
        "ContextMismatch": 4,
        "KeyServiceError": 5,
        "KeyNotFound": 5,
        "AuthError": 5,
        "KeyStoreCorrupted": 5,
    }
    assert {name: getattr(errors, name).exit_code for name in expected} == expected


def test_local_kms_is_a_key_management_service(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    from enclaveml.crypto import KeyWrapper
    from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, KeyManagementService, LocalKms

    store = LocalKms.init(tmp_path / "ks.json", "pw", kdf=SCRYPT_FAST_FOR_TESTS, now=datetime.now(UTC))
    assert isinstance(store, KeyManagementService)
    wrapper: KeyWrapper = store  # the protocol envelope encryption needs
    assert wrapper is store
