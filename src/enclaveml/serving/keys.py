"""Where the model server gets the keys that open its model files, in each mode.

A ``KeySource`` answers two questions, one per model file format:

- ``key_wrapper_for_eml()``: a ``KeyWrapper`` that unwraps the data keys of EML model files
  (``model.onnx.eml``);
- ``pf_wrap_key()``: the 16-byte key of Gramine protected files (``model.onnx.pf``), the
  key Gramine's ``SECRET_PROVISION_SET_KEY`` / ``gramine-sgx-pf-crypt -w`` take.

========================  ==================================================  =====================
source                    EML keys from                                       PF wrap key from
========================  ==================================================  =====================
``LocalKeys(kms)``        a KMS object (``LocalKms``, ``BrokerKms``)          ``pf_wrap_key_file``
``SessionKeys()``         ``enclaveml.session()``: the keys ``enclaveml run``  —
                          released to this process after attestation
``BrokerKeys(url, ...)``  the server itself attests to the key broker and     —
                          receives the keys (``runtime.run.release_keys``)
``SecretProvKeys(...)``   —                                                   Gramine secret
                                                                              provisioning (RA-TLS)
``WrapKeyFile(path)``     —                                                   a raw 16-byte file (dev)
``CombinedKeys(a, b)``    ``a``                                               ``b``
========================  ==================================================  =====================

A source that cannot answer one question raises ``ConfigError`` saying which source can.
Broker keys are 32-byte AES-256 keys, so they are never PF wrap keys (Gramine takes exactly
16 bytes); combine ``BrokerKeys`` with ``SecretProvKeys`` to serve both formats.

Attested sources (``BrokerKeys``, ``SecretProvKeys``) attest once, on first use, and keep
the keys in memory only; ``refresh()`` forgets them so the next use attests again (e.g. to
receive a rotated key version). Key bytes are never logged, never in a ``repr`` and never in
an exception message.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from enclaveml.attestation.ratls import EvidenceKind
from enclaveml.attestation.tee import Tee, TeeKind
from enclaveml.crypto import KeyWrapper
from enclaveml.crypto.gramine_pf import KEY_SIZE, read_wrap_key_file
from enclaveml.errors import ConfigError
from enclaveml.runtime.run import BrokerLike, release_keys
from enclaveml.runtime.session import Session, session

if TYPE_CHECKING:
    from enclaveml.broker.client import BrokerClient

__all__ = [
    "API_KEY_ENV",
    "APP_ID_ENV",
    "PF_KEY_SIZE",
    "BrokerKeys",
    "CombinedKeys",
    "KeySource",
    "LocalKeys",
    "SecretProvKeys",
    "SessionKeys",
    "WrapKeyFile",
    "read_wrap_key_file",
]

PF_KEY_SIZE = KEY_SIZE
"""Gramine's protected-files key (the KDK): AES-128, exactly 16 raw bytes."""
APP_ID_ENV = "ENCLAVEML_APP_ID"
API_KEY_ENV = "ENCLAVEML_API_KEY"
_EVIDENCE_KIND: dict[TeeKind, EvidenceKind] = {"sgx": "sgx-quote", "tdx": "tdx-quote", "sim": "sim"}
_NO_PF = "Gramine protected model files (.pf) need a 16-byte wrap key"
_PF_HINT = (
    "name the key it derives from (pf_key=NAME), or use SecretProvKeys or a wrap-key file, "
    "e.g. CombinedKeys(eml_source, pf_source)"
)
_NO_EML = "EML model files (.eml) need a KMS or released keys"
_EML_HINT = "use LocalKeys, SessionKeys or BrokerKeys, e.g. CombinedKeys(eml_source, pf_source)"


class KeySource(Protocol):
    """What a model repository needs to open model files; see the module docstring."""

    def key_wrapper_for_eml(self) -> KeyWrapper:
        """Unwraps the data keys of EML model files; ``ConfigError`` if this source has none."""
        ...

    def pf_wrap_key(self) -> bytes:
        """The 16-byte Gramine protected-files key; ``ConfigError`` if this source has none."""
        ...


def _pf_key_name(chosen: str | None, available: Sequence[str]) -> str:
    if chosen is not None:
        return chosen
    if len(available) != 1:
        raise ConfigError(f"{_NO_PF}: which released key does it derive from?", _PF_HINT)
    return available[0]


class LocalKeys:
    """EML keys from a KMS object you hold (``LocalKms`` for local mode).

    The PF key comes from ``pf_wrap_key_file``, or is derived from the KMS key ``pf_key``
    (``LocalKms.gramine_pf_key``, what ``enclaveml kms gramine-pf-key`` writes).
    """

    def __init__(
        self,
        kms: KeyWrapper,
        *,
        pf_wrap_key_file: str | os.PathLike[str] | None = None,
        pf_key: str | None = None,
    ) -> None:
        self._kms = kms
        self._pf_file = None if pf_wrap_key_file is None else Path(pf_wrap_key_file)
        self._pf_key = pf_key

    def key_wrapper_for_eml(self) -> KeyWrapper:
        return self._kms

    def pf_wrap_key(self) -> bytes:
        if self._pf_file is not None:
            return read_wrap_key_file(self._pf_file)
        derive = getattr(self._kms, "gramine_pf_key", None)
        if self._pf_key is None or derive is None:
            raise ConfigError(f"{_NO_PF}; this local key source has none", "pass pf_wrap_key_file=PATH or pf_key=NAME")
        return bytes(derive(self._pf_key))

    def __repr__(self) -> str:
        return f"LocalKeys(kms={type(self._kms).__name__}, pf_wrap_key_file={self._pf_file})"


class WrapKeyFile:
    """The PF wrap key from a raw 16-byte file: development only (the key sits on the host's disk)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def key_wrapper_for_eml(self) -> KeyWrapper:
        raise ConfigError(f"{_NO_EML}; a wrap key file holds only a Gramine PF key", _EML_HINT)

    def pf_wrap_key(self) -> bytes:
        return read_wrap_key_file(self.path)

    def __repr__(self) -> str:
        return f"WrapKeyFile({str(self.path)!r})"


class SessionKeys:
    """The keys ``enclaveml run`` released to this process (``enclaveml.session()``), or a given ``Session``."""

    def __init__(self, session: Session | None = None, *, pf_key: str | None = None) -> None:
        self._session = session
        self._pf_key = pf_key

    def key_wrapper_for_eml(self) -> KeyWrapper:
        if self._session is None:
            released = session()  # ConfigError outside `enclaveml run`
            if not released.key_names():
                raise ConfigError(
                    "the session holds no keys (none were released, or it was closed)",
                    "name the model files' keys in `enclaveml run --keys`",
                )
            self._session = released
        return self._session

    def pf_wrap_key(self) -> bytes:
        """Derived from the released key ``pf_key`` (the only released key when not named)."""
        released = self.key_wrapper_for_eml()
        assert isinstance(released, Session)
        return released.gramine_pf_key(_pf_key_name(self._pf_key, released.key_names()))

    def __repr__(self) -> str:
        return f"SessionKeys({self._session!r})"


class BrokerKeys:
    """The server attests to the key broker at ``url`` itself and receives ``keys`` in memory.

    What ``enclaveml run`` does for a job, done by the server process: for each key, a broker
    nonce, evidence from ``tee`` bound to an ephemeral public key, ``POST
    /v1/keys/{name}/release``, the HPKE-sealed answer opened (``runtime.run.release_keys``).
    The released keys become a ``Session`` (a ``KeyWrapper``).

    Credentials of a ``workload`` app: ``app_id`` / ``api_key``, default the environment's
    ``ENCLAVEML_APP_ID`` / ``ENCLAVEML_API_KEY``. ``ca``: PEM file of the broker's TLS CA;
    ``client_cert``: ``(cert, key)`` PEM files for a broker requiring mutual TLS. ``client``:
    any ``BrokerLike`` (instead of building a ``BrokerClient``). A refusal raises the
    broker's ``AttestationError`` / ``PolicyError`` with its reason; nothing is cached then.
    """

    def __init__(
        self,
        url: str,
        keys: Sequence[str],
        *,
        tee: Tee,
        app_id: str | None = None,
        api_key: str | bytes | None = None,
        ca: str | None = None,
        client_cert: tuple[str, str] | None = None,
        client: BrokerLike | None = None,
        pf_key: str | None = None,
    ) -> None:
        if not keys:
            raise ConfigError("no keys to receive from the broker", "name the keys the model files are sealed with")
        self.url, self.keys, self.tee = url, list(dict.fromkeys(keys)), tee
        self._app_id = app_id if app_id is not None else os.environ.get(APP_ID_ENV, "")
        self._api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
        self._ca, self._client_cert, self._client = ca, client_cert, client
        self._session: Session | None = None
        self._lock = threading.Lock()
        self.insecure = False  # set when the broker accepted simulated evidence
        self._pf_key = pf_key

    def _broker(self) -> tuple[BrokerLike, BrokerClient | None]:
        if self._client is not None:
            return self._client, None
        if not self._app_id or not self._api_key:
            raise ConfigError(
                f"no broker credentials: set {APP_ID_ENV} and {API_KEY_ENV}",
                "enroll the server with `enclaveml broker enroll --name NAME --role workload`",
            )
        from enclaveml.broker.client import BrokerClient  # httpx only when a broker is used

        made = BrokerClient(self.url, self._app_id, self._api_key, ca=self._ca, client_cert=self._client_cert)
        return made, made

    def key_wrapper_for_eml(self) -> KeyWrapper:
        with self._lock:
            if self._session is None:
                broker, owned = self._broker()
                try:
                    outcome = release_keys(broker, self.tee, self.keys)
                finally:
                    if owned is not None:
                        owned.close()
                self.insecure = outcome.insecure
                self._session = Session("broker", outcome.keys, outcome.claims)
            return self._session

    def pf_wrap_key(self) -> bytes:
        """Derived from the released key ``pf_key`` (the only key received when not named)."""
        released = self.key_wrapper_for_eml()
        assert isinstance(released, Session)
        return released.gramine_pf_key(_pf_key_name(self._pf_key, self.keys))

    def refresh(self) -> None:
        """Forget the released keys: the next use attests again."""
        with self._lock:
            if self._session is not None:
                self._session.close()
            self._session = None

    def __repr__(self) -> str:
        released = self._session is not None
        return f"BrokerKeys(url={self.url!r}, keys={self.keys}, tee={self.tee.kind}, released={released})"


class SecretProvKeys:
    """The PF wrap key from a Gramine secret provisioning server (``libsecret_prov_attest``'s protocol).

    ``fetch_secret`` presents an RA-TLS client certificate carrying evidence from ``tee``;
    the server (``host:port``, verified by the CA in ``ca`` or the system's CAs) releases
    its secret if the evidence satisfies its policy. The secret must be exactly 16 bytes,
    as Gramine's ``SECRET_PROVISION_SET_KEY`` requires. Fetched once, kept in memory.
    """

    def __init__(
        self,
        host: str,
        port: int = 4433,
        *,
        tee: Tee,
        ca: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
        now_fn: Callable[[], datetime] | None = None,
    ) -> None:
        if tee.kind not in _EVIDENCE_KIND:
            raise ConfigError(
                f"{tee.kind.upper()} evidence cannot be carried in an RA-TLS certificate",
                "run the server in an SGX enclave (Gramine) or a TDX guest",
            )
        self.host, self.port, self.tee, self.timeout = host, port, tee, timeout
        self._ca = None if ca is None else Path(ca)
        self._now_fn = now_fn or (lambda: datetime.now(UTC))
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def key_wrapper_for_eml(self) -> KeyWrapper:
        raise ConfigError(f"{_NO_EML}; secret provisioning delivers only a Gramine PF key", _EML_HINT)

    def pf_wrap_key(self) -> bytes:
        from enclaveml.broker.secret_prov_client import fetch_secret

        with self._lock:
            if self._key is None:
                ca_pem = None if self._ca is None else self._ca.read_bytes()
                secret = fetch_secret(
                    self.host,
                    self.port,
                    tee_evidence_for=self.tee.evidence,
                    kind=_EVIDENCE_KIND[self.tee.kind],
                    ca_pem=ca_pem,
                    now=self._now_fn(),
                    timeout=self.timeout,
                    max_secret_size=1024,
                )
                if len(secret) != PF_KEY_SIZE:
                    raise ConfigError(
                        f"{self.host}:{self.port} provisioned a {len(secret)}-byte secret, not a {PF_KEY_SIZE}-byte "
                        "wrap key",
                        "serve the 16-byte PF wrap key (Gramine's SECRET_PROVISION_SET_KEY takes exactly 16 bytes)",
                    )
                self._key = secret
            return self._key

    def refresh(self) -> None:
        """Forget the key: the next use attests again."""
        with self._lock:
            self._key = None

    def __repr__(self) -> str:
        return f"SecretProvKeys(host={self.host!r}, port={self.port}, tee={self.tee.kind})"


class CombinedKeys:
    """EML keys from ``eml``, the PF wrap key from ``pf`` (e.g. ``BrokerKeys`` + ``SecretProvKeys``)."""

    def __init__(self, eml: KeySource, pf: KeySource) -> None:
        self.eml, self.pf = eml, pf

    def key_wrapper_for_eml(self) -> KeyWrapper:
        return self.eml.key_wrapper_for_eml()

    def pf_wrap_key(self) -> bytes:
        return self.pf.pf_wrap_key()

    def __repr__(self) -> str:
        return f"CombinedKeys(eml={self.eml!r}, pf={self.pf!r})"
