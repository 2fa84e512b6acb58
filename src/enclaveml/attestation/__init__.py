"""Attestation: evidence parsing and verification into one claims model (pure core).

Example, verifying a DCAP quote against offline collateral and a policy::

    from datetime import UTC, datetime
    from pathlib import Path
    from enclaveml.attestation import Policy, load_collateral, verify_evidence

    verified = verify_evidence(Path("quote.bin").read_bytes(), now=datetime.now(UTC),
                               collateral=load_collateral("collateral.json"))
    Policy.load("policy.toml").verify(verified.claims, now=datetime.now(UTC))

``docs/attestation.md`` describes the flow, the policy format and every failure reason.
"""

from enclaveml.attestation.claims import Claims, TcbStatus, TeeType
from enclaveml.attestation.collateral import Collateral, load_collateral
from enclaveml.attestation.dcap import INTEL_SGX_ROOT_CA, DcapResult, verify_quote
from enclaveml.attestation.evidence import VerifiedEvidence, detect_evidence, verify_evidence
from enclaveml.attestation.maa import verify_maa_token
from enclaveml.attestation.policy import Decision, Failure, Policy, PolicyViolation
from enclaveml.attestation.quote import Quote, parse_quote
from enclaveml.attestation.sim import SimulationKey, create_sim_evidence, measure_workload, verify_sim_evidence

__all__ = [
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
]
