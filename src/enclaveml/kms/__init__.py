"""Key management: primary keys that wrap and unwrap per-file data keys.

Every backend implements :class:`KeyManagementService`; :class:`LocalKms` is the embedded
default, a passphrase-sealed file::

    from datetime import UTC, datetime
    from pathlib import Path
    from enclaveml.kms import LocalKms

    kms = LocalKms.init(Path("~/.enclaveml/keystore.json").expanduser(), "passphrase",
                        now=datetime.now(UTC))
    kms.create_key("training-data")
    wrapped = kms.wrap_data_key("training-data", data_key, associated_data=header)
    assert kms.unwrap_data_key(wrapped, associated_data=header) == data_key
"""

from enclaveml.kms._protocol import KeyInfo, KeyManagementService, KeyVersionInfo, WrappedKey
from enclaveml.kms.local import SCRYPT_DEFAULT, SCRYPT_FAST_FOR_TESTS, LocalKms, ScryptParams

__all__ = [
    "SCRYPT_DEFAULT",
    "SCRYPT_FAST_FOR_TESTS",
    "KeyInfo",
    "KeyManagementService",
    "KeyVersionInfo",
    "LocalKms",
    "ScryptParams",
    "WrappedKey",
]
