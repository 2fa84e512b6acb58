"""Encrypted containers and envelope encryption (the pure core: no network, no environment).

Example, with the embedded key store::

    from pathlib import Path
    from enclaveml.crypto import decrypt_bytes, decrypt_file, encrypt_bytes, encrypt_file, open_reader
    from enclaveml.kms import LocalKms, SCRYPT_FAST_FOR_TESTS
    from datetime import UTC, datetime

    kms = LocalKms.init(Path("/tmp/ks.json"), "correct horse", kdf=SCRYPT_FAST_FOR_TESTS, now=datetime.now(UTC))
    kms.create_key("customers")
    Path("/tmp/a.csv").write_bytes(b"name,age\\nann,41\\n")
    encrypt_file("/tmp/a.csv", "/tmp/a.csv.eml", kms, "customers", context={"tenant": "acme"})
    decrypt_file("/tmp/a.csv.eml", "/tmp/b.csv", kms, context={"tenant": "acme"})
    with open_reader("/tmp/a.csv.eml", kms, context={"tenant": "acme"}) as reader:
        assert reader.pread(9, 3) == b"ann"
    blob = encrypt_bytes(b"model weights", kms, "customers")  # the same file bytes, in memory
    assert decrypt_bytes(blob, kms) == b"model weights"

The format is specified in ``docs/format.md``.
"""

from enclaveml.crypto._envelope import (
    DATA_KEY_SIZE,
    FileDescription,
    KeyReference,
    KeyWrapper,
    WrappedKey,
    decrypt_bytes,
    decrypt_file,
    describe_file,
    encrypt_bytes,
    encrypt_file,
    rewrap_file,
)
from enclaveml.crypto._format import (
    DEFAULT_SEGMENT_SIZE,
    MAX_SEGMENT_SIZE,
    MIN_SEGMENT_SIZE,
    BoundHeader,
    Envelope,
    Header,
)
from enclaveml.crypto._reader import EmlReader, open_reader

__all__ = [
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
]
