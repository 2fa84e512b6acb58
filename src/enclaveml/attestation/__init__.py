"""Attestation: evidence parsing and verification into one claims model (pure core)."""

from enclaveml.attestation.claims import Claims, TcbStatus, TeeType

__all__ = ["Claims", "TcbStatus", "TeeType"]
