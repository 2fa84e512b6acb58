"""One error tree for the whole of enclaveml.

::

    EnclaveMLError                      exit 1   (base; never raised itself)
    ├── ConfigError                     exit 2   bad usage, configuration or environment
    ├── AttestationError                exit 3   evidence failed a verification step (has .reason)
    │   └── EvidenceParseError          exit 3   evidence is malformed (names field and offset)
    ├── PolicyError                     exit 3   verified claims do not satisfy a policy
    ├── IntegrityError                  exit 4   tampered, truncated, reordered or wrong key: opaque
    │   ├── FormatError                 exit 4   not a well-formed container (names the field)
    │   └── ContextMismatch             exit 4   the encryption context differs from the one given
    └── KeyServiceError                 exit 5   key management or authentication
        ├── KeyNotFound                 exit 5   no such key or key version
        ├── AuthError                   exit 5   wrong passphrase or credentials
        └── KeyStoreCorrupted           exit 5   the key store failed its integrity check

Malformed input (``FormatError``, ``EvidenceParseError``) is kept apart from failed checks
(``IntegrityError``, ``AttestationError``, ``PolicyError``) and from the environment
(``ConfigError``, ``KeyServiceError``).

Every error carries ``what`` (what happened) and ``hint`` (what to do). ``diagnostics()``
renders the one line the CLI prints: ``<what> (<hint>)``. Messages never contain key
material, passphrases or plaintext: callers pass only names, ids, sizes and offsets.
Decryption failures stay opaque on purpose (no "which byte"), so the message cannot be
used as an oracle.
"""

from __future__ import annotations

__all__ = [
    "AttestationError",
    "AuthError",
    "ConfigError",
    "ContextMismatch",
    "EnclaveMLError",
    "EvidenceParseError",
    "FormatError",
    "IntegrityError",
    "KeyNotFound",
    "KeyServiceError",
    "KeyStoreCorrupted",
    "PolicyError",
]


class EnclaveMLError(Exception):
    """Base of every error enclaveml raises on purpose."""

    exit_code = 1
    default_hint = "run with --debug for details"

    def __init__(self, what: str, hint: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.hint = hint if hint is not None else self.default_hint

    def about(self, subject: object) -> EnclaveMLError:
        """Prefix ``what`` with the file or object it concerns; returns ``self`` to re-raise."""
        self.what = f"{subject}: {self.what}"
        self.args = (self.what, *self.args[1:])
        return self

    def diagnostics(self) -> str:
        """The single line shown to a person: what happened, then what to do."""
        return f"{self.what} ({self.hint})"


class ConfigError(EnclaveMLError):
    exit_code = 2
    default_hint = "check the command line and configuration"


class AttestationError(EnclaveMLError):
    """A verification step failed. ``reason`` is a stable machine-readable code."""

    exit_code = 3
    default_hint = "check the evidence, collateral and policy"

    def __init__(self, reason: str, what: str, hint: str | None = None) -> None:
        super().__init__(what, hint)
        self.reason = reason


class EvidenceParseError(AttestationError):
    """Evidence (a quote, token or report) is malformed."""

    def __init__(self, field: str, offset: int, what: str, hint: str | None = None) -> None:
        super().__init__("malformed_evidence", f"{what} (field {field} at offset {offset})", hint)
        self.field = field
        self.offset = offset


class PolicyError(EnclaveMLError):
    exit_code = 3
    default_hint = "compare the workload's claims with the policy"


class IntegrityError(EnclaveMLError):
    """Authentication failed: the data was tampered with, truncated, or the key is wrong."""

    exit_code = 4
    default_hint = "the file was modified or is not meant for this key; restore it from a trusted copy"


class FormatError(IntegrityError):
    """The input is not a well-formed container. Names the field, never secret bytes."""

    default_hint = "is this an enclaveml-encrypted file? `enclaveml inspect FILE` shows its header"


class ContextMismatch(IntegrityError):
    default_hint = "pass exactly the --context pairs the file was encrypted with; `enclaveml inspect` lists them"


class KeyServiceError(EnclaveMLError):
    exit_code = 5
    default_hint = "check the key store and its passphrase"


class KeyNotFound(KeyServiceError):
    default_hint = "`enclaveml kms list` shows the keys and versions this key store holds"


class AuthError(KeyServiceError):
    default_hint = "check the passphrase (ENCLAVEML_PASSPHRASE or the prompt) or credentials"


class KeyStoreCorrupted(KeyServiceError):
    default_hint = "the key store file was modified; restore it from a backup"
