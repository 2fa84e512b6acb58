"""Where a ``TrustedContext`` gets the keys that unwrap data keys, in each mode.

=====================  ==============================================================
``kms=``               keys come from
=====================  ==============================================================
a KMS object           that object (``LocalKms``, ``BrokerKms``, a ``Session``: any
                       ``KeyWrapper``)
``"session"``          ``enclaveml.session()``: the keys the broker released to this
                       job after attestation; outside ``enclaveml run`` this fails
``"local"``            the embedded key store at ``$ENCLAVEML_HOME/keystore.json``
                       (default ``~/.enclaveml``), passphrase ``$ENCLAVEML_PASSPHRASE``
``None`` (default)     the session when this process runs under ``enclaveml run``,
                       otherwise the local key store
=====================  ==============================================================

Why the session wins over the local store by default: inside ``enclaveml run`` the only
keys a job may use are the ones attestation released (``enclaveml run`` even removes
``ENCLAVEML_PASSPHRASE`` from the job's environment), so falling back to a key store on the
host would silently bypass the policy. No adapter is needed: ``Session`` already implements
``KeyWrapper`` (unwrap with the released key version, wrap with the newest one), which is all
EML and the Parquet bridge ask of a KMS.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from enclaveml.crypto import KeyWrapper
from enclaveml.errors import ConfigError
from enclaveml.runtime.session import SESSION_FD_ENV, Session, session

__all__ = ["KeySourceName", "local_key_store", "resolve_key_source", "session_keys"]

KeySourceName = Literal["session", "local"]
STORE_FILE = "keystore.json"  # as `enclaveml kms init` writes it


def session_keys() -> Session:
    """The released keys of this job; a clear ``ConfigError`` if it was not attested."""
    keys = session()  # raises ConfigError outside `enclaveml run`
    if not keys.key_names():
        raise ConfigError(
            "the job's session holds no keys (none were released, or the session was closed)",
            "pass the key names to `enclaveml run --keys`, and do not close enclaveml.session() before reading",
        )
    return keys


def local_key_store() -> KeyWrapper:
    """The embedded key store of ``$ENCLAVEML_HOME`` (default ``~/.enclaveml``)."""
    from enclaveml.kms import LocalKms  # scrypt and the store only when asked for

    home = Path(os.environ.get("ENCLAVEML_HOME") or Path.home() / ".enclaveml").expanduser()
    store = home / STORE_FILE
    if not store.exists():
        raise ConfigError(
            f"no key store at {store}", "run `enclaveml kms init`, set ENCLAVEML_HOME, or pass kms= explicitly"
        )
    passphrase = os.environ.get("ENCLAVEML_PASSPHRASE")
    if not passphrase:
        raise ConfigError("no passphrase for the local key store", "set ENCLAVEML_PASSPHRASE or pass kms= explicitly")
    return LocalKms(store, passphrase)


def _in_runtime() -> bool:
    if os.environ.get(SESSION_FD_ENV):
        return True
    try:
        session()  # a session read earlier in this process is cached
    except ConfigError:
        return False
    return True


def resolve_key_source(kms: KeyWrapper | KeySourceName | None) -> KeyWrapper:
    """The ``KeyWrapper`` for ``TrustedContext(kms=...)``; see the table in the module docstring."""
    if kms is None:
        return session_keys() if _in_runtime() else local_key_store()
    if kms == "session":
        return session_keys()
    if kms == "local":
        return local_key_store()
    if isinstance(kms, str):
        raise ConfigError(f"unknown key source {kms!r}", "pass a KMS object, 'session' or 'local'")
    return kms
